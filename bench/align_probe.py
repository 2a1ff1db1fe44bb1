"""Probe: the default job with a gentler alignment, to see how far alignment's rewrite costs.

``python -m bench.align_probe DATASET SEED [--rate-factor F] [--affine-only]`` runs one default
(``auto``) job on a quality-suite dataset through :func:`orca_engine.pipeline.run_job`, with
alignment's Adam rate multiplied by ``F`` and/or only the embedder's positions and final
LayerNorm trained during alignment (refinement is the default's either way), and prints one JSON
line: test/val metrics, the alignment distance before/after and the wall time (through the
quality harness's own run, :func:`bench.quality._nn_child`). It patches the
engine for this process only; nothing here is part of the service. Datasets and the proxy come
from the quality harness's cache (``bench/.cache``; built on demand). Used in docs/QUALITY.md,
session 24.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench import datasets as bench_datasets
from bench.quality import BACKBONE, DEFAULT_CACHE, _nn_child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.align_probe")
    parser.add_argument("dataset", choices=sorted(bench_datasets.DATASETS))
    parser.add_argument("seed", type=int)
    parser.add_argument("--rate-factor", type=float, default=1.0)
    parser.add_argument("--affine-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import orca_engine.align as align

    real_align, real_trainable = align.align_embedder, align._make_trainable

    def gentler(*a: Any, **k: Any) -> Any:
        k["lr"] = k["lr"] * args.rate_factor
        return real_align(*a, **k)

    def affine_only(model: Any) -> None:
        real_trainable(model)
        for name, parameter in model.embedder.named_parameters():
            parameter.requires_grad_(name == "positions" or name.startswith("norm."))

    align.align_embedder = gentler
    if args.affine_only:
        align._make_trainable = affine_only
    body = _nn_child(
        {
            "spec": {"dataset_id": args.dataset, "backbone": BACKBONE, "seed": args.seed},
            "dataset_path": str(bench_datasets.dataset_path(args.dataset, DEFAULT_CACHE)),
            "device": "cpu",
            "threads": args.threads,
            "proxy_cache_dir": str(DEFAULT_CACHE / "proxies"),
            "resolved_overrides": {},
        }
    )
    line = {
        "dataset": args.dataset,
        "seed": args.seed,
        "rate_factor": args.rate_factor,
        "affine_only": args.affine_only,
        **{key: body[key] for key in ("test", "val", "alignment", "wall_s")},
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
