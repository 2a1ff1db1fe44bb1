"""Whole jobs through ``run_job`` and ``python -m orca_engine`` on aeon's GunPoint.

The resume and CLI tests use the tiny random ``tiny-bert``; one module-scoped job runs the real
packaged MiniLM end to end (OTDD alignment + full fine-tuning) and several tests read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orca_engine.checkpoint import CONFIG_FILE
from orca_engine.data import load_dataset
from orca_engine.errors import JobCancelled, SpecError
from orca_engine.metrics import compute_metrics
from orca_engine.pipeline import (
    JobResult,
    _apply_overrides,
    _decide_stem_wrap,
    overall_progress,
    run_job,
)
from orca_engine.predict import load_model
from orca_engine.progress import Callbacks
from orca_engine.specs import JobSpec, ResolvedSpec, resolve_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


class Recorder(Callbacks):
    """Keeps every event and progress call; optionally cancels at a given refine step."""

    def __init__(self, cancel_at_refine_step: int | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.progress_calls: list[tuple[str, int, int]] = []
        self.cancel_at = cancel_at_refine_step

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message))

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        self.progress_calls.append((stage, step, total))
        if self.cancel_at is not None and stage == "refine" and step >= self.cancel_at:
            raise JobCancelled()


def test_overall_progress_fills_one_bar_across_stages() -> None:
    with_align = [
        overall_progress(stage, step, 10, True)
        for stage in ("prepare", "align", "refine", "evaluate", "export")
        for step in range(11)
    ]
    assert with_align == sorted(with_align)
    assert with_align[0] == 0.0 and with_align[-1] == pytest.approx(1.0)
    assert overall_progress("align", 10, 10, True) == pytest.approx(0.30)
    assert overall_progress("refine", 5, 10, True) == pytest.approx(0.60)
    # Without alignment refinement takes its share: half of refine is past the old midpoint.
    assert overall_progress("refine", 5, 10, False) == pytest.approx(0.05 + 0.85 / 2)


TINY_SPEC: dict[str, Any] = {
    "dataset_id": "gunpoint",
    "backbone": "tiny-bert",
    "alignment": {"distance": "none"},
    "finetune": {"epochs": 3, "lr": 1e-3},
    "seed": 7,
}


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "model.safetensors"))


def test_a_killed_job_resumes_to_the_same_weights_and_metrics(
    gunpoint_npz: Path, tmp_path: Path
) -> None:
    overrides = {"token_budget": 16, "ensemble_members": 1}
    straight = run_job(
        TINY_SPEC,
        gunpoint_npz,
        tmp_path / "work-straight",
        bundle_dir=tmp_path / "straight",
        device="cpu",
        resolved_overrides=overrides,
    )

    # 40 train samples / batch 8 = 5 steps per epoch; die during epoch 3.
    killer = Recorder(cancel_at_refine_step=12)
    with pytest.raises(JobCancelled):
        run_job(
            TINY_SPEC,
            gunpoint_npz,
            tmp_path / "work",
            bundle_dir=tmp_path / "resumed",
            device="cpu",
            callbacks=killer,
            resolved_overrides=overrides,
        )
    assert not (tmp_path / "resumed").exists(), "no bundle before the job finishes"
    assert (tmp_path / "work" / "prepare.json").exists()
    assert (tmp_path / "work" / "refine_state.pt").exists()

    recorder = Recorder()
    resumed = run_job(
        TINY_SPEC,
        gunpoint_npz,
        tmp_path / "work",
        bundle_dir=tmp_path / "resumed",
        device="cpu",
        callbacks=recorder,
        resolved_overrides=overrides,
    )
    # Epoch 1 is always on disk; epoch 2 only if writing was cheap next to training it
    # (refine.STATE_WRITE_COST_RATIO), which depends on this machine's disk and load.
    assert any(
        "resumes after epoch 1/3" in message or "resumes after epoch 2/3" in message
        for _, message in recorder.events
    ), recorder.events
    assert resumed.metrics == straight.metrics
    assert resumed.resolved_spec == straight.resolved_spec
    expected, got = _weights(straight.bundle_dir), _weights(resumed.bundle_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_cross_fitted_ensemble_resumes_inside_a_member_and_reloads(
    gunpoint_npz: Path, tmp_path: Path
) -> None:
    overrides = {"token_budget": 16, "ensemble_members": 3}
    straight = run_job(
        TINY_SPEC,
        gunpoint_npz,
        tmp_path / "work-straight",
        bundle_dir=tmp_path / "straight",
        device="cpu",
        resolved_overrides=overrides,
    )
    # 50 pooled rows in 5 folds: each member trains on 40 (5 steps per epoch, 15 per member);
    # the refine bar spans all members, so step 22 is inside member 2's second epoch.
    killer = Recorder(cancel_at_refine_step=22)
    with pytest.raises(JobCancelled):
        run_job(
            TINY_SPEC,
            gunpoint_npz,
            tmp_path / "work",
            bundle_dir=tmp_path / "resumed",
            device="cpu",
            callbacks=killer,
            resolved_overrides=overrides,
        )
    refine_steps = [
        (step, total) for stage, step, total in killer.progress_calls if stage == "refine"
    ]
    assert {total for _, total in refine_steps} == {45}
    assert [step for step, _ in refine_steps] == sorted(step for step, _ in refine_steps)
    assert (tmp_path / "work" / "member-0" / "refine_state.pt").exists()
    assert (tmp_path / "work" / "member-1" / "refine_state.pt").exists()
    assert not (tmp_path / "work" / "member-2").exists()

    recorder = Recorder()
    resumed = run_job(
        TINY_SPEC,
        gunpoint_npz,
        tmp_path / "work",
        bundle_dir=tmp_path / "resumed",
        device="cpu",
        callbacks=recorder,
        resolved_overrides=overrides,
    )
    assert any("member 2/3: refine resumes after epoch 1/3" in m for _, m in recorder.events)
    assert resumed.metrics == straight.metrics
    expected, got = _weights(straight.bundle_dir), _weights(resumed.bundle_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # three members' weights in one bundle, reloaded as one model whose predictions are the
    # test outputs the job scored
    assert any(name.startswith("members.2.") for name in got)
    # LayerNorm-only members keep the same frozen body: the file stores it once (members 1
    # and 2 store only what trained) and prediction holds it once in memory
    assert straight.resolved_spec["finetune_mode"] == "layernorm"
    stored_by_member = [sum(n.startswith(f"members.{i}.") for n in got) for i in range(3)]
    assert stored_by_member[1] == stored_by_member[2] < stored_by_member[0] / 2
    predictor = load_model(resumed.bundle_dir)
    assert type(predictor.model).__name__ == "EnsembleModel"
    members = predictor.model.members
    frozen = [
        n for n, p in members[0].named_parameters() if n.startswith("backbone.") and p.dim() == 2
    ]
    assert frozen and all(
        members[2].get_parameter(n) is members[0].get_parameter(n) for n in frozen
    )
    dataset = load_dataset(gunpoint_npz, seed=7)
    assert dataset.y_test is not None
    accuracy = float(np.mean(predictor.outputs(dataset.x_test).argmax(1) == dataset.y_test))
    assert accuracy == pytest.approx(resumed.metrics["test"]["accuracy"])
    # validation is scored out of fold: every pooled row once
    assert 0.0 <= resumed.metrics["val"]["accuracy"] <= 1.0


def test_a_local_backbone_outside_the_model_dirs_is_refused(
    gunpoint_npz: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    spec = {**TINY_SPEC, "backbone": f"hf:{tmp_path / 'elsewhere' / 'bert'}"}
    with pytest.raises(SpecError) as error:
        run_job(
            spec, gunpoint_npz, tmp_path / "work", bundle_dir=tmp_path / "b", model_dirs=[allowed]
        )
    assert error.value.param == "backbone"
    assert "not inside an allowed model directory" in error.value.message


def test_cli_runs_a_job_and_predicts(gunpoint_npz: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}
    bundle = tmp_path / "model"
    run = subprocess.run(
        [
            sys.executable, "-m", "orca_engine", "run",
            "--data", str(gunpoint_npz),
            "--set", "backbone=tiny-bert",
            "--set", "alignment.distance=none",
            "--set", "finetune.epochs=1",
            "--out", str(bundle),
            "--device", "cpu",
        ],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout)
    assert set(metrics) == {"val", "test", "alignment"}
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    # progress is logged; on a set this small `auto` tunes only the LayerNorms
    assert "refine: layernorm fine-tuning" in run.stderr
    assert json.loads((bundle / "metrics.json").read_text()) == metrics

    x = np.load(gunpoint_npz)["x_test"][:3]
    np.save(tmp_path / "x.npy", x)
    predict = subprocess.run(
        [sys.executable, "-m", "orca_engine", "predict", "--model", str(bundle), "--input", str(tmp_path / "x.npy")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr
    answer = json.loads(predict.stdout)
    assert len(answer["predictions"]) == 3
    assert set(answer["predictions"]) <= {1, 2}, "labels come back as the upload's 1/2"

    bad = subprocess.run(
        [sys.executable, "-m", "orca_engine", "run", "--data", str(gunpoint_npz), "--set", "finetune.lr=-1", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "finetune.lr" in bad.stderr


# --- the real MiniLM, end to end -----------------------------------------------------------------

# Small budget, chosen so the job finishes in about 1-3 minutes on a busy 2-core CPU.
# max_samples caps both the target subsample (all 40 GunPoint train rows fit) and the proxy.
MINILM_SPEC: dict[str, Any] = {
    "dataset_id": "gunpoint",
    "backbone": "minilm-l6",
    "alignment": {"distance": "otdd", "source": "english-text", "epochs": 10, "max_samples": 500},
    "finetune": {"epochs": 60, "batch_size": 8},
    "seed": 0,
}
# one model: the cross-fitted default would multiply this test's refine time by five
MINILM_OVERRIDES = {"ensemble_members": 1}


@pytest.fixture(scope="module")
def minilm_job(
    gunpoint_npz: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[JobResult, Recorder, float]:
    root = tmp_path_factory.mktemp("minilm")
    recorder = Recorder()
    started = time.monotonic()
    result = run_job(
        MINILM_SPEC,
        gunpoint_npz,
        root / "work",
        bundle_dir=root / "bundle",
        device="cpu",
        callbacks=recorder,
        proxy_cache_dir=root / "proxy-cache",
        resolved_overrides=MINILM_OVERRIDES,
    )
    seconds = time.monotonic() - started
    print(
        f"\nMiniLM GunPoint: test {result.metrics['test']}, val {result.metrics['val']}, "
        f"otdd {result.metrics['alignment']}, {seconds:.1f}s"
    )
    return result, recorder, seconds


def test_minilm_alignment_moves_towards_the_source_and_keeps_classes_apart(
    minilm_job: tuple[JobResult, Recorder, float],
) -> None:
    result, recorder, _ = minilm_job
    alignment, curve = result.metrics["alignment"], result.curves["alignment"]
    assert len(curve) >= 2 and min(curve) < curve[0]  # alignment moved towards the source
    assert alignment["after"] <= alignment["before"]
    # the separation guard (on by default) handed on the closest embedder that kept GunPoint's
    # two classes at least as far apart as they began (the one it began with if none did), and
    # the distance reported is that embedder's
    record = json.loads((result.bundle_dir / CONFIG_FILE).read_text())["alignment"]
    separation, kept = record["separation"], record["kept_epoch"]
    assert len(separation) == len(curve) and separation[kept] >= separation[0]
    assert alignment["after"] == pytest.approx(curve[kept])
    apart = [
        value for value, ratio in zip(curve, separation, strict=True) if ratio >= separation[0]
    ]
    assert alignment["after"] == pytest.approx(min(apart))
    assert any(kind == "choice" for kind, _ in recorder.events), "auto choices are explained"
    stages = [stage for stage, _, _ in recorder.progress_calls]
    assert stages.index("align") < stages.index("refine") < stages.index("export")


def test_minilm_beats_chance_on_the_test_split(
    minilm_job: tuple[JobResult, Recorder, float],
) -> None:
    result, _, _ = minilm_job
    # Chance is 0.5 (std 0.04 on 150 test series), so 0.65 is chance + 3.7 std: this asserts
    # that the model learned, not how well. This short budget measured 0.91 (seed 0) with the
    # current recipe; docs/QUALITY.md has the quality measurements, seed spreads included.
    assert result.metrics["test"]["accuracy"] >= 0.65
    history = result.curves["refine"]
    # Selection is on val only: the best epoch has the top val accuracy, ties broken by val loss.
    best = max(history, key=lambda h: (h["val"]["accuracy"], -h["val_loss"]))
    assert result.curves["best_epoch"] == best["epoch"]


def test_minilm_bundle_reloads_with_identical_test_predictions(
    minilm_job: tuple[JobResult, Recorder, float], gunpoint_npz: Path
) -> None:
    result, _, _ = minilm_job
    bundle = result.bundle_dir
    assert json.loads((bundle / "metrics.json").read_text()) == result.metrics
    config = json.loads((bundle / "config.json").read_text())
    assert config["resolved_spec"] == result.resolved_spec
    assert config["model"]["backbone"]["name"] == "minilm-l6"

    predictor = load_model(bundle)
    dataset = load_dataset(gunpoint_npz, seed=0)
    assert dataset.x_test is not None and dataset.y_test is not None
    outputs = predictor.outputs(dataset.x_test)
    # The same numbers the job reported: the reloaded model is the selected checkpoint.
    assert compute_metrics("classification", dataset.y_test, outputs) == result.metrics["test"]
    prediction = predictor.predict(dataset.x_test)
    raw_labels = np.load(gunpoint_npz)["y_test"]
    accuracy = float(np.mean(np.asarray(prediction.predictions) == raw_labels))
    assert accuracy == pytest.approx(result.metrics["test"]["accuracy"])


def test_minilm_job_fits_the_time_budget(minilm_job: tuple[JobResult, Recorder, float]) -> None:
    _, _, seconds = minilm_job
    # ~160 s measured on 2 cores shared with other jobs; ~30 s of it is refine when cores are idle.
    assert seconds < 420


def _ring_fields(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth fields on a ring of 32 points and a local map of them (wrapping around)."""
    grid = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    modes = np.arange(1, 4)[:, None]
    weights = rng.normal(size=(n, 1, 3, 2)) / modes**2
    x = weights[..., 0] @ np.cos(modes * grid) + weights[..., 1] @ np.sin(modes * grid)
    y = (0.5 * x + 0.25 * (np.roll(x, 1, -1) + np.roll(x, -1, -1))) ** 2
    return x.astype(np.float32), y.astype(np.float32)


def test_the_job_reads_a_periodic_domain_from_the_data_unless_told(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ring_x, ring_y = _ring_fields(rng, 24)
    walk = rng.normal(size=(24, 1, 32)).cumsum(-1).astype(np.float32)
    ring = _resolved_dense(tmp_path, ring_x, ring_y)
    assert ring.embedder_circular is True
    # inputs that jump across the seam: zeros past the ends, and the reason names the numbers
    walked = _resolved_dense(tmp_path, walk, ring_y)
    assert walked.embedder_circular is False
    assert "not a periodic domain" in walked.reasons["embedder_circular"]
    # a caller's choice stands either way
    told = _resolved_dense(tmp_path, ring_x, ring_y, {"embedder_circular": False})
    assert told.embedder_circular is False
    assert told.reasons["embedder_circular"] == "set by the caller"


def _resolved_dense(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, overrides: dict[str, Any] | None = None
) -> ResolvedSpec:
    path = tmp_path / "ring.npz"
    np.savez(path, x_train=x, y_train=y)
    dataset = load_dataset(path, seed=0)
    rspec = _apply_overrides(resolve_spec(JobSpec(dataset_id="ring"), dataset.info), overrides)
    return _decide_stem_wrap(rspec, dataset, overrides)


def test_a_dense_series_job_reads_the_stem_at_every_position_and_reloads(
    tmp_path: Path,
) -> None:
    # a local map on a ring: each output point is a weighted mean of its input's neighbourhood
    # (wrapping around), squared
    rng = np.random.default_rng(0)

    def fields(n: int) -> tuple[np.ndarray, np.ndarray]:
        return _ring_fields(rng, n)

    x_train, y_train = fields(48)
    x_test, y_test = fields(12)
    path = tmp_path / "field.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = {**TINY_SPEC, "dataset_id": "field", "finetune": {"epochs": 2, "lr": 1e-3}}
    result = run_job(
        spec,
        path,
        tmp_path / "work",
        bundle_dir=tmp_path / "bundle",
        device="cpu",
        resolved_overrides={"ensemble_members": 1},
    )
    assert result.resolved_spec["task_type"] == "dense_regression"
    assert result.resolved_spec["head_local_skip"] is True
    assert "each output position" in result.resolved_spec["reasons"]["head_local_skip"]
    # periodic inputs and targets: the stem wraps around, and the bundle rebuilds it so
    assert result.resolved_spec["embedder_circular"] is True
    assert "a periodic domain" in result.resolved_spec["reasons"]["embedder_circular"]
    weights = _weights(result.bundle_dir)
    skip = weights["head.skip.weight"]
    assert skip.shape == (1, result.resolved_spec["embedder_stem"], 1) and skip.abs().sum() > 0
    predictor = load_model(result.bundle_dir)
    assert (
        predictor.config["model"]["head"]["skip_features"] == result.resolved_spec["embedder_stem"]
    )
    assert predictor.config["model"]["embedder"]["circular"] is True
    # a three-layer stem whose later layers trained away from their zero start
    assert result.resolved_spec["embedder_stem_layers"] == 3
    assert predictor.config["model"]["embedder"]["stem_layers"] == 3
    assert weights["embedder.stem.3.conv.weight"].abs().sum() > 0
    outputs = np.asarray(predictor.predict(x_test).predictions)
    assert outputs.shape == y_test.shape
    metrics = compute_metrics("dense_regression", y_test, outputs)
    assert metrics["relative_l2"] == pytest.approx(result.metrics["test"]["relative_l2"], rel=1e-4)
