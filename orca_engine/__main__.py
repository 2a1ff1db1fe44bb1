"""Run the engine without the service.

    python -m orca_engine run --data gunpoint.npz --set finetune.epochs=5 --out model/
    python -m orca_engine run --data rows.csv --spec spec.json --out model/ --workdir work/
    python -m orca_engine predict --model model/ --input x.npy

``run`` logs progress to stderr and prints the final metrics as JSON on stdout; running it again
with the same ``--workdir`` resumes an interrupted job. ``predict`` prints
``{"predictions": [...], "probabilities": [...] | null}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orca_engine.progress import Callbacks

logger = logging.getLogger("orca_engine.cli")


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``finetune.epochs=5`` -> (["finetune", "epochs"], 5); values are JSON when they parse."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def build_spec(
    spec_file: Path | None, assignments: Sequence[tuple[list[str], Any]], data: Path
) -> dict[str, Any]:
    """The job spec dict: the file (if any) with each ``--set`` applied on top."""
    spec: dict[str, Any] = json.loads(spec_file.read_text()) if spec_file else {}
    for path, value in assignments:
        node = spec
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {'.'.join(path)}: {part!r} is not a section")
        node[path[-1]] = value
    spec.setdefault("dataset_id", data.stem)
    return spec


class LoggingCallbacks(Callbacks):
    """Events and a coarse overall progress line (every 10%) to the log."""

    def __init__(self) -> None:
        self._last_tenth = -1
        self.align_enabled = True

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        if data and data.get("stage") == "align" and "enabled" in data:
            self.align_enabled = bool(data["enabled"])
        logger.info("[%s] %s", kind, message)

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        from orca_engine.pipeline import overall_progress

        fraction = overall_progress(stage, step, total, self.align_enabled)
        tenth = int(fraction * 10)
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            shown = ", ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items())
            logger.info("%3d%% %s %d/%d %s", round(fraction * 100), stage, step, total, shown)


def _run(args: argparse.Namespace) -> int:
    from orca_engine.pipeline import run_job

    data = Path(args.data)
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out.with_name(out.name + ".work")
    spec = build_spec(Path(args.spec) if args.spec else None, args.set or [], data)
    result = run_job(
        spec,
        data,
        workdir,
        bundle_dir=out,
        callbacks=LoggingCallbacks(),
        device=args.device,
        proxy_cache_dir=args.proxy_cache,
        model_dirs=args.model_dir or (),
        label_column=args.label_column,
    )
    sys.stdout.write(json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from orca_engine.predict import load_model

    predictor = load_model(args.model, device=args.device)
    inputs = np.load(args.input, allow_pickle=False)
    sys.stdout.write(json.dumps(predictor.predict(inputs).to_dict()) + "\n")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orca_engine", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="fine-tune on a dataset file and export a bundle")
    run.add_argument("--data", required=True, help="dataset file (.npz, .csv, .parquet)")
    run.add_argument("--spec", help="task spec JSON file (SPEC §4)")
    run.add_argument(
        "--set",
        action="append",
        type=parse_assignment,
        metavar="KEY=VALUE",
        help="override a spec field, e.g. finetune.epochs=5 (repeatable)",
    )
    run.add_argument("--out", required=True, help="bundle directory to write")
    run.add_argument("--workdir", help="stage checkpoints (default: <out>.work); reuse to resume")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--model-dir", action="append", help="directory local backbones may live in")
    run.add_argument("--proxy-cache", help="directory for cached source-proxy features")
    run.add_argument("--label-column", help="label column of a .csv / .parquet file")
    run.set_defaults(handler=_run)

    predict = commands.add_parser("predict", help="predict with an exported bundle")
    predict.add_argument("--model", required=True, help="bundle directory")
    predict.add_argument("--input", required=True, help=".npy file: one sample or a batch")
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(handler=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from orca_engine.errors import EngineError

    try:
        handler = args.handler
        return int(handler(args))
    except EngineError as error:
        logger.error("%s: %s", error.code, error.message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
