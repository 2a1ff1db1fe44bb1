"""Alignment step speed: one embedder-learning step vs target size, ours vs recompute-everything.

A step is: a linear embedder (d x d) on the target rows, the distance to a 5,000-row source
(d = 384, 10 classes each side), backward, an Adam step. Each (method, size) runs in a fresh
process so its peak memory (CUDA peak on GPU, peak RSS on CPU) is its own. Our distances are
timed after one warm-up step (steady state: warm-started Sinkhorn); the baseline
``otdd_reference`` recomputes everything each call, so it is timed cold. The value difference
compares both on the same embedded features.

Run: ``python -m bench.align_speed [--quick] [--device cpu|cuda]``; writes the section
"Alignment step speed" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.sections import BENCHMARKS_MD, bench_command, machine_line, replace_section

SOURCE_ROWS = 5000
DIM = 384
CLASSES = 10
BASELINE_MAX_ROWS = 4000
BASELINE_MAX_SECONDS = 60.0
TITLE = "Alignment step speed"
METHODS = ("otdd", "otdd_gaussian", "mmd")


def _data(rows: int, seed: int, shift: float) -> tuple[Any, Any]:
    import torch

    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1)) * 0.5
    labels = torch.arange(rows) % CLASSES
    noise = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise + shift, labels


def _measure(method: str, rows: int, repeats: int, device: str, threads: int, queue: Any) -> None:
    """Child process: time ``repeats`` steps of ``method`` at ``rows`` target rows."""
    import torch

    torch.set_num_threads(threads)
    _reset_peak_rss()

    from orca_engine.distances import SourceData, create_distance, otdd_reference

    torch.manual_seed(0)
    source_x, source_y = _data(SOURCE_ROWS, seed=1, shift=0.0)
    target_x, target_y = _data(rows, seed=2, shift=0.3)
    source_x, target_x = source_x.to(device), target_x.to(device)
    source_y, target_y = source_y.to(device), target_y.to(device)
    embedder = torch.nn.Linear(DIM, DIM).to(device)
    with torch.no_grad():
        embedder.weight.copy_(torch.eye(DIM))
        embedder.bias.zero_()
    optimizer = torch.optim.Adam(embedder.parameters(), lr=1e-3)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    setup = 0.0
    if method == "reference":

        def step_value() -> Any:
            return otdd_reference(embedder(target_x), target_y, source_x, source_y)

    else:
        started = time.perf_counter()
        distance = create_distance(method, SourceData(source_x, source_y, "bench"), device=device)
        setup = time.perf_counter() - started

        def step_value() -> Any:
            return distance(embedder(target_x), target_y)

    def step() -> float:
        optimizer.zero_grad()
        value = step_value()
        value.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(value.detach())

    # Both sides report the value at the identity embedder: ours before its warm-up step, the
    # baseline from its only (first) step.
    value_at_start = float(step_value().detach()) if method == "otdd" else None
    if method != "reference":
        step()  # warm-up: the first call is a cold start
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - started)
        if method == "reference" and value_at_start is None:
            value_at_start = value
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mib()
    )
    queue.put(
        {
            "seconds": statistics.median(times),
            "peak_mib": peak,
            "setup": setup,
            "value": value_at_start,
        }
    )


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (spawned children inherit the parent's)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    """Peak RSS since :func:`_reset_peak_rss` (VmHWM), falling back to ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(method: str, rows: int, repeats: int, device: str, threads: int) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(method, rows, repeats, device, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return dict(result)


def run(
    sizes: list[int],
    repeats: int,
    device: str,
    threads: int,
    methods: Sequence[str] = METHODS,
) -> list[dict[str, Any]]:
    """Per target size: ``methods`` (must include ``otdd``) and, where affordable, the baseline.

    Each row maps a method name to ``{"seconds", "peak_mib", "setup", "value"}``; the baseline's
    entry ``"reference"`` also has ``"rel_diff"`` (its value vs ours on the same features).
    """
    if "otdd" not in methods:
        raise ValueError("the baseline is compared with 'otdd'; include it in methods")
    rows_out = []
    baseline_seconds = 0.0
    for rows in sizes:
        row: dict[str, Any] = {"rows": rows}
        for method in methods:
            result = _run_child(method, rows, repeats, device, threads)
            row[method] = result
            print(
                f"{rows:>5} {method:<14} {result['seconds']:.3f} s  {result['peak_mib']:.0f} MiB",
                flush=True,
            )
        too_slow = baseline_seconds * 2.5 > BASELINE_MAX_SECONDS
        if rows <= BASELINE_MAX_ROWS and not too_slow:
            result = _run_child("reference", rows, 1, device, threads)
            baseline_seconds = result["seconds"]
            ref_value = result["value"]
            ours_value = row["otdd"]["value"]
            result["rel_diff"] = abs(ours_value - ref_value) / abs(ref_value)
            row["reference"] = result
            print(
                f"{rows:>5} {'reference':<14} {result['seconds']:.3f} s  {result['peak_mib']:.0f} MiB",
                flush=True,
            )
        rows_out.append(row)
    return rows_out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| target rows | otdd s/step | otdd_gaussian s/step | mmd s/step | baseline s/step | "
        "baseline / otdd | value diff vs baseline | peak MiB otdd / gaussian / mmd / baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        ref = row.get("reference")
        ratio = f"{ref['seconds'] / row['otdd']['seconds']:.1f}x" if ref else "skipped"
        diff = f"{100 * ref['rel_diff']:.1e}%" if ref else "-"
        ref_time = f"{ref['seconds']:.2f}" if ref else "skipped"
        peaks = " / ".join(
            f"{row[m]['peak_mib']:.0f}" if m in row else "-"
            for m in ("otdd", "otdd_gaussian", "mmd", "reference")
        )
        lines.append(
            f"| {row['rows']} | {row['otdd']['seconds']:.2f} | {row['otdd_gaussian']['seconds']:.2f} | "
            f"{row['mmd']['seconds']:.3f} | {ref_time} | {ratio} | {diff} | {peaks} |"
        )
    setup = ", ".join(
        f"{m} {statistics.median(r[m]['setup'] for r in results):.1f} s"
        for m in ("otdd", "otdd_gaussian", "mmd")
    )
    lines.append("")
    lines.append(f"One-off source-side setup in the constructor (median over runs): {setup}.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 2000, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: stable timings on a CPU shared with other jobs)",
    )
    args = parser.parse_args(argv)
    sizes = [250, 500, 1000, 2000] if args.quick else [250, 500, 1000, 2000, 4000, 8000]
    repeats = 3 if args.quick else 5
    results = run(sizes, repeats, args.device, args.threads)
    body_table = table(results)
    print(body_table)
    command = bench_command(
        "bench.align_speed",
        [
            *(["--quick"] if args.quick else []),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ],
    )
    body = f"""torch intra-op threads: {args.threads} (POT's emd solves use a 2-thread pool). On a CPU
shared with other jobs, 2-thread torch timings varied up to 10x between runs; one thread is slower
but repeatable.

One embedder-learning step (linear 384x384 embedder forward, distance, backward, Adam step) vs
target rows, against {SOURCE_ROWS} source rows, d = {DIM}, {CLASSES} classes each side. Ours:
`create_distance(...)` (source-side work once in the constructor, plans solved without autograd,
warm-started Sinkhorn), median of {repeats} steady-state steps. Baseline: `otdd_reference`
(recomputes source statistics and the full label-to-label W2 matrix each call, autograd through
cold-started Sinkhorn), one step; skipped above {BASELINE_MAX_ROWS} rows or when the next size
would take over {BASELINE_MAX_SECONDS:.0f} s. Value diff: |ours - baseline| / baseline for the
same (identity-embedder) features. Peak memory: the measuring process's peak RSS on CPU
(VmHWM, includes ~0.3 GiB for torch itself and the source/target data) or the CUDA peak on GPU.

{body_table}

{machine_line(command, device=args.device)}
"""
    if not args.no_write:
        replace_section(BENCHMARKS_MD, TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
