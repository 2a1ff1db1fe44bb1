"""The default recipe's moving parts: augmentation, weight averaging, embedder start, resolution.

These pin behaviour (what ``auto`` resolves to, what each piece does to a batch or a model), not
scores; docs/QUALITY.md has the measured effects.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from orca_engine.augment import augment_batch
from orca_engine.backbones import create_backbone
from orca_engine.embedders import (
    IMAGE_STEM_MAX_KERNEL,
    RETIRED_OPTIONS,
    create_embedder,
    embedder_from_config,
    stem_kernel,
)
from orca_engine.errors import SpecError
from orca_engine.heads import PooledHead, create_head, head_from_config
from orca_engine.refine import WeightAverage, mixup_pairs, refine
from orca_engine.specs import (
    DENSE_EPOCH_FACTOR,
    DENSE_FULL_LR_FACTOR,
    EMA_HORIZON_STEPS,
    LAYERNORM_BELOW_ROWS,
    RETIRED_FIELDS,
    SEAM_SAMPLE_ROWS,
    JobSpec,
    ResolvedSpec,
    augmentation_applies,
    ema_decay_for,
    periodic_domain,
    resolve_spec,
    seam_ratios,
)
from tests.engine.test_refine_checkpoint import make_dataset, make_model, make_rspec
from tests.engine.test_specs import REGRESSION, _info


def test_sequence_augmentation_keeps_shape_and_is_seeded() -> None:
    # smooth series, as real ones are: a shift of a few steps keeps them correlated
    x = torch.sin(torch.linspace(0, 6.28, 100)).expand(16, 2, 100) * torch.rand(16, 2, 1)
    torch.manual_seed(3)
    first = augment_batch(x, input_kind="seq1d", task_type="classification")
    torch.manual_seed(3)
    again = augment_batch(x, input_kind="seq1d", task_type="classification")
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert not torch.allclose(first, x)
    # a perturbation, not a new signal: still strongly correlated with the original
    correlation = torch.corrcoef(torch.stack([first.flatten(), x.flatten()]))[0, 1]
    assert correlation > 0.5


def test_sequence_shift_repeats_the_edge_instead_of_wrapping() -> None:
    ramp = torch.arange(50, dtype=torch.float32).reshape(1, 1, 50).repeat(64, 1, 1)
    torch.manual_seed(0)
    shifted = augment_batch(ramp, input_kind="seq1d", task_type="classification")
    # scale and jitter keep a ramp increasing; wrapping would put 49 next to 0
    steps = shifted[:, 0, 1:] - shifted[:, 0, :-1]
    assert (steps > -3).all()


def test_image_translation_moves_content_within_an_eighth() -> None:
    image = torch.zeros(32, 1, 16, 16)
    image[:, :, 8, 8] = 1.0
    torch.manual_seed(1)
    moved = augment_batch(image, input_kind="image2d", task_type="classification")
    assert moved.shape == image.shape
    rows, cols = (moved[:, 0] == 1.0).nonzero()[:, 1:].T
    assert len(rows) == 32  # the pixel is never pushed out by a 2-pixel move
    assert (rows - 8).abs().max() <= 2 and (cols - 8).abs().max() <= 2
    assert ((rows != 8) | (cols != 8)).any()


@pytest.mark.parametrize(
    ("input_kind", "task_type", "shape"),
    [
        ("tabular", "classification", (8, 5)),
        ("seq1d", "dense_regression", (8, 1, 20)),
        ("image2d", "dense_classification", (8, 1, 6, 6)),
    ],
)
def test_no_augmentation_where_no_move_preserves_the_label(
    input_kind: str, task_type: str, shape: tuple[int, ...]
) -> None:
    x = torch.randn(*shape)
    assert not augmentation_applies(input_kind, task_type)
    assert augment_batch(x, input_kind=input_kind, task_type=task_type) is x


def test_weight_average_trails_the_live_weights() -> None:
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(5):
        average.update()
    kept = average.model.weight
    # strictly between where it started and where the live weights are now
    assert (kept > start).all() and (kept < model.weight).all()
    assert not kept.requires_grad
    restored = WeightAverage(model, decay=0.9)
    restored.load(average.state())
    assert torch.equal(restored.model.weight, kept) and restored.updates == 5


def test_ema_horizon_is_a_tenth_of_the_steps_within_bounds() -> None:
    low, high = EMA_HORIZON_STEPS
    assert ema_decay_for(1000) == pytest.approx(1 - 1 / 100)
    assert ema_decay_for(20) == pytest.approx(1 - 1 / low)
    assert ema_decay_for(10**6) == pytest.approx(1 - 1 / high)


def test_embedder_starts_at_the_backbone_input_scale() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    source_norm = backbone.input_norm()
    assert source_norm is not None
    with torch.no_grad():
        source_norm.weight.fill_(0.5)
        source_norm.bias.fill_(0.25)
    embedder = create_embedder("seq1d", (1, 40), backbone, token_budget=8)
    assert torch.equal(embedder.norm.weight, source_norm.weight)
    assert torch.equal(embedder.norm.bias, source_norm.bias)
    # a copy, not a shared parameter: training the embedder leaves the backbone alone
    assert embedder.norm.weight.data_ptr() != source_norm.weight.data_ptr()


def test_auto_recipe_resolves_to_the_documented_values() -> None:
    series = resolve_spec(JobSpec(dataset_id="d"), _info())
    # Measured and not adopted (docs/QUALITY.md): augmentation, smoothing, weight averaging.
    assert (series.augment, series.label_smoothing, series.ema_decay) == (False, 0.0, 0.0)
    assert "measured" in series.reasons["augment"]
    assert {"augment", "label_smoothing", "ema_decay"} <= set(series.reasons)
    # 40 training rows (10 held out), batch 8: 5 steps per epoch, ~500 steps on CPU
    assert series.batch_size == 8
    assert series.finetune_epochs * math.ceil(40 / series.batch_size) == 500

    # series: 8 tokens through a 64-channel stem; 10 validation series -> late selection
    assert (series.token_budget, series.embedder_stem, series.selection_start) == (8, 64, 0.5)
    assert {"token_budget", "embedder_stem", "selection_start"} <= set(series.reasons)
    big = resolve_spec(JobSpec(dataset_id="d"), _info(splits={"train": 5000, "test": 100}))
    assert big.selection_start == 0.0  # 1,000 validation rows: any epoch may be selected
    on_gpu = resolve_spec(JobSpec(dataset_id="d"), _info(), device="cuda")
    assert on_gpu.token_budget == 8
    # point tasks on series read every token; other inputs, vision bodies and dense maps average
    assert series.head_flat is True and "every token" in series.reasons["head_flat"]
    assert resolve_spec(JobSpec(dataset_id="d", backbone="tiny-vit"), _info()).head_flat is False
    # ... and also through the fixed kernel bank; vision bodies, images, tables, dense maps don't
    assert series.embedder_kernel_bank is True
    assert "fixed filters" in series.reasons["embedder_kernel_bank"]
    # ... whose shares over the whole series the head reads too, wherever there is a bank
    assert series.head_kernel_summary is True
    assert "whole series" in series.reasons["head_kernel_summary"]
    on_vit = resolve_spec(JobSpec(dataset_id="d", backbone="tiny-vit"), _info())
    assert (
        on_vit.embedder_kernel_bank is False and "vision" in on_vit.reasons["embedder_kernel_bank"]
    )

    # small images on the text backbone: 4 tokens through a stem; larger ones keep patches small
    digits = _info(input_kind="image2d", sample_shape=(1, 8, 8))
    image = resolve_spec(JobSpec(dataset_id="d"), digits)
    assert (image.token_budget, image.embedder_stem) == (4, 64)
    assert "conv stem" in image.reasons["token_budget"]
    mnist_like = _info(input_kind="image2d", sample_shape=(1, 28, 28))
    assert resolve_spec(JobSpec(dataset_id="d"), mnist_like).token_budget == 16  # 4 x 4 of 7 px
    huge = _info(input_kind="image2d", sample_shape=(3, 512, 512))
    assert resolve_spec(JobSpec(dataset_id="d"), huge).token_budget == 64  # the CPU budget caps it
    assert resolve_spec(JobSpec(dataset_id="d"), huge, device="cuda").token_budget == 128
    # a vision backbone reads images with its own patches, and dense maps keep one-pixel detail
    vision = resolve_spec(JobSpec(dataset_id="d", backbone="tiny-vit"), digits)
    assert (vision.token_budget, vision.embedder_stem) == (64, 0)
    dense = _info(
        input_kind="image2d",
        sample_shape=(1, 8, 8),
        label_shape=(8, 8),
        **{**REGRESSION, "task_type": "dense_regression"},
    )
    assert resolve_spec(JobSpec(dataset_id="d"), dense).embedder_stem == 0

    assert resolve_spec(JobSpec(dataset_id="d"), dense).head_flat is False
    assert image.head_flat is False
    table = resolve_spec(JobSpec(dataset_id="d"), _info(input_kind="tabular", sample_shape=(30,)))
    # tables read every column's token side by side, from a mix of all the body's layers;
    # series keep the last layer (the mix was level there), images and dense maps the mean
    assert table.augment is False and table.head_flat is True and table.head_layer_mix is True
    assert "column" in table.reasons["head_flat"]
    assert "every layer" in table.reasons["head_layer_mix"]
    assert not (series.head_layer_mix or image.head_layer_mix)
    table_on_vit = resolve_spec(
        JobSpec(dataset_id="d", backbone="tiny-vit"),
        _info(input_kind="tabular", sample_shape=(30,)),
    )
    assert table_on_vit.head_flat is False and table_on_vit.head_layer_mix is False
    assert not (table.embedder_kernel_bank or image.embedder_kernel_bank)
    assert not (
        table.head_kernel_summary or image.head_kernel_summary or on_vit.head_kernel_summary
    )
    dense_series = _info(label_shape=(150,), **{**REGRESSION, "task_type": "dense_regression"})
    dense_resolved = resolve_spec(JobSpec(dataset_id="d"), dense_series)
    assert not (dense_resolved.embedder_kernel_bank or dense_resolved.head_kernel_summary)
    # dense series read the stem at every position beside the decoder; nothing else does
    assert dense_resolved.head_local_skip is True and dense_resolved.embedder_stem == 64
    assert "each output position" in dense_resolved.reasons["head_local_skip"]
    assert "only dense series" in series.reasons["head_local_skip"]
    dense_image = resolve_spec(JobSpec(dataset_id="d"), dense)
    assert not (series.head_local_skip or table.head_local_skip or dense_image.head_local_skip)
    # whether the stem wraps around is read from the data when the job starts (dense series)
    assert "from the training data" in dense_resolved.reasons["embedder_circular"]
    assert "only dense series" in series.reasons["embedder_circular"]
    assert not (dense_resolved.embedder_circular or series.embedder_circular)
    # dense series get a three-layer stem; every other stem keeps one layer
    assert dense_resolved.embedder_stem_layers == 3
    assert "dilated 2 and 4" in dense_resolved.reasons["embedder_stem_layers"]
    assert (series.embedder_stem_layers, image.embedder_stem_layers) == (1, 1)
    assert dense_image.embedder_stem_layers == 1 and table.embedder_stem_layers == 1
    assert "only dense series" in series.reasons["embedder_stem_layers"]
    assert (table.token_budget, table.embedder_stem) == (64, 0)
    regression = resolve_spec(JobSpec(dataset_id="d"), _info(**REGRESSION))
    assert regression.label_smoothing == 0.0
    # the same 10 validation rows, but a continuous error: any epoch may be selected
    assert regression.selection_start == 0.0
    assert "any epoch" in regression.reasons["selection_start"]


def test_auto_mode_tunes_only_layernorms_on_small_training_sets() -> None:
    def resolved_mode(train_rows: int, mode: str = "auto") -> tuple[str, float]:
        splits = {"train": train_rows, "val": 20, "test": 10}
        spec = {"dataset_id": "d", "finetune": {"mode": mode}}
        resolved = resolve_spec(spec, _info(splits=splits, has_val=True))
        return resolved.finetune_mode, resolved.lr

    assert JobSpec(dataset_id="d").finetune.mode == "auto"
    assert resolved_mode(LAYERNORM_BELOW_ROWS - 1) == ("layernorm", pytest.approx(1e-3))
    assert resolved_mode(LAYERNORM_BELOW_ROWS) == ("full", pytest.approx(1e-4))
    # an explicit mode is kept whatever the size, and is not explained
    assert resolved_mode(30, "full")[0] == "full"
    assert resolved_mode(5000, "layernorm")[0] == "layernorm"
    small = resolve_spec(JobSpec(dataset_id="d"), _info())
    assert "LayerNorms" in small.reasons["finetune_mode"]
    explicit = resolve_spec({"dataset_id": "d", "finetune": {"mode": "full"}}, _info())
    assert "finetune_mode" not in explicit.reasons


def test_auto_mode_trains_every_weight_on_dense_tasks_of_any_size() -> None:
    dense = _info(label_shape=(150,), **{**REGRESSION, "task_type": "dense_regression"})
    resolved = resolve_spec(JobSpec(dataset_id="d"), dense)
    assert resolved.finetune_mode == "full" and "dense task" in resolved.reasons["finetune_mode"]
    # ... at three times the rate a point task training every weight gets
    assert resolved.lr == pytest.approx(DENSE_FULL_LR_FACTOR * 1e-4) and resolved.lr == 3e-4
    assert "dense task" in resolved.reasons["lr"]
    large = {"splits": {"train": 5000, "val": 0, "test": 150}}
    large_point = resolve_spec(JobSpec(dataset_id="d"), _info(**large, **REGRESSION))
    assert large_point.finetune_mode == "full" and large_point.lr == pytest.approx(1e-4)
    # ... and twice the epochs a point task of the same size gets
    point = resolve_spec(JobSpec(dataset_id="d"), _info(**REGRESSION))
    assert resolved.finetune_epochs == DENSE_EPOCH_FACTOR * point.finetune_epochs == 2 * 100
    assert "dense task" in resolved.reasons["finetune_epochs"]
    fixed = resolve_spec({"dataset_id": "d", "finetune": {"epochs": 7}}, dense)
    assert fixed.finetune_epochs == 7
    # the rule is the task's, not the size's: the same small set as a point task stays on
    # LayerNorms, and an explicit mode still wins
    assert point.finetune_mode == "layernorm"
    explicit = resolve_spec({"dataset_id": "d", "finetune": {"mode": "layernorm"}}, dense)
    assert explicit.finetune_mode == "layernorm" and explicit.lr == pytest.approx(1e-3)
    # an explicit rate is taken as given
    rate = resolve_spec({"dataset_id": "d", "finetune": {"lr": 5e-5}}, dense)
    assert rate.finetune_mode == "full" and rate.lr == pytest.approx(5e-5)


# --- embedder stem, late selection, mixup -----------------------------------------------------


def test_flat_head_reads_each_token_in_its_place_and_survives_a_rebuild() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (1, 40), backbone, token_budget=8, stem_channels=8)
    flat = create_head(
        "classification", backbone=backbone, embedder=embedder, out_dim=3, label_shape=(), flat=True
    )
    pooled = create_head(
        "classification", backbone=backbone, embedder=embedder, out_dim=3, label_shape=()
    )
    assert (type(flat).__name__, type(pooled).__name__) == ("FlatHead", "PooledHead")
    hidden = torch.randn(2, embedder.n_tokens, backbone.output_dim)
    swapped = hidden[:, [1, 0, *range(2, embedder.n_tokens)]]
    # the mean forgets which token held a feature; the flat head does not
    torch.testing.assert_close(pooled(hidden), pooled(swapped))
    assert not torch.allclose(flat(hidden), flat(swapped))
    rebuilt = head_from_config(flat.config())
    rebuilt.load_state_dict(flat.state_dict())
    torch.testing.assert_close(rebuilt(hidden), flat(hidden))
    # a body that does not keep one output token per input token gets the mean
    vision = create_backbone("tiny-vit", allow_random_init=True)
    image_embedder = create_embedder("image2d", (3, 32, 32), vision, token_budget=64)
    assert isinstance(
        create_head(
            "classification",
            backbone=vision,
            embedder=image_embedder,
            out_dim=3,
            label_shape=(),
            flat=True,
        ),
        PooledHead,
    )


def test_layer_mix_head_reads_every_body_layer_and_survives_a_rebuild() -> None:
    from orca_engine.model import OrcaModel, model_from_config

    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (1, 40), backbone, token_budget=8, stem_channels=8)
    head = create_head(
        "classification",
        backbone=backbone,
        embedder=embedder,
        out_dim=3,
        label_shape=(),
        flat=True,
        layer_mix=True,
    )
    # tiny-bert has 2 layers: the body's input and both layers' outputs, mixed evenly at first
    assert backbone.n_layer_outputs == 3 and head.config()["layers"] == 3
    weights = head.layer_weights()
    assert weights is not None
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))
    model = OrcaModel(embedder, backbone, head).eval()
    x = torch.randn(4, 1, 40)
    tokens = embedder(x)
    layers = backbone.layer_outputs(tokens)
    assert len(layers) == 3
    torch.testing.assert_close(layers[0], tokens)  # the first is what the body was given
    torch.testing.assert_close(layers[-1], backbone(tokens))  # the last is its usual output
    torch.testing.assert_close(model(x), head.linear(torch.stack(layers).mean(0).flatten(1)))
    # the mix is learned: the head's logits get a gradient
    model(x).sum().backward()
    assert head.layer_logits is not None and head.layer_logits.grad is not None
    assert head.layer_logits.grad.abs().sum() > 0
    with torch.no_grad():
        head.layer_logits.copy_(torch.tensor([5.0, -5.0, 0.0]))
    rebuilt = model_from_config(model.config()).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the logits are saved and restored
    torch.testing.assert_close(rebuilt(x), model(x))
    # without the mix a flat head's config has no "layers" key: older bundles rebuild unchanged
    plain = create_head(
        "classification", backbone=backbone, embedder=embedder, out_dim=3, label_shape=(), flat=True
    )
    assert "layers" not in plain.config() and plain.layer_weights() is None
    # a body without per-layer outputs (the default) offers one: the mix is then a no-op
    vision = create_backbone("tiny-vit", allow_random_init=True)
    assert vision.n_layer_outputs == 1


def test_sequence_stem_keeps_the_token_count_and_survives_a_rebuild() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    plain = create_embedder("seq1d", (3, 150), backbone, token_budget=16)
    stem = create_embedder("seq1d", (3, 150), backbone, token_budget=16, stem_channels=8)
    x = torch.randn(2, 3, 150)
    assert plain(x).shape == stem(x).shape == (2, 15, backbone.embed_dim)  # patch 10
    assert plain.config()["stem_channels"] == 0 and stem.config()["stem_channels"] == 8
    # windows span about two patches, odd, within 3..15
    assert [stem_kernel(p) for p in (1, 3, 10, 200)] == [3, 7, 15, 15]
    rebuilt = embedder_from_config(stem.config(), backbone)
    rebuilt.load_state_dict(stem.state_dict())  # strict: same parameters, same shapes
    torch.testing.assert_close(rebuilt(x), stem(x))
    # bundles written before the stem existed have no key and rebuild without one
    old = {k: v for k, v in plain.config().items() if k != "stem_channels"}
    assert embedder_from_config(old, backbone).stem is None


def test_image_stem_keeps_the_grid_and_survives_a_rebuild() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    stem = create_embedder("image2d", (1, 8, 8), backbone, token_budget=16, stem_channels=8)
    plain = create_embedder("image2d", (1, 8, 8), backbone, token_budget=16)
    x = torch.randn(3, 1, 8, 8)
    assert stem(x).shape == plain(x).shape == (3, 16, backbone.embed_dim)  # 2 x 2 patches
    assert stem.config()["stem_channels"] == 8 and plain.stem is None
    assert [stem_kernel(p, largest=IMAGE_STEM_MAX_KERNEL) for p in (1, 2, 3, 16)] == [3, 5, 7, 7]
    rebuilt = embedder_from_config(stem.config(), backbone)
    rebuilt.load_state_dict(stem.state_dict())
    torch.testing.assert_close(rebuilt(x), stem(x))
    # a pixel reaches the tokens of its neighbouring patches through the stem, not beyond
    zero = torch.zeros(1, 1, 8, 8)
    bumped = zero.clone()
    bumped[0, 0, 2, 2] = 3.0  # top-left pixel of grid cell (1, 1); the 5 x 5 window spans 0..4
    moved = (stem(bumped) - stem(zero)).abs().sum(-1)[0].reshape(4, 4)
    assert moved[0, 0] > 0 and moved[1, 1] > 0 and moved[2, 2] > 0  # cells 0..2 see it
    assert moved[3].sum() == 0 and moved[:, 3].sum() == 0  # pixels 6..7: out of reach


def test_retired_levers_load_while_off_and_are_refused_when_on() -> None:
    # Specs and bundles stored before the unadopted levers were removed still load when the
    # levers were off (every user job); one that had a lever on is refused with its name.
    stored = resolve_spec(JobSpec(dataset_id="d"), _info()).to_dict()
    assert not RETIRED_FIELDS.keys() & stored.keys()
    old = {**stored, **RETIRED_FIELDS}
    assert ResolvedSpec.from_dict(old) == ResolvedSpec.from_dict(stored)
    with pytest.raises(SpecError, match="embedder_pooled") as caught:
        ResolvedSpec.from_dict({**old, "embedder_pooled": True})
    assert caught.value.param == "embedder_pooled"

    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (2, 40), backbone, token_budget=8, stem_channels=8)
    config = embedder.config()
    assert not RETIRED_OPTIONS & config.keys()
    with pytest.raises(SpecError, match="stem_scales"):
        embedder_from_config({**config, "stem_scales": 4}, backbone)


def test_stem_makes_tokens_depend_on_neighbouring_patches() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (1, 40), backbone, token_budget=8, stem_channels=8)
    x = torch.zeros(1, 1, 40)
    bumped = x.clone()
    bumped[0, 0, 5] = 3.0  # first step of patch 1 (patch length 5, stem window 11)
    moved = (embedder(bumped) - embedder(x)).abs().sum(-1)[0]
    assert moved[0] > 0 and moved[1] > 0 and moved[2] > 0  # the window reaches both neighbours
    assert torch.all(moved[3:] == 0)


def test_late_selection_never_picks_an_epoch_before_its_start() -> None:
    dataset = make_dataset(n_train=32, n_val=16)
    rspec = make_rspec(finetune_epochs=6, selection_start=0.5, early_stopping_patience=0)
    result = refine(make_model(dataset), dataset, rspec, device="cpu")
    assert len(result.history) == 6
    assert result.best_epoch >= 3
    keys = [(h["val"]["accuracy"], -h["val_loss"]) for h in result.history[2:]]
    assert result.best_epoch == keys.index(max(keys)) + 3


def test_mixup_pairs_are_seeded_weights_in_the_unit_interval() -> None:
    assert mixup_pairs(1, 0.4) is None and mixup_pairs(8, 0.0) is None
    torch.manual_seed(3)
    first = mixup_pairs(8, 0.4)
    torch.manual_seed(3)
    second = mixup_pairs(8, 0.4)
    assert first is not None and second is not None
    assert first[0] == second[0] and 0.0 <= first[0] <= 1.0
    assert torch.equal(first[1], second[1]) and sorted(first[1].tolist()) == list(range(8))


def test_mixup_changes_training_but_stays_reproducible() -> None:
    dataset = make_dataset(n_train=32, n_val=16)

    def run(alpha: float) -> dict[str, torch.Tensor]:
        rspec = make_rspec(finetune_epochs=2, mixup_alpha=alpha)
        return refine(make_model(dataset), dataset, rspec, device="cpu").best_state

    mixed, again, plain = run(0.4), run(0.4), run(0.0)
    assert all(torch.equal(mixed[k], again[k]) for k in mixed)
    assert any(not torch.equal(mixed[k], plain[k]) for k in mixed)


def test_the_seam_check_tells_a_periodic_domain_from_walls_and_gaps() -> None:
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    phases = rng.uniform(0, 2 * np.pi, size=(40, 2, 1))
    # a periodic domain sampled without its repeated end point: the seam is like any step
    ring = np.sin(grid + phases) + 0.3 * np.cos(3 * grid + 2 * phases)
    step, bend = seam_ratios(ring)
    assert 0.5 < step < 1.5 and 0.5 < bend < 1.5
    assert periodic_domain(ring, ring**2)[0] is True
    assert "a periodic domain" in periodic_domain(ring, ring**2)[1]
    # the same shape on a wall-bounded interval (pinned to zero at both ends): it runs on in
    # value across the seam but bends sharply there, as Darcy's pressure does
    x = (np.arange(64) + 0.5) / 64
    pinned = x * (1 - x) * rng.uniform(1, 2, size=(40, 1, 1))
    assert seam_ratios(pinned)[0] < 2 and seam_ratios(pinned)[1] > 10
    periodic, reason = periodic_domain(ring, pinned)
    assert periodic is False and "not a periodic domain" in reason and "targets" in reason
    # a random walk jumps across the seam
    walk = rng.normal(size=(40, 1, 64)).cumsum(-1)
    assert seam_ratios(walk)[0] > 2 and periodic_domain(walk, ring)[0] is False
    # unreadable seams are never called periodic: missing values, too few positions
    gappy = ring.copy()
    gappy[0, 0, -5:] = np.nan
    assert seam_ratios(gappy) == (math.inf, math.inf)
    assert periodic_domain(gappy, ring)[0] is False
    assert seam_ratios(ring[..., :3]) == (math.inf, math.inf)
    # (N, L) targets (one label per position) read as one channel; flat rows are continuous
    assert seam_ratios(ring[:, 0]) == seam_ratios(ring[:, :1])
    assert seam_ratios(np.ones((5, 16))) == (1.0, 1.0)
    # per channel: a walk on a small scale beside a ring on a large one still counts
    mixed = np.concatenate([100 * ring[:, :1], 0.01 * walk], axis=1)
    assert seam_ratios(mixed)[0] == pytest.approx(seam_ratios(walk)[0])
    # reads evenly spaced rows, at most SEAM_SAMPLE_ROWS of them
    many = np.repeat(ring, 60, axis=0)
    assert len(many) > SEAM_SAMPLE_ROWS and periodic_domain(many, many)[0] is True
