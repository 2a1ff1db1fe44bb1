"""Curves read back from a running job's events, as the engine writes them."""

from __future__ import annotations

from api.plots import alignment_points


def test_live_alignment_curve_keeps_epoch_zero_and_skips_the_summary_event() -> None:
    # orca_engine.align: one event per epoch (0-based), then one "before -> after" summary.
    events = [
        {"stage": "align", "epoch": 0, "distance": 3.0},
        {"stage": "align", "epoch": 1, "distance": 2.0},
        {"stage": "align", "epoch": 2, "distance": 1.5},
        {"stage": "align", "before": 3.0, "after": 1.2},
    ]
    assert alignment_points({}, events) == [(0.0, 3.0), (1.0, 2.0), (2.0, 1.5)]


def test_stored_alignment_curve_is_plotted_by_index_or_its_own_epochs() -> None:
    assert alignment_points({"alignment": [3.0, 2.0]}, []) == [(0.0, 3.0), (1.0, 2.0)]
    stored = {"alignment": [{"epoch": 0, "distance": 3.0}, {"epoch": 1, "distance": 2.5}]}
    assert alignment_points(stored, []) == [(0.0, 3.0), (1.0, 2.5)]
