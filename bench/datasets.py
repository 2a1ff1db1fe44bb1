"""The quality suite's datasets, built from files that ship in wheels (no downloads).

Each dataset becomes one ``.npz`` with ``x_train, y_train, x_test, y_test`` (the engine holds out
its own validation share of train), written once into a cache directory and reused:

* UCR/UEA series from aeon with their own train/test splits: GunPoint, ArrowHead,
  ItalyPowerDemand, BasicMotions (6 channels), JapaneseVowels (unequal length, NaN-padded at the
  end to the longest series of either split; the engine reads trailing NaN as padding);
* scikit-learn's digits as ``(N, 1, 8, 8)`` images, breast_cancer (tabular classification) and
  diabetes (tabular regression), each with a seeded stratified 70/30 split (diabetes: stratified
  on target quintiles);
* ``burgers``: 1D viscous Burgers, ``u(x, 0) -> u(x, T)`` on 64 grid points (dense regression),
  solved here with a pseudo-spectral method;
* ``darcy1d``: 1D Darcy flow, a two-valued permeability -> the pressure (exact solver);
* ``allen_cahn``: 1D Allen-Cahn reaction-diffusion, a small smooth field -> the phase-separated
  field at time T (the same pseudo-spectral solver; nonlinear growth towards +-1 with interfaces);
* ``<name>-10shot``: every classification set with at most 10 labelled training rows per class
  (a seeded subsample; the test split is the full one);
* ``GunPoint-long``: GunPoint linearly resampled to 20x its length (3,000 steps), the same
  curves and splits: a long-series case whose answer the short set tells.

Labels are stored as integer class ids ``0..K-1`` so peers and the engine see the same classes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: bump when a builder changes, so cached .npz files from an older builder are rebuilt
BUILDER_VERSION = 2
SPLIT_SEED = 0
FEW_SHOT_PER_CLASS = 10
FEW_SHOT_SUFFIX = "-10shot"
TEST_FRACTION = 0.3
LONG_FACTOR = 20

# Burgers: viscosity, horizon, solver and output grid sizes, samples, initial-condition modes.
BURGERS_VISCOSITY = 0.1
BURGERS_T = 1.0
BURGERS_SOLVER_POINTS = 256
BURGERS_GRID = 64
BURGERS_SAMPLES = 400
BURGERS_MODES = 5
BURGERS_DT = 2.5e-3
#: 1D Darcy flow -(a u')' = 1 on [0, 1], u(0) = u(1) = 0: the permeability a -> the pressure u
DARCY_SOLVER_POINTS = 1024
DARCY_GRID = 64
DARCY_SAMPLES = 400
DARCY_MODES = 8
DARCY_HIGH, DARCY_LOW = 12.0, 3.0
#: 1D Allen-Cahn u_t = D u_xx + u - u^3 (periodic): a small smooth field -> phase-separated at T
ALLEN_CAHN_DIFFUSIVITY = 0.05
ALLEN_CAHN_T = 1.5
ALLEN_CAHN_DT = 1e-2
ALLEN_CAHN_AMPLITUDE = 0.5
ALLEN_CAHN_SEED = 1

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetMeta:
    """What the harness needs to know about a dataset before loading it."""

    name: str
    #: "series" (N, C, L), "image" (N, 1, H, W), "tabular" (N, D), "field" (dense regression)
    kind: str
    task_type: str
    #: metric reported (and compared) for this dataset
    metric: str
    builder: Callable[[], Arrays]


# --- aeon's UCR / UEA series -------------------------------------------------------------------


def _class_ids(y_train: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(np.concatenate([y_train, y_test]))
    return (
        np.searchsorted(classes, y_train).astype(np.int64),
        np.searchsorted(classes, y_test).astype(np.int64),
    )


def _pad_series(series: list[np.ndarray], length: int) -> np.ndarray:
    """(C, L_i) series -> one (N, C, length) array, NaN after each series' end."""
    channels = series[0].shape[0]
    out = np.full((len(series), channels, length), np.nan, dtype=np.float32)
    for i, one in enumerate(series):
        out[i, :, : one.shape[1]] = one
    return out


def _aeon(loader_name: str) -> Callable[[], Arrays]:
    def build() -> Arrays:
        import aeon.datasets

        loader = getattr(aeon.datasets, loader_name)
        x_train, y_train = loader(split="train")
        x_test, y_test = loader(split="test")
        if isinstance(x_train, list) or isinstance(x_test, list):  # unequal length
            length = max(s.shape[1] for s in [*x_train, *x_test])
            x_train, x_test = _pad_series(list(x_train), length), _pad_series(list(x_test), length)
        ids_train, ids_test = _class_ids(np.asarray(y_train), np.asarray(y_test))
        return (
            np.asarray(x_train, dtype=np.float32),
            ids_train,
            np.asarray(x_test, dtype=np.float32),
            ids_test,
        )

    return build


# --- scikit-learn sets ---------------------------------------------------------------------------


def _stratified_split(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> Arrays:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=strata
    )
    return x_train, y_train, x_test, y_test


def _digits() -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _stratified_split(x, y, y)


def _breast_cancer() -> Arrays:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    y = bunch.target.astype(np.int64)
    return _stratified_split(bunch.data.astype(np.float32), y, y)


def _diabetes() -> Arrays:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    y = bunch.target.astype(np.float32)
    quintiles = np.digitize(y, np.quantile(y, [0.2, 0.4, 0.6, 0.8]))
    return _stratified_split(bunch.data.astype(np.float32), y, quintiles)


# --- 1D fields: Burgers, Allen-Cahn, Darcy -------------------------------------------------------


def spectral_solve(
    u0: np.ndarray,
    linear: Callable[[np.ndarray], np.ndarray],
    nonlinear: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    t_end: float,
    dt: float,
) -> np.ndarray:
    """Integrate ``u_t = L u + N(u)`` on the periodic ``[0, 2*pi)`` to ``t_end``.

    ``linear(k)`` is ``L``'s Fourier symbol at the integer wavenumbers ``k``, applied exactly
    through the integrating factor ``exp(L t)`` (so stiffness does not limit ``dt``);
    ``nonlinear(v_hat, k)`` returns ``N(u)``'s Fourier coefficients. Classic RK4 in time. ``u0``
    is ``(N, P)`` (or ``(P,)``) on ``P`` equispaced points; the batch is advanced at once.
    """
    u0 = np.atleast_2d(np.asarray(u0, dtype=np.float64))
    points = u0.shape[-1]
    k = np.fft.rfftfreq(points, d=1.0 / points)  # integer wavenumbers 0..P/2
    steps = max(1, int(np.ceil(t_end / dt)))
    h = t_end / steps
    growth_half = np.exp(linear(k) * h / 2)
    growth_full = growth_half**2
    v = np.fft.rfft(u0)
    for _ in range(steps):
        a = h * nonlinear(v, k)
        b = h * nonlinear(growth_half * (v + a / 2), k)
        c = h * nonlinear(growth_half * v + b / 2, k)
        d = h * nonlinear(growth_full * v + growth_half * c, k)
        v = growth_full * v + (growth_full * a + 2 * growth_half * (b + c) + d) / 6
    return np.asarray(np.fft.irfft(v, n=points))


def burgers_solve(
    u0: np.ndarray,
    *,
    viscosity: float = BURGERS_VISCOSITY,
    t_end: float = BURGERS_T,
    dt: float = BURGERS_DT,
) -> np.ndarray:
    """Solve ``u_t + u u_x = viscosity * u_xx`` on the periodic ``[0, 2*pi)`` to ``t_end``.

    Pseudo-spectral (``spectral_solve``), 2/3-rule dealiasing of the nonlinear term.
    """
    points = np.shape(u0)[-1]

    def nonlinear(v_hat: np.ndarray, k: np.ndarray) -> np.ndarray:
        # -(u^2 / 2)_x in Fourier space
        u = np.fft.irfft(v_hat * (k < (2.0 / 3.0) * (points / 2)), n=points)
        return -0.5j * k * np.fft.rfft(u * u)

    return spectral_solve(u0, lambda k: -viscosity * k**2, nonlinear, t_end=t_end, dt=dt)


def allen_cahn_solve(
    u0: np.ndarray,
    *,
    diffusivity: float = ALLEN_CAHN_DIFFUSIVITY,
    t_end: float = ALLEN_CAHN_T,
    dt: float = ALLEN_CAHN_DT,
) -> np.ndarray:
    """Solve the Allen-Cahn equation ``u_t = diffusivity * u_xx + u - u^3`` on the periodic
    ``[0, 2*pi)`` to ``t_end``: ``L = 1 - diffusivity k^2`` exactly, ``-u^3`` by RK4."""
    points = np.shape(u0)[-1]

    def nonlinear(v_hat: np.ndarray, k: np.ndarray) -> np.ndarray:
        u = np.fft.irfft(v_hat, n=points)
        return -np.fft.rfft(u**3)

    return spectral_solve(u0, lambda k: 1.0 - diffusivity * k**2, nonlinear, t_end=t_end, dt=dt)


def burgers_initial_conditions(n: int, points: int, seed: int) -> np.ndarray:
    """Random smooth periodic fields: a few Fourier modes with 1/k^2 amplitudes, max |u| = 1."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 2 * np.pi, points, endpoint=False)
    modes = np.arange(1, BURGERS_MODES + 1)
    cos_part = rng.normal(size=(n, BURGERS_MODES)) / modes**2
    sin_part = rng.normal(size=(n, BURGERS_MODES)) / modes**2
    u0 = cos_part @ np.cos(np.outer(modes, x)) + sin_part @ np.sin(np.outer(modes, x))
    return np.asarray(u0 / np.abs(u0).max(axis=1, keepdims=True))


def darcy_coefficients(n: int, points: int, seed: int) -> np.ndarray:
    """Two-valued permeability fields (as in the 2D Darcy benchmark): a smooth random field
    of a few Fourier modes, ``DARCY_HIGH`` where it is positive and ``DARCY_LOW`` elsewhere."""
    rng = np.random.default_rng(seed)
    x = (np.arange(points) + 0.5) / points
    modes = np.arange(1, DARCY_MODES + 1)
    field = rng.normal(size=(n, DARCY_MODES)) / modes @ np.sin(np.pi * np.outer(modes, x))
    field += rng.normal(size=(n, 1)) * 0.3
    return np.where(field > 0, DARCY_HIGH, DARCY_LOW)


def darcy_solve(a: np.ndarray) -> np.ndarray:
    """The pressure of ``-(a u')' = 1``, ``u(0) = u(1) = 0``, for ``a`` on cell midpoints.

    Exact for piecewise-constant ``a``: the flux is ``a u' = c - x``, so ``u' = (c - x) / a``,
    and ``c`` makes ``u(1) = 0``; ``u`` is returned at the same midpoints.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    points = a.shape[-1]
    h = 1.0 / points
    x = (np.arange(points) + 0.5) * h
    c = (x / a).sum(-1, keepdims=True) / (1.0 / a).sum(-1, keepdims=True)
    # u' = (c - s) / a is linear in s inside a cell: its mean over a stretch is its midpoint value
    left = np.concatenate([np.zeros((len(a), 1)), np.cumsum((c - x) / a * h, -1)[:, :-1]], -1)
    return np.asarray(left + (c - (x - h / 4)) / a * (h / 2))


def _darcy() -> Arrays:
    a = darcy_coefficients(DARCY_SAMPLES, DARCY_SOLVER_POINTS, seed=SPLIT_SEED)
    u = darcy_solve(a)
    stride = DARCY_SOLVER_POINTS // DARCY_GRID
    x = a[:, None, stride // 2 :: stride].astype(np.float32)
    y = u[:, None, stride // 2 :: stride].astype(np.float32)
    n_train = round(DARCY_SAMPLES * (1 - TEST_FRACTION))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _periodic_field(u0: np.ndarray, solve: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    """``u0 -> solve(u0)`` on the solver grid, read on the output grid and split 70/30."""
    u_end = solve(u0)
    stride = u0.shape[-1] // BURGERS_GRID
    x = u0[:, None, ::stride].astype(np.float32)
    y = u_end[:, None, ::stride].astype(np.float32)
    n_train = round(len(u0) * (1 - TEST_FRACTION))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _allen_cahn() -> Arrays:
    u0 = burgers_initial_conditions(BURGERS_SAMPLES, BURGERS_SOLVER_POINTS, seed=ALLEN_CAHN_SEED)
    return _periodic_field(ALLEN_CAHN_AMPLITUDE * u0, allen_cahn_solve)


def _burgers() -> Arrays:
    u0 = burgers_initial_conditions(BURGERS_SAMPLES, BURGERS_SOLVER_POINTS, seed=SPLIT_SEED)
    return _periodic_field(u0, burgers_solve)


# --- data-limited variants -----------------------------------------------------------------------


def few_shot_indices(y_train: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted row indices keeping at most ``per_class`` rows of every class (seeded)."""
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(y_train == label))[:per_class]
        for label in np.unique(y_train)
    ]
    return np.sort(np.concatenate(keep))


def _few_shot(builder: Callable[[], Arrays]) -> Callable[[], Arrays]:
    def build() -> Arrays:
        x_train, y_train, x_test, y_test = builder()
        keep = few_shot_indices(y_train, FEW_SHOT_PER_CLASS, SPLIT_SEED)
        return x_train[keep], y_train[keep], x_test, y_test

    return build


def resample_series(x: np.ndarray, factor: int) -> np.ndarray:
    """``(N, C, L)`` series linearly interpolated onto ``L * factor`` evenly spaced points."""
    length = x.shape[-1]
    grid = np.linspace(0, length - 1, length * factor)
    steps = np.arange(length)
    return np.stack([[np.interp(grid, steps, s) for s in row] for row in x]).astype(np.float32)


def _long(builder: Callable[[], Arrays]) -> Callable[[], Arrays]:
    def build() -> Arrays:
        x_train, y_train, x_test, y_test = builder()
        return (
            resample_series(x_train, LONG_FACTOR),
            y_train,
            resample_series(x_test, LONG_FACTOR),
            y_test,
        )

    return build


# --- the registry --------------------------------------------------------------------------------

_BASE: list[DatasetMeta] = [
    DatasetMeta("GunPoint", "series", "classification", "accuracy", _aeon("load_gunpoint")),
    DatasetMeta("ArrowHead", "series", "classification", "accuracy", _aeon("load_arrow_head")),
    DatasetMeta(
        "ItalyPowerDemand",
        "series",
        "classification",
        "accuracy",
        _aeon("load_italy_power_demand"),
    ),
    DatasetMeta(
        "BasicMotions", "series", "classification", "accuracy", _aeon("load_basic_motions")
    ),
    DatasetMeta(
        "JapaneseVowels", "series", "classification", "accuracy", _aeon("load_japanese_vowels")
    ),
    DatasetMeta("digits", "image", "classification", "accuracy", _digits),
    DatasetMeta("breast_cancer", "tabular", "classification", "accuracy", _breast_cancer),
    DatasetMeta("diabetes", "tabular", "regression", "rmse", _diabetes),
    DatasetMeta("burgers", "field", "dense_regression", "relative_l2", _burgers),
    DatasetMeta("darcy1d", "field", "dense_regression", "relative_l2", _darcy),
    DatasetMeta("allen_cahn", "field", "dense_regression", "relative_l2", _allen_cahn),
]

DATASETS: dict[str, DatasetMeta] = {meta.name: meta for meta in _BASE}
for _meta in _BASE:
    if _meta.task_type == "classification":
        _name = _meta.name + FEW_SHOT_SUFFIX
        DATASETS[_name] = DatasetMeta(
            _name, _meta.kind, _meta.task_type, _meta.metric, _few_shot(_meta.builder)
        )


DATASETS["GunPoint-long"] = DatasetMeta(
    "GunPoint-long", "series", "classification", "accuracy", _long(_aeon("load_gunpoint"))
)


def build_arrays(name: str) -> Arrays:
    """The dataset's four arrays, built from scratch (no cache)."""
    try:
        meta = DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    return meta.builder()


def dataset_path(name: str, cache_dir: Path) -> Path:
    """The dataset's ``.npz`` in ``cache_dir``, built on first use (atomic write)."""
    path = Path(cache_dir) / "datasets" / f"{name}.v{BUILDER_VERSION}.npz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = build_arrays(name)
    partial = path.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp.npz")
    np.savez(partial, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    partial.replace(path)
    logger.info("built %s: train %s, test %s", name, x_train.shape, x_test.shape)
    return path


def load_arrays(name: str, cache_dir: Path) -> Arrays:
    """The cached ``.npz`` as arrays (built first if missing)."""
    with np.load(dataset_path(name, cache_dir), allow_pickle=False) as data:
        return data["x_train"], data["y_train"], data["x_test"], data["y_test"]


def file_digest(path: Path) -> str:
    """Short sha256 of a dataset file: results are keyed by it, so a changed dataset reruns."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
