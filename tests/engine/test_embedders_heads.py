"""Embedders, heads and the assembled model on every tiny backbone, for every input kind."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from orca_engine import embedders
from orca_engine.backbones import Backbone, create_backbone, list_backbones
from orca_engine.embedders import (
    KERNEL_BANK_MAX_DILATIONS,
    KERNEL_BANK_MAX_FEATURES,
    KERNEL_BANK_MAX_MIX_CHANNELS,
    KERNEL_BANK_MAX_VALUES,
    KERNEL_BANK_QUANTILES,
    SEQUENCE_MAX_PATCH_POSITIONS,
    KernelBank,
    SequenceEmbedder,
    StemLayer,
    create_embedder,
    embedder_from_config,
    kernel_bank_channel_mixes,
    kernel_bank_dilations,
    kernel_bank_filters,
    local_stem,
)
from orca_engine.errors import SpecError
from orca_engine.model import OrcaModel, build_model, model_from_config, set_trainable

TINY = [name for name in list_backbones() if name.startswith("tiny-")]
BUDGET = 64


@dataclass
class Info:
    """The three DatasetInfo fields the model builder reads."""

    input_kind: str
    sample_shape: tuple[int, ...]
    label_shape: tuple[int, ...]


@pytest.fixture(scope="module", params=TINY)
def backbone(request: pytest.FixtureRequest) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(request.param)


def make_model(
    backbone: Backbone, info: Info, task_type: str, out_dim: int, budget: int = BUDGET
) -> OrcaModel:
    torch.manual_seed(0)
    return build_model(
        info=info, task_type=task_type, out_dim=out_dim, backbone=backbone, token_budget=budget
    )


@pytest.mark.parametrize("length", [7, 151, 1009, 7919])
def test_sequence_patching_never_collapses(backbone: Backbone, length: int) -> None:
    embedder = create_embedder("seq1d", (3, length), backbone, token_budget=BUDGET)
    patch = embedder.patch_size
    assert embedder.n_tokens == math.ceil(length / patch)
    assert min(length, BUDGET) // 2 < embedder.n_tokens <= min(length, BUDGET)
    if length <= BUDGET:
        assert (patch, embedder.n_tokens) == (1, length)
    tokens = embedder(torch.randn(2, 3, length))
    assert tokens.shape == (2, embedder.n_tokens, backbone.embed_dim)


@pytest.mark.parametrize("length", [150, 5000, 20011])
def test_long_series_average_before_a_bounded_projection(length: int) -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (12, length), backbone, token_budget=8, stem_channels=16)
    positions = embedder.proj.weight.shape[-1]
    assert positions <= SEQUENCE_MAX_PATCH_POSITIONS and embedder.n_tokens <= 8
    assert embedder.patch_size == positions * embedder.pool_steps >= math.ceil(length / 8)
    assert (embedder.pool_steps > 1) == (length > 8 * SEQUENCE_MAX_PATCH_POSITIONS)
    x = torch.randn(2, 12, length)
    rebuilt = embedder_from_config(json.loads(json.dumps(embedder.config())), backbone)
    rebuilt.load_state_dict(embedder.state_dict())
    torch.testing.assert_close(rebuilt(x), embedder(x))
    # a step change inside one averaged run moves only that token (runs never straddle tokens)
    bumped = x.clone()
    bumped[..., embedder.patch_size : embedder.patch_size + embedder.pool_steps] += 1.0
    moved = (embedder(bumped) - embedder(x)).abs().amax(dim=(0, 2))
    assert moved[1] > 0 and moved[3:].max() == 0


def test_bundles_from_before_long_patch_averaging_rebuild_unaveraged() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (1, 5000), backbone, token_budget=8, stem_channels=4)
    old = {k: v for k, v in embedder.config().items() if k != "pool_steps"}
    old["patch_size"] = math.ceil(5000 / 8)
    rebuilt = embedder_from_config(old, backbone)
    assert rebuilt.pool_steps == 1 and rebuilt.proj.weight.shape[-1] == 625


@pytest.mark.parametrize("length", [1, 9, 17, 150, 3000, 100_000])
def test_kernel_bank_dilations_fit_the_series(length: int) -> None:
    dilations = kernel_bank_dilations(length)
    assert dilations[0] == 1 and dilations == sorted(set(dilations))
    assert len(dilations) <= KERNEL_BANK_MAX_DILATIONS
    assert 8 * dilations[-1] + 1 <= max(length, 9)  # the widest filter still fits (or is 1)
    if length >= 17:
        assert 8 * (dilations[-1] + 1) + 1 > length  # ... and a wider one would not


def test_kernel_bank_thresholds_come_from_training_series() -> None:
    filters = kernel_bank_filters()
    assert filters.shape == (84, 9) and bool((filters.sum(1) == 0).all())
    torch.manual_seed(0)
    train = torch.randn(40, 1, 151).cumsum(-1)
    bank = KernelBank(1, 151, 19, kernel_bank_dilations(151))
    bank.calibrate(train)
    assert bank.n_features == len(bank.dilations) * 84 * len(KERNEL_BANK_QUANTILES)
    # thresholds are ordered quantiles of each filter's responses, so on the training series the
    # raw shares above them sit near 1 - q; standardised, they are centred with unit-ish spread
    assert bool((bank.thresholds.diff(dim=-1) >= 0).all())
    raw = bank.raw_shares(train).unflatten(1, (len(bank.dilations), 84, len(KERNEL_BANK_QUANTILES)))
    overall = raw.mean(dim=(0, 1, 2, 4))
    expected = torch.tensor([1 - q for q in KERNEL_BANK_QUANTILES])
    torch.testing.assert_close(overall, expected, atol=0.02, rtol=0)
    out = bank(train)
    assert out.shape == (40, bank.n_features, 8)
    torch.testing.assert_close(out.mean(0), torch.zeros_like(out[0]), atol=1e-5, rtol=0)
    # deterministic: the same series and seed give the same thresholds
    again = KernelBank(1, 151, 19, kernel_bank_dilations(151))
    again.calibrate(train)
    assert torch.equal(again.thresholds, bank.thresholds)
    # the last token counts only its 18 real steps (151 = 7 * 19 + 18), not the padding
    bank.thresholds.fill_(-math.inf)
    assert bool((bank.raw_shares(train) == 1.0).all())


def test_kernel_bank_embedder_round_trips_and_reads_long_series_averaged() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    for length in (150, 5000):
        embedder = create_embedder(
            "seq1d", (3, length), backbone, token_budget=8, stem_channels=4, kernel_bank=True
        )
        assert embedder.bank is not None
        assert embedder.bank.length * embedder.pool_steps >= length > embedder.bank.length - 1
        assert embedder.bank.dilations == kernel_bank_dilations(embedder.bank.length)
        x = torch.randn(6, 3, length)
        embedder.calibrate(x)
        config = json.loads(json.dumps(embedder.config()))
        assert config["kernel_dilations"] == embedder.bank.dilations
        assert config.get("kernel_channel_mixes", 1) == 1  # 5 dilations: 1,260 features already
        rebuilt = embedder_from_config(config, backbone)
        rebuilt.load_state_dict(embedder.state_dict())  # thresholds and scales travel as buffers
        torch.testing.assert_close(rebuilt(x), embedder(x))
        # the bank is fixed: only its projection trains
        assert not [n for n, p in embedder.named_parameters() if n.startswith("bank.")]
        embedder(x).sum().backward()
        assert embedder.bank_proj is not None and embedder.bank_proj.weight.grad is not None
    plain = create_embedder("seq1d", (3, 150), backbone, token_budget=8, stem_channels=4)
    assert plain.bank is None and "kernel_dilations" not in plain.config()


def test_multichannel_bank_draws_small_channel_subsets_per_dilation() -> None:
    # short series: up to 4 mixes, one fewer than the channels
    assert [kernel_bank_channel_mixes(c, 2, 29) for c in (1, 2, 3, 5, 12)] == [1, 1, 2, 4, 4]
    # longer ones: only as many as keep the shares per sample within a long univariate bank's
    per_mix = 84 * len(KERNEL_BANK_QUANTILES)
    for dilations, positions in [(4, 100), (5, 300), (6, 500), (8, 512)]:
        mixes = kernel_bank_channel_mixes(12, dilations, positions)
        assert mixes * per_mix * dilations * positions <= KERNEL_BANK_MAX_VALUES or mixes == 1
        wider = (mixes + 1) * per_mix * dilations
        assert wider * positions > KERNEL_BANK_MAX_VALUES or wider > KERNEL_BANK_MAX_FEATURES
    assert kernel_bank_channel_mixes(24, 6, 500) == 1
    # and the features stay within the widest bank measured to align: 4 x 2 dilations, 2 x 4
    assert [kernel_bank_channel_mixes(12, d, 29) for d in (2, 3, 4, 5)] == [4, 2, 2, 1]
    assert kernel_bank_channel_mixes(12, 4, 100) * per_mix * 4 <= KERNEL_BANK_MAX_FEATURES
    dilations = kernel_bank_dilations(100)
    bank = KernelBank(12, 100, 13, dilations, channel_mixes=4)
    filters = kernel_bank_filters()
    assert bank.weight.shape == (len(dilations), 4 * 84, 12, 9)
    assert bank.n_features == len(dilations) * 4 * 84 * len(KERNEL_BANK_QUANTILES)
    used = bank.weight.abs().sum(-1) > 0  # (dilations, filters, channels)
    sizes = used.sum(-1)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= KERNEL_BANK_MAX_MIX_CHANNELS
    assert float(sizes.float().median()) <= 3  # log-uniform sizes: most subsets are small
    assert not torch.equal(used[0], used[1])  # each dilation draws its own subsets
    # every channel a filter reads carries that filter's taps, the others nothing
    expected = filters.repeat(4, 1)[None, :, None, :] * used[..., None]
    assert torch.equal(bank.weight, expected)
    # a channel outside a filter's subset does not move that filter's response
    x = torch.randn(3, 12, 100)
    moved = x.clone()
    moved[:, 5] += torch.randn(3, 100)
    blind = ~used[0, :, 5]
    torch.testing.assert_close(bank._responses(moved, 0)[:, blind], bank._responses(x, 0)[:, blind])
    assert not torch.allclose(
        bank._responses(moved, 0)[:, ~blind], bank._responses(x, 0)[:, ~blind]
    )
    # univariate series and explicit single mixes keep one subset per filter for all dilations
    assert KernelBank(1, 100, 13, dilations, channel_mixes=4).weight.shape == (84, 1, 9)


def test_bundles_from_before_channel_mixes_rebuild_their_bank() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    embedder = create_embedder("seq1d", (6, 24), backbone, token_budget=8, kernel_bank=True)
    assert embedder.bank is not None and embedder.bank.channel_mixes == 4
    x = torch.randn(5, 6, 24)
    embedder.calibrate(x)
    config = embedder.config()
    assert config["kernel_channel_mixes"] == 4
    # a bundle written before the mixes has no key: one subset per filter, drawn as it was then
    old_config = {k: v for k, v in config.items() if k != "kernel_channel_mixes"}
    old = embedder_from_config(old_config, backbone)
    assert old.bank is not None and old.bank.weight.shape == (84, 6, 9)
    generator = torch.Generator().manual_seed(0)
    mix = (torch.rand(84, 6, generator=generator) < 0.5).float()
    mix[torch.arange(84), torch.randint(6, (84,), generator=generator)] = 1.0
    assert torch.equal(old.bank.weight, kernel_bank_filters()[:, None, :] * mix[:, :, None])
    again = embedder_from_config(old_config, backbone)
    old.calibrate(x)
    again.load_state_dict(old.state_dict())
    torch.testing.assert_close(again(x), old(x))


def _banked_series_model(
    backbone: Backbone, task_type: str = "classification", *, summary: bool
) -> OrcaModel:
    torch.manual_seed(0)
    return build_model(
        info=Info("seq1d", (2, 151), ()),
        task_type=task_type,
        out_dim=3,
        backbone=backbone,
        token_budget=8,
        flat_head=True,
        kernel_bank=True,
        kernel_summary=summary,
    )


def test_kernel_summary_is_the_whole_series_shares_read_beside_the_body() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    model = _banked_series_model(backbone, summary=True)
    bank = model.embedder.bank
    assert bank is not None and bank.summary
    assert model.embedder.summary_features == model.head.summary_features == bank.n_features
    train = torch.randn(40, 2, 151).cumsum(-1)
    model.embedder.calibrate(train)
    tokens, summary = model.embedder.encode(train)
    assert summary is not None and summary.shape == (40, bank.n_features)
    torch.testing.assert_close(tokens, model.embedder(train))
    # MiniRocket's features: each filter's share of all 151 positions above its thresholds,
    # standardised over the training series
    responses = torch.cat([bank._responses(train, i) for i in range(len(bank.dilations))], 1)
    above = responses.unsqueeze(2) > bank.thresholds.flatten(0, 1)[None, :, :, None]
    whole = above.float().mean(-1).flatten(1)
    expected = (whole - whole.mean(0)) / whole.std(0, unbiased=False).clamp_min(0.05)
    torch.testing.assert_close(summary, expected, atol=1e-4, rtol=0)
    # the summary's Linear starts at zero: the model begins as the one without it
    assert model.head.summary is not None and not model.head.summary.weight.any()
    plain = _banked_series_model(backbone, summary=False)
    assert plain.head.summary is None and "summary_features" not in plain.head.config()
    plain.embedder.calibrate(train)
    shared = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(shared)
    model.eval(), plain.eval()  # no dropout
    torch.testing.assert_close(model(train), plain(train))
    # and it trains: one step on the summary alone moves the output
    model(train).logsumexp(-1).sum().backward()
    assert model.head.summary.weight.grad is not None and model.head.summary.weight.grad.any()
    with torch.no_grad():
        model.head.summary.weight.add_(0.1)
    assert not torch.allclose(model(train), plain(train))
    # bundle round trip: config keys and buffers rebuild the same model
    config = json.loads(json.dumps(model.config()))
    assert config["embedder"]["kernel_summary"] is True
    assert config["head"]["summary_features"] == bank.n_features
    rebuilt = model_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(train), model(train))
    # dense tasks and inputs without a bank get no summary
    dense = _banked_series_model(backbone, "dense_regression", summary=True)
    assert dense.embedder.summary_features == 0 and dense.head.summary_features == 0
    no_bank = create_embedder("seq1d", (2, 151), backbone, token_budget=8, kernel_summary=True)
    assert no_bank.summary_features == 0 and no_bank.encode(train)[1] is None


@pytest.mark.parametrize("length", [7, 151, 1009])
def test_dense_sequence_output_matches_input_length(backbone: Backbone, length: int) -> None:
    info = Info("seq1d", (2, length), (3, length))
    model = make_model(backbone, info, "dense_regression", 3)
    assert model(torch.randn(2, 2, length)).shape == (2, 3, length)
    model = make_model(backbone, Info("seq1d", (2, length), (length,)), "dense_classification", 5)
    assert model(torch.randn(2, 2, length)).shape == (2, 5, length)


@pytest.mark.parametrize("height,width", [(8, 8), (28, 28), (13, 17)])
def test_dense_image_output_matches_input_size(backbone: Backbone, height: int, width: int) -> None:
    info = Info("image2d", (3, height, width), (2, height, width))
    model = make_model(backbone, info, "dense_regression", 2)
    embedder = model.embedder
    assert embedder.grid is not None and embedder.n_tokens <= BUDGET
    assert embedder.grid == (
        math.ceil(height / embedder.patch_size),
        math.ceil(width / embedder.patch_size),
    )
    assert model(torch.randn(2, 3, height, width)).shape == (2, 2, height, width)


def test_image_patch_prefers_native_vision_patch() -> None:
    torch.manual_seed(0)
    vit = create_backbone("tiny-vit")
    native = create_embedder("image2d", (3, 28, 28), vit, token_budget=BUDGET)
    assert (native.patch_size, native.grid) == (vit.patch_size, (7, 7))  # type: ignore[attr-defined]
    tight = create_embedder("image2d", (3, 28, 28), vit, token_budget=16)
    assert tight.patch_size > vit.patch_size and tight.n_tokens <= 16  # type: ignore[attr-defined]
    # positions start from the pretrained table resampled to the grid
    torch.testing.assert_close(native.positions.data, vit.position_embeddings(49, (7, 7)))

    bert = create_backbone("tiny-bert")
    text_over_image = create_embedder("image2d", (1, 28, 28), bert, token_budget=BUDGET)
    assert text_over_image.patch_size == 4 and text_over_image.n_tokens == 49
    torch.testing.assert_close(text_over_image.positions.data, bert.position_embeddings(49))


def test_tabular_one_token_per_feature_then_sequence(backbone: Backbone) -> None:
    per_feature = create_embedder("tabular", (10,), backbone, token_budget=BUDGET)
    assert per_feature.n_tokens == 10
    x = torch.randn(4, 10)
    changed = x.clone()
    changed[:, 3] += 1.0
    difference = (per_feature(changed) - per_feature(x)).abs().sum(dim=(0, 2))
    assert difference[3] > 0 and torch.count_nonzero(difference) == 1  # token i sees x_i only

    wide = create_embedder("tabular", (1000,), backbone, token_budget=BUDGET)
    assert 1 < wide.n_tokens <= BUDGET
    assert wide(torch.randn(2, 1000)).shape == (2, wide.n_tokens, backbone.embed_dim)


@pytest.mark.parametrize(
    "info,task_type,out_dim,target",
    [
        (Info("seq1d", (1, 151), ()), "classification", 3, "class"),
        (Info("image2d", (3, 13, 17), (4,)), "multilabel", 4, "multilabel"),
        (Info("tabular", (12,), ()), "regression", 1, "value"),
        (Info("seq1d", (2, 31), (1, 31)), "dense_regression", 1, "value"),
    ],
)
def test_one_train_step_changes_weights(
    backbone: Backbone, info: Info, task_type: str, out_dim: int, target: str
) -> None:
    model = make_model(backbone, info, task_type, out_dim)
    trainable = set_trainable(model, "full")
    x = torch.randn(4, *info.sample_shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outputs = model(x)
    if target == "class":
        loss = torch.nn.functional.cross_entropy(outputs, torch.tensor([0, 1, 2, 0]))
    elif target == "multilabel":
        labels = torch.randint(0, 2, outputs.shape).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(outputs, labels)
    else:
        loss = torch.nn.functional.mse_loss(outputs, torch.randn_like(outputs))
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ("embedder.", "backbone.", "head."):
        assert any(n.startswith(part) for n in changed), part
    assert changed <= set(trainable)


def test_set_trainable_modes(backbone: Backbone) -> None:
    model = make_model(backbone, Info("seq1d", (1, 40), ()), "classification", 2)
    every = {n for n, _ in model.named_parameters()}
    backbone_norms = {f"backbone.{n}" for n in backbone.norm_parameter_names()}

    assert set(set_trainable(model, "full")) == every
    head_only = set(set_trainable(model, "frozen"))
    assert head_only == {n for n in every if n.startswith("head.")}
    embedder_only = set(set_trainable(model, "embedder"))
    assert embedder_only == {n for n in every if n.startswith("embedder.")}
    layernorm = set(set_trainable(model, "layernorm"))
    assert layernorm == head_only | embedder_only | backbone_norms
    assert {n for n, p in model.named_parameters() if p.requires_grad} == layernorm
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert backbone_norms and all(len(shapes[n]) == 1 for n in backbone_norms)  # no matrices
    with pytest.raises(SpecError):
        set_trainable(model, "everything")


def test_layernorm_mode_trains_the_norms_of_a_body_without_layernorms() -> None:
    """A CNN or RMSNorm body is not frozen whole by ``layernorm`` mode: its own norms train."""

    class RMSNorm(torch.nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(size))

    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4), RMSNorm(4)
    )
    names = Backbone.norm_parameter_names(body)  # type: ignore[arg-type]
    assert names == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight"]


@pytest.mark.parametrize(
    "info,task_type,out_dim",
    [
        (Info("image2d", (1, 13, 17), (13, 17)), "dense_classification", 3),
        (Info("tabular", (9,), (2,)), "regression", 2),
        (Info("tabular", (300,), ()), "classification", 2),
        (Info("seq1d", (2, 151), (2, 151)), "dense_regression", 2),
    ],
)
def test_model_config_round_trip(
    backbone: Backbone, info: Info, task_type: str, out_dim: int
) -> None:
    model = make_model(backbone, info, task_type, out_dim).eval()
    config = json.loads(json.dumps(model.config()))
    assert config["backbone"]["name"] == backbone.name
    torch.manual_seed(123)
    rebuilt = model_from_config(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, *info.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))
        torch.testing.assert_close(model.embed(x), rebuilt.embed(x))


def test_impossible_heads_are_spec_errors() -> None:
    torch.manual_seed(0)
    bert = create_backbone("tiny-bert")
    with pytest.raises(SpecError):
        make_model(bert, Info("tabular", (5,), (5,)), "dense_regression", 1)
    with pytest.raises(SpecError):
        make_model(bert, Info("seq1d", (1, 5), ()), "ranking", 1)
    with pytest.raises(SpecError):
        create_embedder("image2d", (28, 28), bert, token_budget=BUDGET)


def test_a_dense_local_skip_reads_the_stem_at_every_position_beside_the_body() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    info = Info("seq1d", (2, 61), (3, 61))

    def dense(skip: bool) -> OrcaModel:
        torch.manual_seed(0)
        return build_model(
            info=info,
            task_type="dense_regression",
            out_dim=3,
            backbone=backbone,
            token_budget=8,
            stem_channels=16,
            local_skip=skip,
        )

    model, plain = dense(True), dense(False)
    head = model.head
    assert head.skip is not None and head.config()["skip_features"] == 16
    assert "skip_features" not in plain.head.config()
    x = torch.randn(4, 2, 61)
    tokens, local = model.embedder.encode_local(x)
    assert local is not None and local.shape == (4, 16, 61)
    torch.testing.assert_close(tokens, model.embedder(x))
    torch.testing.assert_close(local, model.embedder.stem(x))
    # zero at the start: the model begins as the one without the skip
    model.eval(), plain.eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    torch.testing.assert_close(model(x), plain(x))
    # each output position reads the stem's features at that position: one more Linear
    with torch.no_grad():
        head.skip.weight.normal_()
    expected = plain(x) + torch.einsum("kf,bfl->bkl", head.skip.weight[:, :, 0], local)
    torch.testing.assert_close(model(x), expected)
    rebuilt = model_from_config(json.loads(json.dumps(model.config())))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), model(x))
    # and the gradient reaches it
    model.train()
    model(x).square().sum().backward()
    assert head.skip.weight.grad is not None and head.skip.weight.grad.any()


def test_a_circular_stem_wraps_around_the_ends_and_round_trips() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    wrap = create_embedder(
        "seq1d", (2, 64), backbone, token_budget=8, stem_channels=8, circular=True
    )
    assert isinstance(wrap, SequenceEmbedder) and wrap.stem is not None
    x = torch.randn(3, 2, 64)
    # on a ring every position is inside: shifting the series shifts the stem's output exactly
    torch.testing.assert_close(wrap.stem(torch.roll(x, 5, -1)), torch.roll(wrap.stem(x), 5, -1))
    zeros = create_embedder("seq1d", (2, 64), backbone, token_budget=8, stem_channels=8)
    assert isinstance(zeros, SequenceEmbedder) and zeros.stem is not None
    zeros.load_state_dict(wrap.state_dict())
    # the same weights read the same inside the series and differ only where the window
    # reaches past an end
    half = zeros.stem[0].kernel_size[0] // 2
    inner = slice(half, 64 - half)
    outer = torch.cat([torch.arange(half), torch.arange(64 - half, 64)])
    torch.testing.assert_close(zeros.stem(x)[..., inner], wrap.stem(x)[..., inner])
    assert not torch.allclose(zeros.stem(x)[..., outer], wrap.stem(x)[..., outer])
    # the bundle says so only when on; a rebuilt embedder wraps again
    assert wrap.config()["circular"] is True and "circular" not in zeros.config()
    rebuilt = embedder_from_config(json.loads(json.dumps(wrap.config())))
    rebuilt.load_state_dict(wrap.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), wrap.eval()(x))
    # no stem, nothing to wrap
    plain = create_embedder("seq1d", (2, 64), backbone, token_budget=8, circular=True)
    assert "circular" not in plain.config()


def test_a_deeper_stem_starts_as_one_layer_reaches_further_and_round_trips() -> None:
    backbone = create_backbone("tiny-bert", allow_random_init=True)
    one = create_embedder("seq1d", (2, 160), backbone, token_budget=8, stem_channels=8)
    deep = create_embedder(
        "seq1d", (2, 160), backbone, token_budget=8, stem_channels=8, stem_layers=3
    )
    assert isinstance(one, SequenceEmbedder) and one.stem is not None
    assert isinstance(deep, SequenceEmbedder) and deep.stem is not None
    kernel = one.stem[0].kernel_size[0]
    layers = [m for m in deep.stem if isinstance(m, StemLayer)]
    assert [m.conv.dilation[0] for m in layers] == [2, 4]
    assert all(m.conv.kernel_size[0] == kernel for m in layers)
    # the added layers start at zero: with the first layer's weights, the same features
    deep.stem[0].load_state_dict(one.stem[0].state_dict())
    x = torch.randn(3, 2, 160)
    torch.testing.assert_close(deep.stem(x), one.stem(x))
    # once trained (here: random weights), a change at one position reaches as far as the
    # windows add up: half a window for one layer, 1 + 2 + 4 half windows for three
    for module in layers:
        torch.nn.init.normal_(module.conv.weight, std=0.1)
    half = kernel // 2
    bumped = x.clone()
    bumped[..., 80] += 1.0
    for stem, reach in ((one.stem, half), (deep.stem, 7 * half)):
        moved = (stem(bumped) - stem(x)).abs().amax(dim=(0, 1)) > 0
        assert moved.nonzero().min() == 80 - reach
        assert moved.nonzero().max() == 80 + reach
    # the bundle names the depth only above one layer; a rebuilt embedder has it again
    assert deep.config()["stem_layers"] == 3 and "stem_layers" not in one.config()
    rebuilt = embedder_from_config(json.loads(json.dumps(deep.config())))
    rebuilt.load_state_dict(deep.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), deep.eval()(x))
    # without a stem there is nothing to deepen; an image stem stays one layer
    plain = create_embedder("seq1d", (2, 160), backbone, token_budget=8, stem_layers=3)
    assert "stem_layers" not in plain.config()
    with pytest.raises(ValueError, match="series stem"):
        local_stem(torch.nn.Conv2d, 1, 8, 3, layers=2)


def test_a_bank_remembers_series_it_read_while_asked_until_its_thresholds_change(
    count_bank_rows: Callable[[KernelBank], list[int]],
) -> None:
    torch.manual_seed(0)
    train = torch.randn(20, 1, 151).cumsum(-1)
    bank = KernelBank(1, 151, 19, kernel_bank_dilations(151))
    bank.calibrate(train)
    computed = count_bank_rows(bank)
    # prediction: computed every time, nothing kept
    reference = bank.raw_shares(train)
    assert torch.equal(bank.raw_shares(train), reference)
    assert computed == [20, 20] and embedders._MEMOS.get(bank) is None

    computed.clear()
    with embedders.remembering_bank_shares(bank):
        assert torch.equal(bank.raw_shares(train[:10]), reference[:10])
        # a batch of five remembered series and ten new ones computes only the new ones
        assert torch.equal(bank.raw_shares(train[5:20]), reference[5:20])
        assert torch.equal(bank.raw_shares(train[[19, 0, 7]]), reference[[19, 0, 7]])
        assert computed == [10, 10]
        # a copy (an ensemble member) remembers nothing, and does not start to
        member = copy.deepcopy(bank)
        assert embedders._MEMOS.get(member) is None
        member.raw_shares(train[:3])
        assert member not in embedders._MEMOS and member not in embedders._REMEMBERING
        # nested (an ensemble around each member's refinement): the outer one keeps it
        with embedders.remembering_bank_shares(bank):
            pass
        assert len(embedders._MEMOS[bank].rows) == 20

        bank.calibrate(train[:5] * 3.0)  # new thresholds: the remembered shares are stale
        computed.clear()
        fresh = bank.raw_shares(train[:4])
        assert computed == [4] and not torch.equal(fresh, reference[:4])
    # leaving forgets everything
    assert embedders._MEMOS.get(bank) is None and bank not in embedders._REMEMBERING
    assert torch.equal(fresh, bank.raw_shares(train[:4])) and computed == [4, 4]


def test_a_bank_remembers_no_more_than_its_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    series = torch.randn(10, 1, 151)
    bank = KernelBank(1, 151, 19, kernel_bank_dilations(151))
    bank.calibrate(series)
    row_bytes = bank.n_features * bank.n_tokens * 4
    monkeypatch.setattr(embedders, "KERNEL_BANK_MEMO_BYTES", 3 * row_bytes)
    reference = bank.raw_shares(series)
    with embedders.remembering_bank_shares(bank):
        assert torch.equal(bank.raw_shares(series), reference)
        memo = embedders._MEMOS[bank]
        assert len(memo.rows) == 3 and memo.nbytes == 3 * row_bytes
        assert torch.equal(bank.raw_shares(series), reference)  # the rest is computed again
