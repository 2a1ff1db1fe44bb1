"""Stage 1, dimensionality alignment: map one target sample to the backbone's ``(T, d)`` tokens.

Every embedder ends the same way: a LayerNorm, then learned positions initialised from the
backbone's own pretrained positions, so its output sits where the backbone's input embedding
layer would put real source data. Patch sizes are chosen so the token count never exceeds the
token budget, and inputs are right/bottom padded (never resized) so any length works: a prime
length L gives ``ceil(L / p)`` tokens, never a single collapsed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from orca_engine.backbones.base import Backbone
from orca_engine.errors import SpecError
from orca_engine.specs import RETIRED_FIELDS, sequence_patch_size

INPUT_KINDS = ("seq1d", "image2d", "tabular")


#: widest stem window: series steps, and image pixels a side (a square window costs its square)
SEQUENCE_STEM_MAX_KERNEL, IMAGE_STEM_MAX_KERNEL = 15, 7
#: most positions a series token's projection reads: a longer patch is first averaged over runs
#: of ``ceil(patch / 64)`` steps, so the projection's weights stop growing with the series length
#: (at 8 tokens, a 20,000-step series would otherwise give each token 2,500 positions of 64 stem
#: channels: 61 M weights into MiniLM's 384 dimensions). Every series measured in
#: docs/QUALITY.md has patches of at most 63 steps, so none is averaged.
SEQUENCE_MAX_PATCH_POSITIONS = 64


def sequence_pooling(patch_size: int) -> tuple[int, int]:
    """``(steps averaged per position, patch length)``: at most SEQUENCE_MAX_PATCH_POSITIONS each.

    The patch length grows to a multiple of the averaged run (never shrinks), so the token count
    ``ceil(length / patch)`` never exceeds the budget that gave ``patch_size``.
    """
    pool = math.ceil(patch_size / SEQUENCE_MAX_PATCH_POSITIONS)
    return pool, pool * math.ceil(patch_size / pool)


def check_runs(patch_size: int, pool_steps: int) -> None:
    """A patch must hold a whole number of ``pool_steps``-step averaged runs."""
    if pool_steps < 1 or patch_size % pool_steps:
        raise ValueError(f"patch {patch_size} is not a whole number of {pool_steps}-step runs")


def stem_kernel(patch_size: int, *, largest: int = SEQUENCE_STEM_MAX_KERNEL) -> int:
    """Odd stem window spanning a patch and its neighbours: 2 * patch + 1, within 3..``largest``."""
    return min(max(3, 2 * patch_size + 1), largest)


class StemLayer(nn.Module):
    """``h + GELU(conv(h))``: a further same-size stem layer, its window dilated to reach further.

    The convolution starts at zero, so a stem with more layers starts as the one-layer stem does.
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv
        nn.init.zeros_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.gelu(self.conv(h))


def local_stem(
    conv: type[nn.Conv1d] | type[nn.Conv2d],
    in_channels: int,
    stem_channels: int,
    kernel: int,
    *,
    circular: bool = False,
    layers: int = 1,
) -> nn.Sequential | None:
    """Same-size ``conv`` + GELU in front of a patch projection; None when ``stem_channels`` is 0.

    Each token is then built from local features (slopes and peaks of a series, edges and strokes
    of an image) of its patch and the neighbours the window reaches, not from raw values.
    ``circular``: the window wraps around the ends (a periodic domain) instead of reading zeros.
    ``layers`` > 1 (series): :class:`StemLayer` s follow, layer ``i`` dilated ``2 ** (i - 1)``.
    """
    if stem_channels <= 0:
        return None
    if layers > 1 and conv is not nn.Conv1d:
        raise ValueError("only a series stem takes more than one layer")
    padding_mode: Literal["circular", "zeros"] = "circular" if circular else "zeros"
    modules: list[nn.Module] = [
        conv(in_channels, stem_channels, kernel, padding=kernel // 2, padding_mode=padding_mode),
        nn.GELU(),
    ]
    for layer in range(1, layers):
        dilation = 2**layer
        modules.append(
            StemLayer(
                nn.Conv1d(
                    stem_channels,
                    stem_channels,
                    kernel,
                    padding=dilation * (kernel // 2),
                    dilation=dilation,
                    padding_mode=padding_mode,
                )
            )
        )
    return nn.Sequential(*modules)


#: the fixed kernel bank's thresholds: these quantiles of each filter's response on training data
KERNEL_BANK_QUANTILES = (0.25, 0.5, 0.75)
#: most dilations per filter (spaced geometrically from 1 to what a series' length allows)
KERNEL_BANK_MAX_DILATIONS = 8
#: training series and response values per filter that the thresholds are read from
KERNEL_BANK_CALIBRATION_SERIES, KERNEL_BANK_CALIBRATION_VALUES = 256, 65_536
#: most response values one pass holds (per dilation), so long series are read in row chunks
KERNEL_BANK_CHUNK_VALUES = 1 << 24
#: floor of a share's spread when standardising (a share that barely varies is not amplified)
KERNEL_BANK_MIN_SCALE = 0.05
#: multichannel series: at most this many channel subsets per filter and dilation
KERNEL_BANK_MAX_CHANNEL_MIXES = 4
#: ... each of 1 to this many channels (log-uniform: most subsets are small, as MiniRocket's)
KERNEL_BANK_MAX_MIX_CHANNELS = 9
#: ... while a sample's shares (features x positions read) stay within what a long univariate
#: series' bank already costs: 8 dilations of 84 filters at 3 thresholds over 8 tokens of 64
#: averaged positions. Comparing responses with thresholds is most of the bank's time, and on a
#: 24-channel, 500-step series four mixes doubled a training step (0.53 -> 1.14 s on 1 thread)
KERNEL_BANK_MAX_VALUES = (
    KERNEL_BANK_MAX_DILATIONS * 84 * len(KERNEL_BANK_QUANTILES) * 8 * SEQUENCE_MAX_PATCH_POSITIONS
)
#: ... and while the bank has at most this many features: the first alignment step moves each
#: projection weight by about the learning rate, so a wider bank moves the tokens further. Four
#: mixes on BasicMotions (4,032 features) sent the OTDD from 160 to 263 in one step and it
#: never came back; JapaneseVowels' 2,016 aligned as the single-subset bank does (docs/QUALITY.md)
KERNEL_BANK_MAX_FEATURES = 2016
#: inside :func:`remembering_bank_shares` (alignment, refinement) a kernel bank on the CPU
#: remembers the raw shares of the series it has read (keyed by their bytes), up to this many
#: bytes per bank: the bank is fixed, and those stages read the same series every epoch.
#: Outside (prediction) it never stores.
KERNEL_BANK_MEMO_BYTES = 256 << 20


@dataclass
class _SharesMemo:
    """A bank's remembered raw shares, valid while its filters and thresholds are these."""

    weight: torch.Tensor
    thresholds: torch.Tensor
    rows: dict[bytes, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0


#: per bank object, outside the module: a deepcopy (ensemble members), a state dict or a pickled
#: bundle never carries it, and it goes when the bank does
_MEMOS: weakref.WeakKeyDictionary[nn.Module, _SharesMemo] = weakref.WeakKeyDictionary()
#: per bank object: how many :func:`remembering_bank_shares` are open around it (a copy made
#: inside one, such as an ensemble member, is not remembering)
_REMEMBERING: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def remembering_bank_shares(*models: nn.Module) -> Iterator[None]:
    """While open, the kernel banks in ``models`` remember what they computed; when the
    outermost of nested ones closes, they forget it (an ensemble keeps it across members)."""
    banks = [m for model in models for m in model.modules() if isinstance(m, KernelBank)]
    for bank in banks:
        _REMEMBERING[bank] = _REMEMBERING.get(bank, 0) + 1
    try:
        yield
    finally:
        for bank in banks:
            _REMEMBERING[bank] -= 1
            if not _REMEMBERING[bank]:
                del _REMEMBERING[bank]
                _MEMOS.pop(bank, None)


def _row_key(row: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(row.shape)}".encode())
    digest.update(row.numpy().tobytes())
    return digest.digest()


def kernel_bank_channel_mixes(channels: int, dilations: int, positions: int) -> int:
    """Channel subsets per filter and dilation for a bank of ``dilations`` over ``positions``.

    One for a univariate series; with more channels up to 4 (one fewer than the channels), as
    many as keep the bank within :data:`KERNEL_BANK_MAX_VALUES` per sample and
    :data:`KERNEL_BANK_MAX_FEATURES` features.
    """
    features = 84 * len(KERNEL_BANK_QUANTILES) * max(1, int(dilations))
    affordable = min(
        KERNEL_BANK_MAX_VALUES // (features * max(1, int(positions))),
        KERNEL_BANK_MAX_FEATURES // features,
    )
    return max(1, min(KERNEL_BANK_MAX_CHANNEL_MIXES, int(channels) - 1, affordable))


def _channel_subsets(count: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, channels)`` 0/1 rows, each a random subset of log-uniform size 1..9 channels."""
    top = math.log2(min(channels, KERNEL_BANK_MAX_MIX_CHANNELS) + 1)
    sizes = (2 ** (torch.rand(count, generator=generator) * top)).long().clamp(1, channels)
    order = torch.rand(count, channels, generator=generator).argsort(dim=1)
    return (order.argsort(dim=1) < sizes[:, None]).float()


def kernel_bank_filters() -> torch.Tensor:
    """The 84 length-9 filters with three taps of 2 and six of -1 (MiniRocket's, sum zero)."""
    rows = []
    for taps in itertools.combinations(range(9), 3):
        row = torch.full((9,), -1.0)
        row[list(taps)] = 2.0
        rows.append(row)
    return torch.stack(rows)


def kernel_bank_dilations(length: int) -> list[int]:
    """Dilations from 1 to the widest whose 9 taps fit in ``length``, geometrically spaced."""
    widest = max(1, (int(length) - 1) // 8)
    count = min(int(math.log2(widest)) + 1, KERNEL_BANK_MAX_DILATIONS)
    if count == 1:
        return [1]
    return sorted({round(widest ** (i / (count - 1))) for i in range(count)})


class KernelBank(nn.Module):
    """Fixed dilated filters, read per patch as the share of positions above learned-from-data
    thresholds (MiniRocket's "proportion of positive values", kept per token instead of pooled
    over the whole series).

    Nothing here is trained: the filters are constants, the per-channel mix is drawn from a
    fixed seed, and :meth:`calibrate` sets the thresholds once from training series, then the
    mean and spread of each share on those series, by which the output is standardised (a
    share's constant part would otherwise dwarf how it varies between series). Output
    ``(B, features, n_tokens)`` with
    ``features = len(dilations) * 84 * channel_mixes * len(quantiles)``.
    ``pool_steps`` > 1 (long series): the bank reads the series averaged over runs of that many
    steps, as the stem's features are, so its cost stops growing with the length.
    ``channel_mixes`` > 1 (multichannel series): every dilation gets its own draw of that many
    channel subsets per filter (sizes as MiniRocket draws them), so the bank has that many times
    the filters; 1 keeps one subset per filter, about half the channels, for every dilation.
    """

    weight: torch.Tensor
    thresholds: torch.Tensor
    share_mean: torch.Tensor
    share_scale: torch.Tensor
    summary_mean: torch.Tensor
    summary_scale: torch.Tensor
    valid: torch.Tensor

    def __init__(
        self,
        channels: int,
        length: int,
        patch_size: int,
        dilations: list[int],
        *,
        pool_steps: int = 1,
        channel_mixes: int = 1,
        summary: bool = False,
    ) -> None:
        super().__init__()
        check_runs(patch_size, pool_steps)
        self.pool_steps = int(pool_steps)
        self.summary = bool(summary)
        self.n_tokens = math.ceil(int(length) / int(patch_size))
        # Lengths and patches below count averaged positions (steps when nothing is averaged).
        self.length = math.ceil(int(length) / self.pool_steps)
        self.patch_size = int(patch_size) // self.pool_steps
        self.dilations = [int(d) for d in dilations]
        self.channel_mixes = int(channel_mixes) if channels > 1 else 1
        filters = kernel_bank_filters()
        generator = torch.Generator().manual_seed(0)
        if self.channel_mixes > 1:  # (dilations, filters x mixes, channels, 9)
            filters = filters.repeat(self.channel_mixes, 1)
            subsets = _channel_subsets(
                len(self.dilations) * len(filters), int(channels), generator
            ).view(len(self.dilations), len(filters), int(channels), 1)
            weight = filters[None, :, None, :] * subsets
        else:  # (filters, channels, 9), the same subsets at every dilation
            mix = torch.ones(len(filters), int(channels))
            if channels > 1:  # each filter reads a fixed random subset of the channels
                mix = (torch.rand(len(filters), int(channels), generator=generator) < 0.5).float()
                mix[
                    torch.arange(len(filters)),
                    torch.randint(channels, (len(filters),), generator=generator),
                ] = 1.0
            weight = filters[:, None, :] * mix[:, :, None]
        self.register_buffer("weight", weight)
        self.n_filters = len(filters)
        quantiles = len(KERNEL_BANK_QUANTILES)
        self.register_buffer(
            "thresholds", torch.zeros(len(self.dilations), len(filters), quantiles)
        )
        features = int(self.thresholds.numel())
        self.register_buffer("share_mean", torch.zeros(features, self.n_tokens))
        self.register_buffer("share_scale", torch.ones(features, self.n_tokens))
        if self.summary:  # only then, so bundles saved without it load unchanged
            self.register_buffer("summary_mean", torch.zeros(features))
            self.register_buffer("summary_scale", torch.ones(features))
        valid = torch.full((self.n_tokens,), float(self.patch_size))
        valid[-1] = self.length - (self.n_tokens - 1) * self.patch_size
        self.register_buffer("valid", valid, persistent=False)

    @property
    def n_features(self) -> int:
        return int(self.thresholds.numel())

    def _averaged(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_steps == 1:
            return x
        # ceil_mode without padding averages a short last run over the steps it has
        return F.avg_pool1d(x, self.pool_steps, ceil_mode=True)

    def _responses(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Responses at the ``index``-th dilation: ``(B, filters, L)``."""
        dilation = self.dilations[index]
        weight = self.weight[index] if self.weight.dim() == 4 else self.weight
        return F.conv1d(x, weight.to(x.dtype), padding=4 * dilation, dilation=dilation)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, seed: int = 0) -> None:
        """Set each filter's thresholds to quantiles of its responses on ``x`` (training series)."""
        generator = torch.Generator().manual_seed(int(seed))
        if len(x) > KERNEL_BANK_CALIBRATION_SERIES:
            x = x[torch.randperm(len(x), generator=generator)[:KERNEL_BANK_CALIBRATION_SERIES]]
        x = self._averaged(x.to(self.weight.device, torch.float32))
        levels = torch.tensor(KERNEL_BANK_QUANTILES, device=x.device)
        for index in range(len(self.dilations)):
            values = torch.cat([self._responses(c, index) for c in x.split(32)])
            values = values.transpose(0, 1).reshape(self.n_filters, -1)
            if values.shape[1] > KERNEL_BANK_CALIBRATION_VALUES:
                keep = torch.randperm(values.shape[1], generator=generator)
                values = values[:, keep[:KERNEL_BANK_CALIBRATION_VALUES].to(x.device)]
            self.thresholds[index] = torch.quantile(values, levels, dim=1).T
        self.share_mean.zero_()
        self.share_scale.fill_(1.0)
        shares = torch.cat([self._pooled_shares(chunk) for chunk in x.split(32)])
        self.share_mean.copy_(shares.mean(0))
        self.share_scale.copy_(shares.std(0, unbiased=False).clamp_min(KERNEL_BANK_MIN_SCALE))
        if self.summary:
            whole = self._whole_series(shares)
            self.summary_mean.copy_(whole.mean(0))
            self.summary_scale.copy_(whole.std(0, unbiased=False).clamp_min(KERNEL_BANK_MIN_SCALE))

    def _whole_series(self, shares: torch.Tensor) -> torch.Tensor:
        """Raw per-patch shares ``(B, features, T)`` -> shares over the whole series ``(B, features)``."""
        return (shares * self.valid).sum(-1) / self.length

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardise(self.raw_shares(x))

    def standardise(self, shares: torch.Tensor) -> torch.Tensor:
        """Raw per-patch shares (:meth:`raw_shares`) -> :meth:`forward`'s standardised output."""
        return (shares - self.share_mean) / self.share_scale

    def summarize(self, shares: torch.Tensor) -> torch.Tensor:
        """Raw per-patch shares -> the whole series' standardised shares ``(B, features)``.

        MiniRocket's own features (positives over every position), standardised over the
        training series like the per-patch ones.
        """
        if not self.summary:
            raise RuntimeError("this kernel bank was built without summary=True")
        return (self._whole_series(shares) - self.summary_mean) / self.summary_scale

    @torch.no_grad()
    def raw_shares(self, x: torch.Tensor) -> torch.Tensor:
        """Raw shares of the series ``x`` (steps, not yet averaged).

        Inside :func:`remembering_bank_shares` on the CPU, series read before are answered from
        memory (:data:`KERNEL_BANK_MEMO_BYTES`): the same values, without the convolutions.
        """
        x = x.float()
        if self not in _REMEMBERING or x.device.type != "cpu" or KERNEL_BANK_MEMO_BYTES <= 0:
            return self._pooled_shares(self._averaged(x))
        memo = _MEMOS.get(self)
        if (
            memo is None
            or not torch.equal(memo.weight, self.weight)
            or not torch.equal(memo.thresholds, self.thresholds)
        ):  # new, or the bank was calibrated or loaded since: what it remembers is stale
            memo = _MEMOS[self] = _SharesMemo(self.weight.clone(), self.thresholds.clone())
        x = x.contiguous()
        keys = [_row_key(row) for row in x]
        missing = [i for i, key in enumerate(keys) if key not in memo.rows]
        fresh_rows = set(missing)
        fresh = self._pooled_shares(self._averaged(x[missing])) if missing else None
        out = torch.empty(len(x), self.n_features, self.n_tokens)
        if fresh is not None:
            out[missing] = fresh
            for index, shares in zip(missing, fresh, strict=True):
                size = shares.numel() * shares.element_size()
                if memo.nbytes + size <= KERNEL_BANK_MEMO_BYTES:
                    memo.rows[keys[index]] = shares.clone()
                    memo.nbytes += size
        for index, key in enumerate(keys):
            if index not in fresh_rows:
                out[index] = memo.rows[key]
        return out

    def _pooled_shares(self, x: torch.Tensor) -> torch.Tensor:
        # Long series: a few rows at a time, so the (rows, features, length) mask stays ~64 MB.
        per_row = self.n_features * (self.length + 8 * max(self.dilations))
        rows = max(1, KERNEL_BANK_CHUNK_VALUES // per_row)
        if len(x) > rows:
            return torch.cat([self._pooled_shares(chunk) for chunk in x.split(rows)])
        pad = self.n_tokens * self.patch_size - self.length
        shares = []
        for index in range(len(self.dilations)):
            response = self._responses(x, index)  # (B, filters, L)
            above = response.unsqueeze(2) > self.thresholds[index][None, :, :, None]
            above = above.flatten(1, 2).float()
            if pad:
                above = F.pad(above, (0, pad))
            counts = F.avg_pool1d(above, self.patch_size) * self.patch_size
            shares.append(counts / self.valid)
        return torch.cat(shares, 1)


def image_patch_size(height: int, width: int, max_tokens: int, *, start: int = 1) -> int:
    """Smallest patch side p >= ``start`` whose padded grid has at most ``max_tokens`` cells."""
    patch = max(1, start)
    while math.ceil(height / patch) * math.ceil(width / patch) > max(1, max_tokens):
        patch += 1
    return patch


def _initial_positions(
    backbone: Backbone | None, n_tokens: int, grid: tuple[int, int] | None, width: int
) -> torch.Tensor:
    """Pretrained positions for the layout (zeros when the backbone has none or none is given)."""
    positions = None
    if backbone is not None:
        # Text bodies know 1D positions only: a 2D grid is read row-major.
        layout = grid if backbone.family == "vision" else None
        positions = backbone.position_embeddings(n_tokens, layout)
    if positions is None or tuple(positions.shape) != (n_tokens, width):
        return torch.zeros(n_tokens, width)
    return positions.detach().float().clone()


def _start_like_backbone_norm(norm: nn.LayerNorm, backbone: Backbone | None) -> None:
    """Initialise ``norm``'s scale and shift from the backbone's own input LayerNorm.

    A unit LayerNorm puts tokens at about twice the magnitude MiniLM's encoder was trained on;
    starting from the backbone's values puts them at the right scale before any alignment, which
    a few alignment steps at a small learning rate cannot do on their own.
    """
    source = backbone.input_norm() if backbone is not None else None
    if source is None or tuple(source.normalized_shape) != tuple(norm.normalized_shape):
        return
    with torch.no_grad():
        if source.weight is not None and norm.weight is not None:
            norm.weight.copy_(source.weight.detach().float())
        if source.bias is not None and norm.bias is not None:
            norm.bias.copy_(source.bias.detach().float())


class Embedder(nn.Module):
    """Base: LayerNorm + learned positions over whatever tokens :meth:`tokenize` makes."""

    input_kind: str
    #: how samples become tokens: "sequence" (Conv1d), "grid" (Conv2d) or "per_feature"
    layout: str

    def __init__(
        self,
        *,
        sample_shape: tuple[int, ...],
        embed_dim: int,
        n_tokens: int,
        patch_size: int,
        grid: tuple[int, int] | None,
        backbone: Backbone | None,
    ) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.embed_dim = embed_dim
        self.n_tokens = n_tokens
        self.patch_size = patch_size
        self.grid = grid
        self.norm = nn.LayerNorm(embed_dim)
        _start_like_backbone_norm(self.norm, backbone)
        self.positions = nn.Parameter(_initial_positions(backbone, n_tokens, grid, embed_dim))

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``(B, *sample_shape)`` input -> ``(B, T, embed_dim)`` tokens before norm/positions."""
        raise NotImplementedError

    def calibrate(self, x: torch.Tensor, seed: int = 0) -> None:
        """Fit any fixed, data-dependent part from normalised training samples (default: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *sample_shape)`` -> ``(B, n_tokens, embed_dim)``."""
        return self.norm(self.tokenize(x)) + self.positions

    @property
    def summary_features(self) -> int:
        """Width of the whole-sample features :meth:`encode` also returns (0: none)."""
        return 0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`'s tokens and the whole-sample features ``(B, summary_features)``."""
        return self(x), None

    @property
    def local_features(self) -> int:
        """Channels of the per-position features :meth:`encode_local` also returns (0: none)."""
        return 0

    def encode_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`'s tokens and per-position features ``(B, local_features, *S)``."""
        return self(x), None

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`embedder_from_config` rebuilds this layer."""
        return {
            "input_kind": self.input_kind,
            "layout": self.layout,
            "sample_shape": list(self.sample_shape),
            "embed_dim": self.embed_dim,
            "patch_size": self.patch_size,
        }


class SequenceEmbedder(Embedder):
    """``(C, L)`` sequences (or wide ``(D,)`` rows as ``(1, D)``): Conv1d patches of length p.

    ``pool_steps`` > 1 (long series): the stem's features are averaged over runs of that many
    steps before the projection, which then reads ``patch_size / pool_steps`` positions.
    ``kernel_dilations`` (non-empty): a :class:`KernelBank` with those dilations also reads the
    series, and a learned Linear adds its per-patch shares to each token. ``kernel_summary``
    (with a bank): :meth:`encode` also returns the bank's shares over the whole series, for a
    head that reads them beside the body (:class:`orca_engine.heads.Head` ``summary_features``).
    """

    layout = "sequence"

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        embed_dim: int,
        patch_size: int,
        backbone: Backbone | None = None,
        *,
        input_kind: str = "seq1d",
        stem_channels: int = 0,
        pool_steps: int = 1,
        kernel_dilations: list[int] | None = None,
        kernel_channel_mixes: int = 1,
        kernel_summary: bool = False,
        circular: bool = False,
        stem_layers: int = 1,
    ) -> None:
        check_runs(patch_size, pool_steps)
        channels, length = (1, sample_shape[0]) if len(sample_shape) == 1 else sample_shape
        n_tokens = math.ceil(length / patch_size)
        super().__init__(
            sample_shape=sample_shape,
            embed_dim=embed_dim,
            n_tokens=n_tokens,
            patch_size=patch_size,
            grid=None,
            backbone=backbone,
        )
        self.input_kind = input_kind
        self.length = int(length)
        self.pad = n_tokens * patch_size - self.length
        self.stem_channels = int(stem_channels)
        self.circular = bool(circular) and self.stem_channels > 0
        self.stem_layers = max(1, int(stem_layers)) if self.stem_channels > 0 else 1
        self.stem = local_stem(
            nn.Conv1d,
            int(channels),
            self.stem_channels,
            stem_kernel(patch_size),
            circular=self.circular,
            layers=self.stem_layers,
        )
        proj_in = int(channels) if self.stem is None else self.stem_channels
        self.pool_steps = int(pool_steps)
        positions = patch_size // self.pool_steps
        self.proj = nn.Conv1d(proj_in, embed_dim, kernel_size=positions, stride=positions)
        self.bank: KernelBank | None = None
        self.bank_proj: nn.Linear | None = None
        if kernel_dilations:
            self.bank = KernelBank(
                int(channels),
                self.length,
                patch_size,
                kernel_dilations,
                pool_steps=pool_steps,
                channel_mixes=kernel_channel_mixes,
                summary=kernel_summary,
            )
            self.bank_proj = nn.Linear(self.bank.n_features, embed_dim)

    def calibrate(self, x: torch.Tensor, seed: int = 0) -> None:
        if self.bank is not None:
            self.bank.calibrate(x.unsqueeze(1) if x.dim() == 2 else x, seed)

    @property
    def summary_features(self) -> int:
        return self.bank.n_features if self.bank is not None and self.bank.summary else 0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, summary, _ = self._tokens(x)
        return self.norm(tokens) + self.positions, summary

    @property
    def local_features(self) -> int:
        """The stem's channels: its output at every position, before patching."""
        return self.stem_channels if self.stem is not None else 0

    def encode_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, _, local = self._tokens(x)
        return self.norm(tokens) + self.positions, local

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)[0]

    def _tokens(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Tokens before norm and positions, the bank's whole-series shares (or None), and the
        stem's output at every position (or None without a stem)."""
        if x.dim() == 2:  # tabular rows read as a one-channel sequence
            x = x.unsqueeze(1)
        tokens = x
        local = None
        if self.stem is not None:
            tokens = local = self.stem(tokens)
        if self.pad:
            tokens = F.pad(tokens, (0, self.pad))
        if self.pool_steps > 1:
            tokens = F.avg_pool1d(tokens, self.pool_steps)
        tokens = self.proj(tokens).transpose(1, 2)
        summary = None
        if self.bank is not None and self.bank_proj is not None:
            shares = self.bank.raw_shares(x)  # fixed: no gradient reaches the bank
            per_patch = self.bank.standardise(shares).transpose(1, 2)
            tokens = tokens + self.bank_proj(per_patch.to(tokens.dtype))
            if self.bank.summary:
                summary = self.bank.summarize(shares).to(tokens.dtype)
        return tokens, summary, local

    def config(self) -> dict[str, Any]:
        config = {**super().config(), "stem_channels": self.stem_channels}
        if self.pool_steps > 1:  # absent in bundles written before long patches were averaged
            config["pool_steps"] = self.pool_steps
        if self.circular:  # absent when off, so bundles with a zero-padded stem rebuild unchanged
            config["circular"] = True
        if self.stem_layers > 1:  # absent for one layer, so older bundles rebuild unchanged
            config["stem_layers"] = self.stem_layers
        if self.bank is not None:  # absent when off, so bundles without a bank rebuild unchanged
            config["kernel_dilations"] = list(self.bank.dilations)
            if self.bank.channel_mixes > 1:  # absent in bundles from before channel mixes
                config["kernel_channel_mixes"] = self.bank.channel_mixes
            if self.bank.summary:  # absent in bundles from before whole-series shares
                config["kernel_summary"] = True
        return config


class ImageEmbedder(Embedder):
    """``(C, H, W)`` images: Conv2d patches on a bottom/right-padded image; ``grid`` = (rows, cols)."""

    input_kind = "image2d"
    layout = "grid"

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        embed_dim: int,
        patch_size: int,
        backbone: Backbone | None = None,
        *,
        stem_channels: int = 0,
    ) -> None:
        channels, height, width = sample_shape
        grid = (math.ceil(height / patch_size), math.ceil(width / patch_size))
        super().__init__(
            sample_shape=sample_shape,
            embed_dim=embed_dim,
            n_tokens=grid[0] * grid[1],
            patch_size=patch_size,
            grid=grid,
            backbone=backbone,
        )
        self.pad_bottom = grid[0] * patch_size - int(height)
        self.pad_right = grid[1] * patch_size - int(width)
        self.stem_channels = int(stem_channels)
        kernel = stem_kernel(patch_size, largest=IMAGE_STEM_MAX_KERNEL)
        self.stem = local_stem(nn.Conv2d, int(channels), self.stem_channels, kernel)
        proj_in = int(channels) if self.stem is None else self.stem_channels
        self.proj = nn.Conv2d(proj_in, embed_dim, kernel_size=patch_size, stride=patch_size)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        if self.pad_bottom or self.pad_right:
            x = F.pad(x, (0, self.pad_right, 0, self.pad_bottom))
        return self.proj(x).flatten(2).transpose(1, 2)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stem_channels": self.stem_channels}


class TabularEmbedder(Embedder):
    """``(D,)`` rows, one token per feature: ``x_i * w_i + b_i`` (FT-Transformer style)."""

    input_kind = "tabular"
    layout = "per_feature"

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        embed_dim: int,
        patch_size: int = 1,
        backbone: Backbone | None = None,
    ) -> None:
        (n_features,) = sample_shape
        super().__init__(
            sample_shape=sample_shape,
            embed_dim=embed_dim,
            n_tokens=int(n_features),
            patch_size=1,
            grid=None,
            backbone=backbone,
        )
        bound = 1.0 / math.sqrt(embed_dim)
        self.value_weight = nn.Parameter(torch.empty(n_features, embed_dim).uniform_(-bound, bound))
        self.value_bias = nn.Parameter(torch.empty(n_features, embed_dim).uniform_(-bound, bound))

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) * self.value_weight + self.value_bias


def _token_cap(backbone: Backbone, token_budget: int) -> int:
    return max(1, min(int(token_budget), int(backbone.max_tokens)))


def _check_shape(input_kind: str, sample_shape: tuple[int, ...]) -> None:
    expected = {"seq1d": 2, "image2d": 3, "tabular": 1}
    if input_kind not in expected:
        raise SpecError(f"unknown input kind {input_kind!r}; expected one of {INPUT_KINDS}")
    if len(sample_shape) != expected[input_kind] or min(sample_shape) < 1:
        raise SpecError(
            f"a {input_kind} sample needs {expected[input_kind]} positive dims, got {sample_shape}"
        )


def create_embedder(
    input_kind: str,
    sample_shape: tuple[int, ...],
    backbone: Backbone,
    *,
    token_budget: int,
    stem_channels: int = 0,
    kernel_bank: bool = False,
    kernel_summary: bool = False,
    circular: bool = False,
    stem_layers: int = 1,
) -> Embedder:
    """Choose patching for ``input_kind`` so at most ``token_budget`` tokens reach ``backbone``.

    ``circular``: a series' conv stem wraps around its ends (periodic domains; series only).
    ``stem_layers``: the series stem's depth (:func:`local_stem`; series only).
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    _check_shape(input_kind, sample_shape)
    cap = _token_cap(backbone, token_budget)
    width = backbone.embed_dim
    if input_kind == "seq1d":
        pool, patch = sequence_pooling(sequence_patch_size(sample_shape[1], cap))
        positions = math.ceil(sample_shape[1] / pool)  # what the bank reads after averaging
        dilations = kernel_bank_dilations(positions)
        return SequenceEmbedder(
            sample_shape,
            width,
            patch,
            backbone,
            stem_channels=stem_channels,
            pool_steps=pool,
            kernel_dilations=dilations if kernel_bank else None,
            kernel_channel_mixes=kernel_bank_channel_mixes(
                sample_shape[0], len(dilations), positions
            ),
            kernel_summary=kernel_bank and kernel_summary,
            circular=circular,
            stem_layers=stem_layers,
        )
    if input_kind == "image2d":
        _, height, image_width = sample_shape
        native = int(getattr(backbone, "patch_size", 1)) if backbone.family == "vision" else 1
        if math.ceil(height / native) * math.ceil(image_width / native) > cap:
            native = image_patch_size(height, image_width, cap, start=native)
        return ImageEmbedder(sample_shape, width, native, backbone, stem_channels=stem_channels)
    (n_features,) = sample_shape
    if n_features <= cap:
        return TabularEmbedder(sample_shape, width, 1, backbone)
    return SequenceEmbedder(
        sample_shape, width, sequence_patch_size(n_features, cap), backbone, input_kind="tabular"
    )


#: embedder options of benchmark-only levers that were not adopted and are gone (first
#: differences, dilated stems, pooled patches): the retired spec fields that name the embedder,
#: as its config spells them; only bundles written with them on carry the keys
RETIRED_OPTIONS = frozenset(
    name.removeprefix("embedder_") for name in RETIRED_FIELDS if name.startswith("embedder_")
)


def embedder_from_config(config: dict[str, Any], backbone: Backbone | None = None) -> Embedder:
    """Rebuild an embedder from :meth:`Embedder.config` (weights then come from a checkpoint)."""
    kind = config["input_kind"]
    shape = tuple(int(s) for s in config["sample_shape"])
    width, patch = int(config["embed_dim"]), int(config["patch_size"])
    if kind == "tabular":
        if config.get("layout", "per_feature") == "per_feature":
            return TabularEmbedder(shape, width, 1, backbone)
        return SequenceEmbedder(shape, width, patch, backbone, input_kind="tabular")
    stem = int(config.get("stem_channels", 0))
    retired = sorted(RETIRED_OPTIONS & config.keys())
    if retired:
        raise SpecError(
            f"this bundle's embedder uses {', '.join(retired)}, options measured and removed "
            "in engine 2026-12-03 (docs/QUALITY.md); load it with an older engine"
        )
    if kind == "seq1d":
        pool = int(config.get("pool_steps", 1))
        dilations = [int(d) for d in config.get("kernel_dilations") or []]
        return SequenceEmbedder(
            shape,
            width,
            patch,
            backbone,
            stem_channels=stem,
            pool_steps=pool,
            kernel_dilations=dilations or None,
            kernel_channel_mixes=int(config.get("kernel_channel_mixes", 1)),
            kernel_summary=bool(config.get("kernel_summary", False)),
            circular=bool(config.get("circular", False)),
            stem_layers=int(config.get("stem_layers", 1)),
        )
    if kind == "image2d":
        return ImageEmbedder(shape, width, patch, backbone, stem_channels=stem)
    raise SpecError(f"unknown embedder input kind {kind!r}")
