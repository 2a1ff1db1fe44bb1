"""Stage 3 (refine), the exported bundle and the predictor, on a tiny random backbone."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from orca_engine import checkpoint
from orca_engine import refine as refine_module
from orca_engine.backbones import create_backbone
from orca_engine.checkpoint import load_weights, save_bundle, save_weights
from orca_engine.data import Dataset, DatasetInfo, LabelMap, Normaliser
from orca_engine.device import out_of_memory_as_error
from orca_engine.embedders import KernelBank
from orca_engine.errors import DataError, JobCancelled, OutOfMemory
from orca_engine.model import OrcaModel, build_model
from orca_engine.predict import Predictor, load_model
from orca_engine.progress import Callbacks
from orca_engine.refine import build_optimizer, lr_at, refine
from orca_engine.specs import ResolvedSpec

LENGTH = 24
CLASSES = ["down", "up"]  # original labels are strings: predictions must come back as strings


class Untouchable:
    """Stands in for the test split: any read fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"refine touched the test split ({name})")

    def __len__(self) -> int:
        raise AssertionError("refine touched the test split (len)")

    def __getitem__(self, item: Any) -> Any:
        raise AssertionError("refine touched the test split (getitem)")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("refine touched the test split (array)")


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Class = sign of a small offset buried in noise: learnable, but not at step 0.
    y = rng.integers(0, 2, n)
    x = 0.5 * (2 * y[:, None, None] - 1) + rng.normal(size=(n, 1, LENGTH))
    return x.astype(np.float32), y.astype(np.int64)


def make_dataset(seed: int = 0, n_train: int = 96, n_val: int = 48) -> Dataset:
    rng = np.random.default_rng(seed)
    x_train, y_train = _split(n_train, rng)
    x_val, y_val = _split(n_val, rng)
    info = DatasetInfo(
        format="npz",
        input_kind="seq1d",
        sample_shape=(1, LENGTH),
        label_shape=(),
        task_type="classification",
        n_classes=2,
        classes=list(CLASSES),
        splits={"train": n_train, "val": n_val, "test": 10},
        label_kind="text",
    )
    return Dataset(
        info=info,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=Untouchable(),  # type: ignore[arg-type]
        y_test=Untouchable(),  # type: ignore[arg-type]
        label_map=LabelMap(CLASSES),
    )


def make_rspec(**changes: Any) -> ResolvedSpec:
    values: dict[str, Any] = {
        "task_type": "classification",
        "metric": "accuracy",
        "backbone": "tiny-bert",
        "source": "english-text",
        "distance": "none",
        "align_epochs": 0,
        "align_auto": False,
        "max_samples": 100,
        "finetune_mode": "full",
        "finetune_epochs": 4,
        "lr": 3e-3,
        "embedder_lr": 1e-3,
        "batch_size": 16,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "warmup_fraction": 0.1,
        "early_stopping_patience": 10,
        "token_budget": 8,
        "seed": 0,
    }
    values.update(changes)
    return ResolvedSpec(**values)


def make_model(dataset: Dataset, seed: int = 0) -> OrcaModel:
    torch.manual_seed(seed)
    return build_model(
        info=dataset.info,
        task_type="classification",
        out_dim=2,
        backbone=create_backbone("tiny-bert"),
        token_budget=8,
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- schedule ----------------------------------------------------------------------------------


def test_lr_warms_up_then_decays_to_a_floor_and_is_never_negative() -> None:
    base, total, warmup = 1e-3, 100, 10
    lrs = [
        lr_at(step, base_lr=base, warmup_steps=warmup, total_steps=total, min_ratio=0.01)
        for step in range(total + 20)
    ]
    assert all(lr >= 0 for lr in lrs)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warmup])), "warmup rises"
    assert lrs[0] > 0, "the first step already learns"
    assert math.isclose(lrs[warmup - 1], base) and math.isclose(lrs[warmup], base)
    decay = lrs[warmup:total]
    assert all(a >= b for a, b in itertools.pairwise(decay)), "cosine decay never rises"
    assert math.isclose(lrs[total - 1], base * 0.01) and math.isclose(lrs[-1], base * 0.01)
    # No warmup and a zero floor: still never negative, ends at exactly zero.
    no_floor = [
        lr_at(s, base_lr=1.0, warmup_steps=0, total_steps=7, min_ratio=0.0) for s in range(10)
    ]
    assert no_floor[0] == 1.0 and min(no_floor) == 0.0
    with pytest.raises(ValueError):
        lr_at(0, base_lr=1.0, warmup_steps=0, total_steps=10, min_ratio=-0.5)


# --- refine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["layernorm", "frozen"])
def test_partial_modes_change_only_their_parameters(mode: str) -> None:
    dataset = make_dataset(n_train=32, n_val=16)
    model = make_model(dataset)
    before = snapshot(model)
    refine(model, dataset, make_rspec(finetune_mode=mode, finetune_epochs=1), device="cpu")
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # The backbone's own input embedding layer never sees target data (the embedder replaces it).
    norms = {
        f"backbone.{n}"
        for n in model.backbone.norm_parameter_names()
        if not n.startswith("model.embeddings.")
    }
    if mode == "frozen":
        expected = {name for name in before if name.startswith("head.")}
    else:
        expected = {n for n in before if n.startswith(("head.", "embedder.")) or n in norms}
    assert changed == expected
    # Attention / feed-forward weights of the body stay pretrained in both modes.
    assert not any(name.endswith(("query.weight", "dense.weight")) for name in changed)


def test_refine_beats_chance_selects_on_val_and_never_reads_test() -> None:
    dataset = make_dataset()
    events: list[str] = []

    class Recorder(Callbacks):
        def event(
            self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None
        ) -> None:
            events.append(message)

    result = refine(make_model(dataset), dataset, make_rspec(), device="cpu", callbacks=Recorder())
    val_accuracy = [epoch["val"]["accuracy"] for epoch in result.history]
    assert len(result.history) == 4 and not result.stopped_early
    assert result.best_val["accuracy"] >= 0.75, val_accuracy  # chance is 0.5
    # Best epoch = top val metric, ties broken by the lower val loss, then the earlier epoch.
    keys = [(h["val"]["accuracy"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == keys.index(max(keys)) + 1
    assert result.best_val == result.history[result.best_epoch - 1]["val"]
    assert all(t.device.type == "cpu" for t in result.best_state.values())
    assert sum("epoch" in message and "val accuracy" in message for message in events) == 4


def test_early_stopping_stops_after_patience_epochs() -> None:
    dataset = make_dataset(n_train=32, n_val=16)
    # lr tiny: val accuracy cannot improve after the first epoch.
    rspec = make_rspec(lr=1e-9, finetune_epochs=8, early_stopping_patience=2)
    result = refine(make_model(dataset), dataset, rspec, device="cpu")
    assert result.stopped_early
    # patience 2 after the best epoch, but never before half of the 8 epochs
    assert len(result.history) == max(result.best_epoch + 2, 4) < 8


class CancelAfter(Callbacks):
    """Cancels the job once ``steps`` optimizer steps have been checked."""

    def __init__(self, steps: int) -> None:
        self.steps_left = steps

    def check_cancelled(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise JobCancelled()


def _killed_in_epoch_3(dataset: Dataset, rspec: ResolvedSpec, state_dir: Path) -> None:
    with pytest.raises(JobCancelled):
        refine(
            make_model(dataset),
            dataset,
            rspec,
            device="cpu",
            callbacks=CancelAfter(7),
            state_dir=state_dir,
        )


def _assert_same_run(model: nn.Module, result: Any, straight: nn.Module, expected: Any) -> None:
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert result.best_state.keys() == expected.best_state.keys()
    for name, tensor in expected.best_state.items():
        assert torch.equal(tensor, result.best_state[name]), name
    assert result.best_epoch == expected.best_epoch
    assert [h["val"] for h in result.history] == [h["val"] for h in expected.history]


def test_refine_resumed_after_a_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_epochs=4)  # 3 steps per epoch
    straight = make_model(dataset)
    expected = refine(straight, dataset, rspec, device="cpu")

    # Killed in the middle of epoch 3: epoch 1 is on disk (2 as well if writing was cheap next
    # to it), epoch 3 is lost.
    _killed_in_epoch_3(dataset, rspec, tmp_path)
    assert (tmp_path / "refine_state.pt").exists()
    resumed_model = make_model(dataset, seed=123)  # a fresh process: different init, same file
    resumed = refine(resumed_model, dataset, rspec, device="cpu", state_dir=tmp_path)
    _assert_same_run(resumed_model, resumed, straight, expected)


def test_a_layernorm_resume_file_leaves_the_frozen_weights_out_and_resumes_the_same(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_mode="layernorm", finetune_epochs=4)
    straight = make_model(dataset)
    expected = refine(straight, dataset, rspec, device="cpu")

    _killed_in_epoch_3(dataset, rspec, tmp_path)
    saved = torch.load(tmp_path / "refine_state.pt", weights_only=True)
    trains = {name for name, p in straight.named_parameters() if p.requires_grad}
    frozen = {name for name, p in straight.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    assert set(saved["frozen_names"]) == frozen
    assert trains <= set(saved["model"]) and not frozen & set(saved["model"])
    assert not frozen & set(saved["best_state"])
    # The pipeline rebuilds the same frozen weights (seeded build, the aligned embedder): the
    # resumed run supplies them and ends exactly where the uninterrupted one did.
    resumed_model = make_model(dataset)
    resumed = refine(resumed_model, dataset, rspec, device="cpu", state_dir=tmp_path)
    _assert_same_run(resumed_model, resumed, straight, expected)


def test_a_resume_onto_other_frozen_weights_starts_refinement_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_mode="layernorm", finetune_epochs=4)
    _killed_in_epoch_3(dataset, rspec, tmp_path)
    # A backbone that changed on disk between the kill and the resume: its frozen weights are
    # not the ones the saved LayerNorms and head were trained beside, so nothing is resumed.
    other = make_model(dataset, seed=123)
    straight_other = make_model(dataset, seed=123)
    expected = refine(straight_other, dataset, rspec, device="cpu")
    events: list[str] = []

    class Recorder(Callbacks):
        def event(self, message: str, *, kind: str = "log", data: Any = None) -> None:
            events.append(message)

    with caplog.at_level("WARNING", logger="orca_engine.refine"):
        result = refine(
            other, dataset, rspec, device="cpu", callbacks=Recorder(), state_dir=tmp_path
        )
    assert "frozen weights changed" in caplog.text
    assert not any("resumes after" in message for message in events)
    _assert_same_run(other, result, straight_other, expected)


def test_a_whole_model_resume_file_of_the_earlier_format_still_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_mode="layernorm", finetune_epochs=4)
    straight = make_model(dataset)
    expected = refine(straight, dataset, rspec, device="cpu")
    with monkeypatch.context() as patched:  # a job killed under the engine before format 2
        patched.setattr(refine_module, "SLIM_STATE", False)
        patched.setattr(refine_module, "STATE_FORMAT_VERSION", 1)
        _killed_in_epoch_3(dataset, rspec, tmp_path)
    saved = torch.load(tmp_path / "refine_state.pt", weights_only=True)
    assert saved["format_version"] == 1 and set(saved["model"]) == set(straight.state_dict())
    resumed_model = make_model(dataset)
    resumed = refine(resumed_model, dataset, rspec, device="cpu", state_dir=tmp_path)
    _assert_same_run(resumed_model, resumed, straight, expected)


def test_the_optimizer_groups_rates_and_decay_and_runs_fused_on_the_cpu() -> None:
    dataset = make_dataset()
    model = make_model(dataset)
    optimizer = build_optimizer(model, make_rspec(lr=1e-4))
    assert optimizer.defaults["fused"] is True  # one kernel per step, not a loop over tensors
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        backbone = group_names[0].startswith("backbone.")
        assert all(n.startswith("backbone.") == backbone for n in group_names), group_names
        assert group["lr"] == group["base_lr"] == (1e-4 if backbone else 1e-3)
        decayed = group["weight_decay"] > 0
        assert all(
            (p.ndim >= 2 and "norm" not in n.lower()) == decayed
            for n, p in zip(group_names, group["params"], strict=True)
        ), group_names
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}
    # One step of the fused kernel moves the weights as the per-tensor loop does, to rounding.
    looped_model = make_model(dataset)
    looped_model.load_state_dict(model.state_dict())
    looped = torch.optim.AdamW(
        [
            {
                **g,
                "params": [
                    dict(looped_model.named_parameters())[names[id(p)]] for p in g["params"]
                ],
                "fused": None,  # each group carries the options it was built with
                "foreach": False,
            }
            for g in optimizer.param_groups
        ],
        lr=1e-4,
    )
    assert not any(group["fused"] for group in looped.param_groups)
    x = torch.from_numpy(dataset.x_train[:8])
    for net, opt in ((model, optimizer), (looped_model, looped)):
        net.train()
        torch.manual_seed(0)
        net(x).sum().backward()
        opt.step()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, looped_model.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_a_slow_resume_write_waits_until_training_has_taken_twenty_times_as_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_epochs=6, early_stopping_patience=0)
    written: list[int] = []
    real_save = refine_module.save_stage

    def slow_save(path: Path, state: dict[str, Any]) -> None:
        time.sleep(0.5)  # a slow disk: the next write waits for 10 s of training
        real_save(path, state)
        written.append(int(state["epoch"]))

    monkeypatch.setattr(refine_module, "save_stage", slow_save)
    straight = refine(make_model(dataset), dataset, rspec, device="cpu", state_dir=tmp_path)
    # The tiny epochs take milliseconds: only the first and the last epoch are written.
    assert written == [1, 6]
    # The last write says the run is over: a rerun trains nothing and hands back its result.
    rerun = refine(make_model(dataset, seed=9), dataset, rspec, device="cpu", state_dir=tmp_path)
    assert written == [1, 6]
    assert rerun.history == straight.history and rerun.best_epoch == straight.best_epoch
    for name, tensor in straight.best_state.items():
        assert torch.equal(tensor, rerun.best_state[name]), name


# --- checkpoint + predict ----------------------------------------------------------------------


def _bundle_config(dataset: Dataset, normaliser: Normaliser) -> dict[str, Any]:
    assert dataset.label_map is not None
    return {
        "task_type": "classification",
        "sample_shape": list(dataset.info.sample_shape),
        "label_shape": [],
        "normaliser": normaliser.to_dict(),
        "target_scaler": None,
        "label_map": dataset.label_map.to_dict(),
        "resolved_spec": make_rspec().to_dict(),
    }


def test_bundle_round_trip_predicts_identically_in_original_labels(tmp_path: Path) -> None:
    dataset = make_dataset(n_train=32, n_val=40)
    model = make_model(dataset).eval()
    normaliser = Normaliser.fit(dataset.x_train)
    bundle = tmp_path / "bundle"
    save_bundle(
        bundle,
        model=model,
        config=_bundle_config(dataset, normaliser),
        metrics={"val": {"accuracy": 0.5}},
        curves={"refine": []},
    )
    assert sorted(p.name for p in bundle.iterdir()) == [
        "config.json",
        "curves.json",
        "metrics.json",
        "model.safetensors",
    ]
    predictor = load_model(bundle)
    with torch.inference_mode():
        expected_logits = model(torch.from_numpy(normaliser.transform(dataset.x_val))).numpy()
    prediction = predictor.predict(dataset.x_val)
    assert prediction.predictions == [CLASSES[i] for i in expected_logits.argmax(axis=1)]
    assert set(prediction.predictions) <= set(CLASSES)
    assert np.allclose(np.asarray(prediction.probabilities).sum(axis=1), 1.0)
    np.testing.assert_array_equal(predictor.outputs(dataset.x_val), expected_logits)
    # One sample (no batch axis) is answered as a batch of one, as nested JSON-able lists.
    single = predictor.predict(dataset.x_val[0].tolist())
    assert single.predictions == prediction.predictions[:1]


def _small_saved_model(tmp_path: Path) -> tuple[Dataset, Predictor]:
    """A small untrained classifier saved as a bundle and loaded back, with its dataset."""
    dataset = make_dataset(n_train=16, n_val=8)
    bundle = save_bundle(
        tmp_path / "bundle",
        model=make_model(dataset),
        config=_bundle_config(dataset, Normaliser.fit(dataset.x_train)),
        metrics={},
        curves={},
    )
    return dataset, load_model(bundle)


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (
            np.zeros((2, 1, LENGTH + 1)),
            "expected one sample of shape (1, 24) or a batch of shape (N, 1, 24); got shape (2, 1, 25)",
        ),
        (np.zeros((LENGTH,)), "got shape (24,)"),
        (np.array([["a"] * LENGTH]), "must be numeric"),
        (np.full((1, LENGTH), np.nan), "NaN or infinite"),
        ([[0.0] * LENGTH, [0.0]], "numeric"),
    ],
)
def test_predictor_rejects_bad_inputs_with_a_clear_message(
    tmp_path: Path, bad_input: Any, message: str
) -> None:
    _, predictor = _small_saved_model(tmp_path)
    with pytest.raises(DataError) as error:
        predictor.predict(bad_input)
    assert message in str(error.value)
    assert error.value.code == "dataset_invalid"


def test_predictor_reads_trailing_nan_as_the_padding_of_shorter_series(tmp_path: Path) -> None:
    dataset, predictor = _small_saved_model(tmp_path)
    padded = np.array(dataset.x_val[:3], dtype=np.float64)
    padded[0, :, 20:] = np.nan  # shorter series, NaN after their last value, as uploads allow
    padded[2, :, 12:] = np.nan
    zero_filled = np.nan_to_num(padded, nan=0.0)
    np.testing.assert_array_equal(predictor.outputs(padded), predictor.outputs(zero_filled))
    gap = zero_filled.copy()
    gap[1, 0, 5] = np.nan  # a value follows the NaN: a gap, not padding
    with pytest.raises(DataError, match="trailing padding"):
        predictor.predict(gap)
    infinite = zero_filled.copy()
    infinite[1, 0, -1] = np.inf
    with pytest.raises(DataError, match="1 NaN or infinite"):
        predictor.predict(infinite)
    # JSON has no NaN: nested lists pad with null (None), read the same way
    as_json = [[[None if np.isnan(v) else float(v) for v in row] for row in s] for s in padded]
    np.testing.assert_array_equal(predictor.outputs(as_json), predictor.outputs(zero_filled))
    as_json[1][0][5] = None  # a gap again
    with pytest.raises(DataError, match=r"NaN \(JSON null\) is read only as trailing padding"):
        predictor.predict(as_json)
    as_json[1][0][5] = "0.5"  # text is not a number, with or without nulls around it
    with pytest.raises(DataError, match="must be numeric"):
        predictor.predict(as_json)


def test_a_failed_save_leaves_no_half_written_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = make_dataset(n_train=16, n_val=8)
    model = make_model(dataset)
    config = _bundle_config(dataset, Normaliser.fit(dataset.x_train))
    target = tmp_path / "bundle"
    real_write_json = checkpoint.write_json

    def crash_on_metrics(path: Path, payload: Any) -> None:
        if path.name == "metrics.json":
            raise OSError("disk full")
        real_write_json(path, payload)

    monkeypatch.setattr(checkpoint, "write_json", crash_on_metrics)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(target, model=model, config=config, metrics={"a": 1}, curves={})
    assert list(tmp_path.iterdir()) == [], "neither the bundle nor its temp dir is left behind"

    # An existing complete bundle survives a failed re-save untouched.
    monkeypatch.setattr(checkpoint, "write_json", real_write_json)
    save_bundle(target, model=model, config=config, metrics={"version": 1}, curves={})
    monkeypatch.setattr(checkpoint, "write_json", crash_on_metrics)
    with pytest.raises(OSError):
        save_bundle(target, model=model, config=config, metrics={"version": 2}, curves={})
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert (target / "metrics.json").read_text().count('"version": 1') == 1


def test_tied_weights_are_stored_once_and_reloaded_strictly(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Embedding(10, 4)
            self.decoder = nn.Linear(4, 10, bias=False)
            self.decoder.weight = self.encoder.weight

    source = Tied()
    save_weights(source, tmp_path / "w.safetensors")
    target = Tied()
    load_weights(target, tmp_path / "w.safetensors")
    assert torch.equal(target.decoder.weight, source.encoder.weight)
    assert target.decoder.weight is target.encoder.weight


def test_identical_tensors_are_stored_once_and_shared_only_when_asked(tmp_path: Path) -> None:
    class Pair(nn.Module):
        """Two members over one frozen body: equal body weights, different heads."""

        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(
                nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)) for _ in range(2)
            )

    source = Pair()
    body = source.members[0][0]
    source.members[1][0].load_state_dict(body.state_dict())
    with torch.no_grad():  # same shape, different values: must stay two tensors
        source.members[1][1].weight.copy_(source.members[0][1].weight + 1.0)
    path = tmp_path / "w.safetensors"
    save_weights(source, path)
    stored = load_file(str(path))
    assert "members.1.0.weight" not in stored and "members.1.0.bias" not in stored
    assert {"members.0.0.weight", "members.1.1.weight", "members.1.1.bias"} <= stored.keys()

    for share in (False, True):
        target = Pair()
        load_weights(target, path, share_identical=share)
        for name, tensor in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], tensor), name
        shared = target.members[1][0].weight is target.members[0][0].weight
        assert shared is share
        assert target.members[1][1].weight is not target.members[0][1].weight


def test_device_oom_becomes_an_actionable_error() -> None:
    with (
        pytest.raises(OutOfMemory, match=r"smaller finetune\.batch_size") as error,
        out_of_memory_as_error("try a smaller finetune.batch_size"),
    ):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert error.value.code == "out_of_memory"


def test_refinement_ends_with_the_same_weights_whether_the_bank_remembers_or_not(
    monkeypatch: pytest.MonkeyPatch, count_bank_rows: Callable[[KernelBank], list[int]]
) -> None:
    from orca_engine import embedders

    dataset = make_dataset(n_train=48, n_val=24)
    rspec = make_rspec(finetune_mode="layernorm", finetune_epochs=3)

    def bank_model() -> tuple[OrcaModel, list[int]]:
        torch.manual_seed(0)
        model = build_model(
            info=dataset.info,
            task_type="classification",
            out_dim=2,
            backbone=create_backbone("tiny-bert"),
            token_budget=8,
            stem_channels=4,
            kernel_bank=True,
            kernel_summary=True,
            flat_head=True,
        )
        model.embedder.calibrate(torch.from_numpy(dataset.x_train))
        assert model.embedder.bank is not None
        return model, count_bank_rows(model.embedder.bank)

    remembering, computed = bank_model()
    refine(remembering, dataset, rspec, device="cpu")
    # each training and validation series once, not once per epoch; forgotten afterwards
    assert sum(computed) == 48 + 24
    assert remembering.embedder.bank not in embedders._MEMOS
    monkeypatch.setattr(embedders, "KERNEL_BANK_MEMO_BYTES", 0)
    computing, computed = bank_model()
    refine(computing, dataset, rspec, device="cpu")
    assert sum(computed) == 3 * (48 + 24)
    for name, tensor in computing.state_dict().items():
        assert torch.equal(tensor, remembering.state_dict()[name]), name
