"""Curves read back from a running job's events, as the engine writes them."""

from __future__ import annotations

from api.plots import alignment_points, training_records


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


def test_ensemble_members_are_drawn_in_turn_and_the_summary_is_no_epoch() -> None:
    # orca_engine.ensemble: each member's epochs restart at 1 and carry its number; the closing
    # "ensemble of K" event has the members' count and out-of-fold metrics but no epoch.
    events = [
        {"stage": "refine", "epoch": 1, "train_loss": 0.9, "member": 1, "members": 2},
        {"stage": "refine", "epoch": 2, "train_loss": 0.5, "member": 1, "members": 2},
        {"stage": "refine", "epoch": 1, "train_loss": 0.8, "member": 2, "members": 2},
        {"stage": "refine", "members": 2, "val_accuracy": 0.9},
    ]
    records = training_records({}, events)
    assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0]
    assert [r["train_loss"] for r in records] == [0.9, 0.5, 0.8]
    assert all("member" not in r and "members" not in r for r in records)
    # a single model's history is unchanged
    single = [{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.6}]
    assert [r["epoch"] for r in training_records({"refine": single}, [])] == [1.0, 2.0]
