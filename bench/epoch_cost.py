"""Refinement epoch cost: what a job's epoch spends beyond its training steps, before and after.

Four costs of a job's epochs were measured (docs/QUALITY.md, sessions 22 and 23): writing the
resume file (the model, the optimizer's state and the best weights: ~370 MB for MiniLM) after
every epoch, AdamW updating its tensors one by one, copying (and writing) the frozen part of
the model, which in ``layernorm`` mode is all of the backbone but its LayerNorms, and the fixed
kernel bank of series embedders computing the same series' shares again every epoch. The same
job runs once per configuration per repeat, in one process, the order rotating:

* ``before``: a write after every epoch (``STATE_WRITE_COST_RATIO = 0``), the per-tensor AdamW
  (``FUSED_ADAMW = False``), the whole model in every write and best-weights copy
  (``SLIM_STATE = False``), the bank computing every time (``KERNEL_BANK_MEMO_BYTES = 0``):
  refinement as it was before session 22;
* ``session 22``: a write only once the training since the last one took the engine's ratio
  times that write, and the fused AdamW;
* ``slim state``: and the frozen weights snapshotted once, kept out of the file and the copies;
* ``engine``: and the bank remembering the series it has read during alignment and refinement,
  what a job runs now.

Each job is the suite's dataset, seed 0, every field ``auto`` except one model, a fixed number
of epochs, no early stopping and at most :data:`ALIGN_EPOCHS` alignment epochs (timed too, per
epoch). Timed: from the end of refinement's first epoch to the end of its last, per epoch
(every epoch but the first, with the writes of the epochs before it). The
validation metric is reported for each: the writes, copies and the bank's memory change
nothing; the fused update rounds differently from the per-tensor one and may move it a little.

Run: ``python -m bench.epoch_cost [--datasets burgers GunPoint GunPoint-long] [--epochs 12]
[--repeats 3] [--quick]``;
writes the section "Refinement epoch cost" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.sections import BENCHMARKS_MD, bench_command, machine_line, replace_section

TITLE = "Refinement epoch cost"
#: name -> (write after every epoch, fused AdamW, frozen weights out of the state, bank memo)
CONFIGS = {
    "before": (True, False, False, False),
    "session 22": (False, True, False, False),
    "slim state": (False, True, True, False),
    "engine": (False, True, True, True),
}
#: alignment epochs per run (at most: alignment may stop on a plateau)
ALIGN_EPOCHS = 6


def _one_run(name: str, epochs: int, config: str, threads: int) -> dict[str, Any]:
    import torch

    from bench.levers import run_one
    from orca_engine import embedders
    from orca_engine import refine as refine_module
    from orca_engine.progress import Callbacks

    torch.set_num_threads(threads)
    epoch_ends: list[float] = []
    align_ends: list[float] = []
    writes: list[int] = []
    sizes: list[int] = []
    real_save = refine_module.save_stage

    class EpochClock(Callbacks):
        def event(self, message: str, *, kind: str = "log", data: Any = None) -> None:
            if kind == "metric" and data and "epoch" in data:
                stage = data.get("stage")
                if stage in ("refine", "align"):
                    (epoch_ends if stage == "refine" else align_ends).append(time.monotonic())

    def counted_save(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        writes.append(int(state["epoch"]))
        sizes.append(Path(path).stat().st_size)

    every_epoch, fused, slim, memo = CONFIGS[config]
    defaults = (
        refine_module.STATE_WRITE_COST_RATIO,
        refine_module.FUSED_ADAMW,
        refine_module.SLIM_STATE,
        embedders.KERNEL_BANK_MEMO_BYTES,
    )
    if every_epoch:
        refine_module.STATE_WRITE_COST_RATIO = 0.0
    refine_module.FUSED_ADAMW = fused
    refine_module.SLIM_STATE = slim
    if not memo:
        embedders.KERNEL_BANK_MEMO_BYTES = 0
    refine_module.save_stage = counted_save  # type: ignore[assignment]
    try:
        result, _ = run_one(
            name,
            {"seed": 0},
            {
                "finetune_epochs": epochs,
                "ensemble_members": 1,
                "early_stopping_patience": 0,
                "align_epochs": ALIGN_EPOCHS,
            },
            callbacks=EpochClock(),
        )
    finally:
        (
            refine_module.STATE_WRITE_COST_RATIO,
            refine_module.FUSED_ADAMW,
            refine_module.SLIM_STATE,
            embedders.KERNEL_BANK_MEMO_BYTES,
        ) = defaults
        refine_module.save_stage = real_save  # type: ignore[assignment]
    # An epoch's metric event comes before its write: from the first event to the last, every
    # epoch but the first is timed, with the writes of the epochs before it.
    metric = str(result.resolved_spec.get("metric"))
    return {
        "per_epoch": (epoch_ends[-1] - epoch_ends[0]) / (len(epoch_ends) - 1),
        # alignment: from the first epoch's event to the last (None when it stopped at one)
        "align_per_epoch": (
            (align_ends[-1] - align_ends[0]) / (len(align_ends) - 1)
            if len(align_ends) > 1
            else None
        ),
        "writes": len(writes),
        "file_mb": max(sizes) / 1e6,
        "val": (result.metrics.get("val") or {}).get(metric),
        "metric": metric,
    }


def run(datasets: Sequence[str], epochs: int, repeats: int, threads: int) -> list[dict[str, Any]]:
    names = list(CONFIGS)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in datasets:
        runs[name] = {config: [] for config in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            for config in names[shift:] + names[:shift]:
                measured = _one_run(name, epochs, config, threads)
                runs[name][config].append(measured)
                print(name, config, measured, flush=True)
    return summarise(runs, epochs)


def summarise(
    runs: dict[str, dict[str, list[dict[str, Any]]]], epochs: int
) -> list[dict[str, Any]]:
    """One row per dataset and configuration from ``runs[dataset][config]`` (repeats in order)."""
    rows = []
    for name, by_config in runs.items():
        for config, measured in by_config.items():
            rows.append(
                {
                    "dataset": name,
                    "config": config,
                    "epochs": epochs,
                    "per_epoch": statistics.median(r["per_epoch"] for r in measured),
                    "vs_before": statistics.median(
                        r["per_epoch"] / b["per_epoch"]
                        for r, b in zip(measured, by_config["before"], strict=True)
                    ),
                    "writes": statistics.median(r["writes"] for r in measured),
                    "align_per_epoch": _median_or_none(r["align_per_epoch"] for r in measured),
                    "file_mb": statistics.median(r["file_mb"] for r in measured),
                    "val": sorted({r["val"] for r in measured}),
                    "metric": measured[0]["metric"],
                }
            )
    return rows


def _median_or_none(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | configuration | s/epoch | time vs before | resume writes | resume file "
        "| alignment s/epoch | validation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        values = ", ".join(f"{v:.6g}" for v in row["val"])
        lines.append(
            f"| {row['dataset']} | {row['config']} | {row['per_epoch']:.3f} | "
            f"{row['vs_before']:.2f}x | {row['writes']:g} of {row['epochs']} | "
            f"{row['file_mb']:.0f} MB | "
            + (f"{row['align_per_epoch']:.3f}" if row["align_per_epoch"] is not None else "—")
            + f" | {row['metric']} {values} |"
        )
    return "\n".join(lines)


def section(body_table: str, command: str, epochs: int, repeats: int, threads: int) -> str:
    """The BENCHMARKS.md section around ``body_table``."""
    from orca_engine.refine import STATE_WRITE_COST_RATIO

    body = f"""What a job's epochs spend beyond their training steps. `before`: the resume file
(`refine_state.pt`: the model, the optimizer's state and the best epoch's weights) written after
every epoch, AdamW updating its tensors one by one, the whole model in every write and every
copy of the best weights, and a series embedder's fixed kernel bank computing every series'
shares again in every epoch, as before session 22; `session 22`: the file written only once the
training since the last write took {STATE_WRITE_COST_RATIO:g} times what that write took (and
always after the first and the last epoch) and a fused AdamW (one kernel per step); `slim
state`: and the weights that do not train (in `layernorm` mode all of the backbone but its
LayerNorms) snapshotted once per run and left out of the file and the copies (session 23);
`engine`: and the kernel bank remembering the shares of the series it has read, during
alignment and refinement (session 23), what a job runs now. Each row: the suite's dataset, seed
0, every field `auto` except one model, {epochs} refinement epochs without early stopping and at
most {ALIGN_EPOCHS} alignment epochs; {threads} torch threads; the configurations in one
process, {repeats} repeats, order rotating; seconds per epoch from the end of the first epoch to
the end of the last (median; refinement's include validation), "time vs before" the median of
each repeat's ratio; "resume file" its largest size. Validation: the values the runs ended
with — writes, copies and the bank's memory change nothing (`session 22`, `slim state` and
`engine` agree exactly); the fused update is the same arithmetic as the per-tensor one rounded
differently.

{body_table}

{machine_line(command, device="cpu")}
"""
    return body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["burgers", "GunPoint", "GunPoint-long"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--quick", action="store_true", help="8 epochs, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 8, 2
    rows = run(args.datasets, args.epochs, args.repeats, args.threads)
    body_table = table(rows)
    print(body_table)
    command = bench_command(
        "bench.epoch_cost",
        [
            "--datasets",
            *args.datasets,
            "--epochs",
            str(args.epochs),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ],
    )
    body = section(body_table, command, args.epochs, args.repeats, args.threads)
    if not args.no_write:
        replace_section(BENCHMARKS_MD, TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
