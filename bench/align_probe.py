"""Probe: the default job with a gentler alignment, to see how far alignment's rewrite costs.

``python -m bench.align_probe DATASET SEED [--rate-factor F] [--scope embedder|output]``
runs one default (``auto``) job on a quality-suite dataset through
:func:`orca_engine.pipeline.run_job`, with alignment's Adam rate multiplied by ``F`` and/or the
spec's ``alignment.scope`` set (``output``: only the embedder's positions and output LayerNorm
train during alignment; refinement is the default's either way), and prints one JSON line:
test/val metrics, the alignment distance before/after and the wall time (through the quality
harness's own run, :func:`bench.quality._nn_child`). The rate factor patches the engine for this
process only; nothing here is part of the service.

``--separation`` stops after alignment and prints how far apart the classes of the alignment
rows lie in the embedder's pooled features before and after it, and in the source proxy's
(:func:`class_separation`: leave-one-out 1-NN accuracy and the between/within scatter ratio),
beside the distance; no refinement runs. It measures what alignment's steps do, so the
separation guard (``alignment.keep_separation``) is off for it and "after" is the last
embedder's. Datasets and the proxy come
from the quality harness's cache (``bench/.cache``; built on demand). Used in docs/QUALITY.md,
sessions 24 and 25 (session 24's ``--affine-only`` is session 25's ``--scope output``).

``--hold-separation W`` adds a term to alignment's objective that holds the classes apart:
``W * d0 * relu(log(HOLD_MARGIN * r0) - log r)``, with ``r`` the scatter ratio of the task's
classes in the pooled features (``r0``, ``d0``: the ratio and the distance at the first step),
differentiated beside the distance through the same features (:func:`_held_apart`). With the
guard on (the default job) the embedder handed on is then the closest one whose classes lie
at least as far apart as at the start, as before. Used in docs/QUALITY.md, session 26.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import numpy as np

from bench import datasets as bench_datasets
from bench.quality import BACKBONE, DEFAULT_CACHE, _nn_child

#: the proxy rows class_separation reads (its pairwise distances grow with the square)
SOURCE_ROWS = 2000
#: ``--hold-separation`` pushes back once the scatter ratio falls below this multiple of its start
HOLD_MARGIN = 1.05


class _AlignedOnly(BaseException):
    """Ends the job once alignment is measured (not an Exception: nothing on the way catches it)."""


def class_separation(features: Any, labels: Any) -> dict[str, float]:
    """How far apart the classes lie: leave-one-out 1-NN accuracy (Euclidean) and the engine's
    between/within scatter ratio (:func:`orca_engine.align.separation_ratio`, the guard's)."""
    import torch

    from orca_engine.align import separation_ratio

    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels))
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(float("inf"))
    nn1 = float((y[distances.argmin(1)] == y).double().mean())
    return {"nn1": round(nn1, 4), "scatter_ratio": round(separation_ratio(x, y), 4)}


def _held_apart(weight: float) -> Any:
    """A stand-in for ``orca_engine.align._distance_and_gradient`` whose objective also holds
    the task's classes apart (see ``--hold-separation``), through the engine's ``extra`` term."""
    import math

    import torch

    import orca_engine.align as align

    real = align._distance_and_gradient
    scatter = align.class_scatter
    start: dict[str, float] = {}

    def hold(features: Any, labels: Any, value: Any) -> Any:
        if len(torch.unique(labels)) < 2:
            return torch.zeros((), dtype=value.dtype)
        between, within = scatter(features.double(), labels)
        ratio = between / within
        start.setdefault("ratio", float(ratio.detach()))
        start.setdefault("distance", float(value.detach()))
        floor = math.log(HOLD_MARGIN * start["ratio"])
        return (weight * start["distance"] * torch.relu(floor - torch.log(ratio))).to(value.dtype)

    def distance_and_gradient(model: Any, x: Any, labels: Any, distance: Any, chunk: int) -> Any:
        return real(model, x, labels, distance, chunk, extra=hold)

    return distance_and_gradient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.align_probe")
    parser.add_argument("dataset", choices=sorted(bench_datasets.DATASETS))
    parser.add_argument("seed", type=int)
    parser.add_argument("--rate-factor", type=float, default=1.0)
    parser.add_argument("--scope", choices=("embedder", "output"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--separation", action="store_true")
    parser.add_argument("--hold-separation", type=float, default=0.0, metavar="W")
    args = parser.parse_args(argv)

    import torch

    import orca_engine.align as align

    real_align = align.align_embedder
    measured: dict[str, Any] = {}

    def pooled(model: Any, x: Any) -> Any:
        rows = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return align._pooled_features(model, rows, align.EMBED_CHUNK)

    def gentler(model: Any, x: Any, labels: Any, source: Any, **k: Any) -> Any:
        k["lr"] = k["lr"] * args.rate_factor
        if not args.separation:
            return real_align(model, x, labels, source, **k)
        before = class_separation(pooled(model, x), labels)
        result = real_align(model, x, labels, source, **k)
        measured.update(
            before=before,
            after=class_separation(pooled(model, x), labels),
            source=class_separation(
                source.features[:SOURCE_ROWS], source.labels[:SOURCE_ROWS].numpy()
            ),
            alignment={"before": result.before, "after": result.after},
        )
        raise _AlignedOnly

    # for this process only (setattr: the stand-ins take looser arguments than the engine's)
    setattr(align, "align_embedder", gentler)  # noqa: B010
    if args.hold_separation > 0:
        setattr(align, "_distance_and_gradient", _held_apart(args.hold_separation))  # noqa: B010
    spec: dict[str, Any] = {"dataset_id": args.dataset, "backbone": BACKBONE, "seed": args.seed}
    if args.scope is not None:
        spec["alignment"] = {"scope": args.scope}
    if args.separation:
        spec["alignment"] = {**spec.get("alignment", {}), "keep_separation": False}
    request = {
        "spec": spec,
        "dataset_path": str(bench_datasets.dataset_path(args.dataset, DEFAULT_CACHE)),
        "device": "cpu",
        "threads": args.threads,
        "proxy_cache_dir": str(DEFAULT_CACHE / "proxies"),
        "resolved_overrides": {},
    }
    if args.separation:
        with contextlib.suppress(_AlignedOnly):
            _nn_child(request)
        print(
            json.dumps(
                {
                    "dataset": args.dataset,
                    "seed": args.seed,
                    "scope": args.scope or "embedder",
                    "rate_factor": args.rate_factor,
                    "hold_separation": args.hold_separation,
                    "separation": measured,
                }
            )
        )
        return 0
    body = _nn_child(request)
    line = {
        "dataset": args.dataset,
        "seed": args.seed,
        "rate_factor": args.rate_factor,
        "hold_separation": args.hold_separation,
        "scope": body.get("resolved_spec", {}).get("align_scope", args.scope),
        **{key: body[key] for key in ("test", "val", "alignment", "wall_s")},
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
