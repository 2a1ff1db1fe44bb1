"""Run the benchmark suites in turn and regenerate docs/BENCHMARKS.md.

    python -m bench                         # every suite, full size (hours on a CPU)
    python -m bench --quick                 # every suite's quick mode
    python -m bench --only speed,align      # a subset, in the order given
    python -m bench --device cuda           # on a GPU

Suites: ``quality`` (bench.quality: ORCA vs baselines and peers), ``speed`` (bench.speed: each
cost vs its baseline), ``load`` (bench.load_predict: prediction and upload load), ``align``
(bench.align_speed: the alignment step in detail) and ``epochs`` (bench.epoch_cost: what a refinement
epoch spends beyond its training steps). Each writes its own section of
docs/BENCHMARKS.md and leaves the others alone, so a subset refreshes only its sections. A suite
that fails is reported and the rest still run; the exit status says whether all succeeded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

logger = logging.getLogger("bench")

SUITES = ("quality", "speed", "load", "align", "epochs")
MODULES = {
    "quality": "bench.quality",
    "speed": "bench.speed",
    "load": "bench.load_predict",
    "align": "bench.align_speed",
    "epochs": "bench.epoch_cost",
}
#: suites whose command line takes ``--device``
TAKES_DEVICE = {"quality", "speed", "align"}


def suite_argv(suite: str, *, quick: bool, device: str | None) -> list[str]:
    """The arguments one suite gets from ``python -m bench``'s own."""
    argv = ["--quick"] if quick else []
    if device is not None and suite in TAKES_DEVICE:
        argv += ["--device", device]
    return argv


def load_main(suite: str) -> Callable[[list[str]], int | None]:
    """The suite's ``main(argv)``; ImportError says clearly which suite is missing."""
    module = importlib.import_module(MODULES[suite])
    main: Callable[[list[str]], int | None] = module.main
    return main


def run_suite(suite: str, argv: list[str]) -> bool:
    """Run one suite in this process; True when it finished with status 0."""
    try:
        main = load_main(suite)
    except ImportError as error:
        logger.error("suite %s is not available (%s): skipped", suite, error)
        return False
    # Suites set ORCA_* variables and settings caches for the services they start; each gets
    # the environment this command started with.
    saved_environment = dict(os.environ)
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:
        logger.error("suite %s failed:\n%s", suite, traceback.format_exc())
        return False
    finally:
        os.environ.clear()
        os.environ.update(saved_environment)
        _clear_settings_cache()
    if status not in (0, None):
        logger.error("suite %s exited with status %s", suite, status)
        return False
    return True


def _clear_settings_cache() -> None:
    module = sys.modules.get("api.config")
    if module is not None:
        module.get_settings.cache_clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="each suite's quick mode")
    parser.add_argument(
        "--only",
        default=",".join(SUITES),
        help=f"comma-separated suites to run, in order (default: {','.join(SUITES)})",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu or cuda for the suites that take it (their default: cpu)",
    )
    args = parser.parse_args(argv)
    suites = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in suites if name not in SUITES]
    if unknown or not suites:
        parser.error(f"--only takes a comma-separated subset of {','.join(SUITES)}")
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)

    failed = []
    for suite in suites:
        suite_args = suite_argv(suite, quick=args.quick, device=args.device)
        logger.info("== %s: python -m %s %s", suite, MODULES[suite], " ".join(suite_args))
        started = time.monotonic()
        if not run_suite(suite, suite_args):
            failed.append(suite)
        logger.info("== %s done in %.0f s", suite, time.monotonic() - started)
    if failed:
        logger.error("failed or unavailable: %s", ", ".join(failed))
        return 1
    logger.info("docs/BENCHMARKS.md regenerated (%s)", ", ".join(suites))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
