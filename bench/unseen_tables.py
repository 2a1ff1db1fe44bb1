"""Spot check: the ``auto`` job on small tables outside the quality suite, beside the table peers.

``python -m bench.unseen_tables [wine iris linnerud] [--seed S] [--threads T]`` runs one default
job (every spec field ``auto``, the packaged MiniLM) through :func:`orca_engine.pipeline.run_job`
on scikit-learn's wine and iris (classification) and linnerud (three regression targets, 20 rows)
— sets no lever was ever measured on — with a seeded 70/30 split (stratified for classes), and
fits the peers a user would reach for on the same split: logistic regression or ridge on
standardised columns, and histogram gradient boosting (one per target for regression). Prints one
JSON line per set: the job's test metrics, the peers' (accuracy, or RMSE over every target),
the job's wall time. Used in docs/QUALITY.md, session 26. Nothing here is part of the service.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SETS = ("wine", "iris", "linnerud")
REGRESSION = {"linnerud"}


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loaders: dict[str, Any] = {
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
        "linnerud": datasets.load_linnerud,
    }
    x, y = loaders[name](return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def peers(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    regression: bool,
) -> dict[str, float]:
    """Linear model and gradient boosting on the same split (RMSE over every target, or accuracy)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if regression:
        targets = y_train.reshape(len(y_train), -1)
        linear = make_pipeline(StandardScaler(), RidgeCV()).fit(x_train, targets).predict(x_test)
        boosted = np.stack(
            [
                HistGradientBoostingRegressor(random_state=0).fit(x_train, column).predict(x_test)
                for column in targets.T
            ],
            axis=1,
        )
        truth = y_test.reshape(len(y_test), -1)
        return {
            "ridge_rmse": float(np.sqrt(((linear - truth) ** 2).mean())),
            "hgb_rmse": float(np.sqrt(((boosted - truth) ** 2).mean())),
        }
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    boosting = HistGradientBoostingClassifier(random_state=0)
    return {
        "logistic": float(logistic.fit(x_train, y_train).score(x_test, y_test)),
        "hgb": float(boosting.fit(x_train, y_train).score(x_test, y_test)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; no set named means all of :data:`SETS`."""
    parser = argparse.ArgumentParser(prog="python -m bench.unseen_tables")
    parser.add_argument("sets", nargs="*", metavar="SET", help=f"any of {', '.join(SETS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    unknown = [name for name in args.sets if name not in SETS]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    args.sets = args.sets or list(SETS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch
    from sklearn.model_selection import train_test_split

    from orca_engine.pipeline import run_job

    torch.set_num_threads(args.threads)
    for name in args.sets:
        x, y = _load(name)
        regression = name in REGRESSION
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.3, random_state=args.seed, stratify=None if regression else y
        )
        label_type = np.float32 if regression else np.int64
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            np.savez(
                root / "data.npz",
                x_train=x_train.astype(np.float32),
                y_train=y_train.astype(label_type),
                x_test=x_test.astype(np.float32),
                y_test=y_test.astype(label_type),
            )
            clock = time.perf_counter()
            result = run_job(
                {"dataset_id": name, "seed": args.seed},
                root / "data.npz",
                root / "work",
                bundle_dir=root / "bundle",
                device="cpu",
            )
            wall = time.perf_counter() - clock
        line = {
            "dataset": name,
            "seed": args.seed,
            "train": len(x_train),
            "test": len(x_test),
            "orca_test": result.metrics["test"],
            "peers": peers(x_train, y_train, x_test, y_test, regression),
            "wall_s": round(wall, 1),
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
