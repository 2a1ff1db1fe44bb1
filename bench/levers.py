"""Recipe levers for the default job (issue 8): each variant of the recipe on the same splits.

A variant is a task-spec fragment plus resolved-value overrides (fields the spec does not expose,
such as ``augment`` or ``ema_decay``). Every run is one ``orca_engine.pipeline.run_job`` on the
dataset's official train/test split, test metric measured once at the end; results are appended
to ``bench/.cache/levers.jsonl`` (one line per dataset, variant, seed) and ``--summary`` prints
the mean ± std table that docs/QUALITY.md shows.

Run: ``python -m bench.levers --variants base,no-align --datasets GunPoint --seeds 0,1,2``
(``--threads 1`` each; start several in parallel on disjoint datasets), then
``python -m bench.levers --summary``. Which engine revision a line came from is recorded with it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.datasets import dataset_path

logger = logging.getLogger("bench.levers")

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = CACHE / "levers.jsonl"
#: single-model runs: ``auto`` now resolves to an ensemble on small sets, so levers measured one
#: model at a time say so explicitly (the session-2 and session-3 rows were single models)
LEVERS_OFF = {"augment": False, "label_smoothing": 0.0, "ema_decay": 0.0, "ensemble_members": 1}
#: the session-3 single-model recipe every session-4 variant starts from
LATE_STEM = {**LEVERS_OFF, "embedder_stem": 64, "selection_start": 0.5}

#: name -> (task-spec fragment, resolved overrides); "auto" is whatever the engine resolves now
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "auto": ({}, {}),
    "base": ({}, LEVERS_OFF),
    "no-align": ({"alignment": {"distance": "none"}}, LEVERS_OFF),
    # the values `auto` resolved to when these levers were on (weight-average horizon ~50 steps)
    "aug+ls+ema": ({}, {"augment": True, "label_smoothing": 0.1, "ema_decay": 0.98}),
    "ls+ema": ({}, {"augment": False, "label_smoothing": 0.1, "ema_decay": 0.98}),
    # fewer, longer patches: each token carries a stretch of shape, and steps get cheaper
    "tok16": ({}, {**LEVERS_OFF, "token_budget": 16}),
    "tok32": ({}, {**LEVERS_OFF, "token_budget": 32}),
    "tok16-lr3e-5": ({"finetune": {"lr": 3e-5}}, {**LEVERS_OFF, "token_budget": 16}),
    "tok16-lr1e-5": ({"finetune": {"lr": 1e-5}}, {**LEVERS_OFF, "token_budget": 16}),
    "tok16-stem": ({}, {**LEVERS_OFF, "token_budget": 16, "embedder_stem": 64}),
    "tok32-stem": ({}, {**LEVERS_OFF, "token_budget": 32, "embedder_stem": 64}),
    "tok16-stem-late": (
        {},
        {**LEVERS_OFF, "token_budget": 16, "embedder_stem": 64, "selection_start": 0.5},
    ),
    "tok16-stem-late-no-align": (
        {"alignment": {"distance": "none"}},
        {**LEVERS_OFF, "token_budget": 16, "embedder_stem": 64, "selection_start": 0.5},
    ),
    "tok16-stem-late-ens5": (
        {},
        {
            **LEVERS_OFF,
            "token_budget": 16,
            "embedder_stem": 64,
            "selection_start": 0.5,
            "ensemble_members": 5,
        },
    ),
    "tok16-stem-late-mix": (
        {},
        {
            **LEVERS_OFF,
            "token_budget": 16,
            "embedder_stem": 64,
            "selection_start": 0.5,
            "mixup_alpha": 0.4,
        },
    ),
    # session 4: fewer tokens still, and tuning only the LayerNorms of the body
    "tok8-stem-late": ({}, {**LATE_STEM, "token_budget": 8}),
    "tok16-stem-late-ln": ({"finetune": {"mode": "layernorm"}}, {**LATE_STEM, "token_budget": 16}),
    "tok8-stem-late-ln": ({"finetune": {"mode": "layernorm"}}, {**LATE_STEM, "token_budget": 8}),
    "tok8-stem-late-ln-no-align": (
        {"alignment": {"distance": "none"}, "finetune": {"mode": "layernorm"}},
        {**LATE_STEM, "token_budget": 8},
    ),
    "tok4-stem-late-ln": ({"finetune": {"mode": "layernorm"}}, {**LATE_STEM, "token_budget": 4}),
    "tok8-stem-late-ln-ens5": (
        {"finetune": {"mode": "layernorm"}},
        {**LATE_STEM, "token_budget": 8, "ensemble_members": 5},
    ),
    "tok4-stem-late-ln-ens5": (
        {"finetune": {"mode": "layernorm"}},
        {**LATE_STEM, "token_budget": 4, "ensemble_members": 5},
    ),
    # session 5, images: fewer tokens, each built by a conv stem from a neighbourhood of pixels
    # (everything else as `auto` resolves it, ensemble included)
    "img16": ({}, {"token_budget": 16, "embedder_stem": 0}),
    "img16-stem": ({}, {"token_budget": 16, "embedder_stem": 64}),
    "img4-stem": ({}, {"token_budget": 4, "embedder_stem": 64}),
    "img9-stem": ({}, {"token_budget": 9, "embedder_stem": 64}),
    "img64": ({}, {"token_budget": 64, "embedder_stem": 0}),
    "img4-stem-no-align": (
        {"alignment": {"distance": "none"}},
        {"token_budget": 4, "embedder_stem": 64},
    ),
    "img16-stem-no-align": (
        {"alignment": {"distance": "none"}},
        {"token_budget": 16, "embedder_stem": 64},
    ),
    # sessions 5 and 6 also measured first differences, a dilated stem, pooled patches and
    # timing-preserving augmentation (variants one-deriv, auto-deriv, stem4, one-stem4, pool,
    # pool-stem4, aug-noshift, one-aug-noshift); none was adopted and their code was removed in
    # session 8: rerun them from commit 492a870
    "flat": ({}, {"head_flat": True}),
    "one-flat": ({}, {"ensemble_members": 1, "head_flat": True}),
    # session 5, tables: any epoch may be selected (regression metrics are continuous)
    "sel0": ({}, {"selection_start": 0.0}),
    "sel-late": ({}, {"selection_start": 0.5}),
    # one model of whatever else `auto` resolves, all weights or only LayerNorms training
    "one-full": ({"finetune": {"mode": "full"}}, {"ensemble_members": 1}),
    "one-ln": ({"finetune": {"mode": "layernorm"}}, {"ensemble_members": 1}),
    # session 8: few-shot series, one model each, then the ensemble of what stood out
    "one-aug": ({}, {"ensemble_members": 1, "augment": True}),
    "one-mix": ({}, {"ensemble_members": 1, "mixup_alpha": 0.4}),
    "one-wd": ({}, {"ensemble_members": 1, "weight_decay": 0.1}),
    "one-tok4": ({}, {"ensemble_members": 1, "token_budget": 4}),
    "tok4": ({}, {"token_budget": 4}),
    # session 9: a fixed bank of dilated filters adds per-patch threshold shares to each token
    "one-bank": ({}, {"ensemble_members": 1, "embedder_kernel_bank": True}),
    "bank": ({}, {"embedder_kernel_bank": True}),
    "bank-noalign": ({"alignment": {"distance": "none"}}, {"embedder_kernel_bank": True}),
    # the default before session 9 (the bank off), for comparisons once `auto` turns it on
    "nobank": ({}, {"embedder_kernel_bank": False}),
    "one-nobank": ({}, {"ensemble_members": 1, "embedder_kernel_bank": False}),
    # session 10: the flat head reads a learned mix of the body's input and all its layers
    "layers": ({}, {"head_layer_mix": True}),
    "one-layers": ({}, {"ensemble_members": 1, "head_layer_mix": True}),
    # tables (and images): the flat head (variant "flat") with the layer mix
    "flat-layers": ({}, {"head_flat": True, "head_layer_mix": True}),
    # session 11: alignment and ensembles on tables, full fine-tuning with the bank (the
    # concatenated-layers head ran from docs/data/s11-cat-head.patch applied to this tree)
    # (session 15 reran it on the dense fields, where `auto` is every weight, twice the epochs
    # and three times the rate)
    "auto-noalign": ({"alignment": {"distance": "none"}}, {}),
    "ens5": ({}, {"ensemble_members": 5}),
    "ens5-noalign": ({"alignment": {"distance": "none"}}, {"ensemble_members": 5}),
    "one-model": ({}, {"ensemble_members": 1}),
    "one-model-noalign": ({"alignment": {"distance": "none"}}, {"ensemble_members": 1}),
    "full": ({"finetune": {"mode": "full"}}, {}),
    "full-noalign": ({"finetune": {"mode": "full"}, "alignment": {"distance": "none"}}, {}),
    "one-bank-nostem": (
        {},
        {"ensemble_members": 1, "embedder_kernel_bank": True, "embedder_stem": 0},
    ),
    "one-bank-noalign": (
        {"alignment": {"distance": "none"}},
        {"ensemble_members": 1, "embedder_kernel_bank": True},
    ),
    # session 12: a three-member ensemble for tables the budget gives one model (the bank's
    # feature dropout and whole-series shares ran from docs/data/s12-bank-levers.patch applied
    # to this tree)
    "ens3": ({}, {"ensemble_members": 3}),
    # session 17: two members, what a three-times larger point pass budget gives digits
    "ens2": ({}, {"ensemble_members": 2}),
    # session 13: ten cross-fitted members on ten folds (each trains on 90% of the rows); the
    # refit variants (members trained again on every row) ran from docs/data/s13-refit.patch
    "ens10": ({}, {"ensemble_members": 10}),
    # session 13: alignment run five times longer, without the plateau stop
    "align150": ({"alignment": {"epochs": 150}}, {}),
    # session 14, dense fields (burgers, darcy1d: 63 epochs is what a point task of their size
    # gets, so 126 is what `auto` now resolves for them); the dense-head variants ran from
    # docs/data/s14-dense-heads.patch applied to this tree
    "full-ep2": ({"finetune": {"mode": "full", "epochs": 126}}, {}),
    "full-ep2-noalign": (
        {"finetune": {"mode": "full", "epochs": 126}, "alignment": {"distance": "none"}},
        {},
    ),
    "full-t16": ({"finetune": {"mode": "full"}}, {"token_budget": 16}),
    "full-ep2-lr3": ({"finetune": {"mode": "full", "epochs": 126, "lr": 3e-4}}, {}),
    # the dense default before session 14, for comparisons now that `auto` trains every weight
    "ln-ep1": ({"finetune": {"mode": "layernorm", "epochs": 63}}, {}),
    # session 15: the rate of everything that trains in `layernorm` mode (LayerNorms, embedder
    # with the kernel bank's projection, head; `auto` is 1e-3), three times up and down
    "lr3e-3": ({"finetune": {"lr": 3e-3}}, {}),
    "lr3e-4": ({"finetune": {"lr": 3e-4}}, {}),
    # session 15: `auto` with 16 tokens (dense fields at the new rate)
    "auto-t16": ({}, {"token_budget": 16}),
    # session 15: `auto` without early stopping (the cosine schedule runs to its floor)
    # session 18: the head also reads the kernel bank's shares over the whole series
    "summary": ({}, {"head_kernel_summary": True}),
    "summary-noalign": ({"alignment": {"distance": "none"}}, {"head_kernel_summary": True}),
    "local-skip": ({}, {"head_local_skip": True}),
    # session 20: the series stem wraps around the ends (periodic fields) instead of zero padding
    "circular": ({}, {"embedder_circular": True}),
    # session 21: dense fields, a deeper series stem (residual layers dilated 2, then 4)
    "stem2": ({}, {"embedder_stem_layers": 2}),
    "stem3": ({}, {"embedder_stem_layers": 3}),
    "auto-nostop": ({"finetune": {"early_stopping_patience": 0}}, {}),
}


def _revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "orca_engine"], capture_output=True)
        return head + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(
    name: str,
    spec: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    *,
    callbacks: Any = None,
    keep_bundle: Path | None = None,
) -> tuple[Any, float]:
    """One job on the suite's dataset ``name`` on the CPU, in a scratch dir: (result, seconds).

    ``spec``'s dataset id is set to ``name``; ``overrides`` are resolved-spec overrides;
    ``keep_bundle``: copy the model bundle there (replacing what was there).
    """
    from orca_engine.pipeline import run_job

    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        result = run_job(
            {**spec, "dataset_id": name},
            dataset_path(name, CACHE),
            Path(tmp) / "work",
            bundle_dir=Path(tmp) / "bundle",
            callbacks=callbacks,
            device="cpu",
            proxy_cache_dir=CACHE / "proxies",
            resolved_overrides=overrides or None,
        )
        seconds = time.monotonic() - started
        if keep_bundle is not None:
            shutil.rmtree(keep_bundle, ignore_errors=True)
            shutil.copytree(Path(tmp) / "bundle", keep_bundle)
    return result, seconds


def run(
    variants: list[str],
    datasets: list[str],
    seeds: list[int],
    threads: int,
    keep_bundles: Path | None = None,
) -> None:
    """Run every variant on every dataset and seed; ``keep_bundles``: copy each model there."""
    import torch

    torch.set_num_threads(threads)
    revision = _revision()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        spec_fragment, overrides = VARIANTS[variant]
        for name in datasets:
            for seed in seeds:
                result, seconds = run_one(
                    name,
                    {"seed": seed, **spec_fragment},
                    overrides,
                    keep_bundle=(
                        keep_bundles / f"{variant}-{name}-{seed}"
                        if keep_bundles is not None
                        else None
                    ),
                )
                record = {
                    "variant": variant,
                    "dataset": name,
                    "seed": seed,
                    "test": result.metrics.get("test"),
                    "val": result.metrics.get("val"),
                    "alignment": result.metrics.get("alignment"),
                    "seconds": round(seconds, 1),
                    "finetune_epochs": result.resolved_spec.get("finetune_epochs"),
                    "finetune_mode": result.resolved_spec.get("finetune_mode"),
                    "token_budget": result.resolved_spec.get("token_budget"),
                    "ensemble_members": result.resolved_spec.get("ensemble_members"),
                    "epochs_run": len(result.curves.get("refine", [])),
                    "threads": threads,
                    "revision": revision,
                }
                with RESULTS.open("a") as out:
                    out.write(json.dumps(record) + "\n")
                logger.info("%s", json.dumps(record))


def _main_metric(test: dict[str, float]) -> float:
    for name in ("accuracy", "relative_l2", "rmse"):
        if name in test:
            return float(test[name])
    return float("nan")


def summary(path: Path = RESULTS) -> str:
    """Markdown table: mean ± population std of the test metric and mean wall time."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scores: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    seconds: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for row in rows:
        key = (row["variant"], row["dataset"])
        scores[key].append(_main_metric(row["test"] or {}))
        seconds[key].append(float(row["seconds"]))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    datasets = sorted({row["dataset"] for row in rows})
    lines = [
        "| variant | " + " | ".join(datasets) + " |",
        "|---" * (len(datasets) + 1) + "|",
    ]
    for variant in variants:
        cells = []
        for name in datasets:
            values = scores.get((variant, name))
            if not values:
                cells.append("—")
                continue
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            wall = statistics.mean(seconds[(variant, name)])
            cells.append(
                f"{statistics.mean(values):.3f} ± {spread:.3f} (n={len(values)}, {wall:.0f} s)"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="auto")
    parser.add_argument("--datasets", default="GunPoint,ArrowHead,ItalyPowerDemand")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="print the table and exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSONL to summarise")
    parser.add_argument(
        "--keep-bundles",
        type=Path,
        default=None,
        help="copy each run's model bundle to DIR/<variant>-<dataset>-<seed> (for analysis)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.summary:
        print(summary(args.results))
        return 0
    if (
        args.keep_bundles is not None
        and args.keep_bundles.exists()
        and not args.keep_bundles.is_dir()
    ):
        # checked before any run: finding out after the first hour's job would lose it
        parser.error(f"--keep-bundles {args.keep_bundles} exists and is not a directory")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    run(
        args.variants.split(","),
        args.datasets.split(","),
        [int(s) for s in args.seeds.split(",")],
        args.threads,
        args.keep_bundles,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
