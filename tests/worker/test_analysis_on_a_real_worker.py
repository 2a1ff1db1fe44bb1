"""A transferability analysis run by a real Celery worker, and a ``backbone: auto`` job that
takes its choice from it (recorded in the job's events and resolved spec)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.worker.conftest import Stack
from tests.worker.harness import tiny_spec, wait_for, write_tiny_npz

pytestmark = pytest.mark.slow

NAMED_PROXIES = ("english-text", "natural-images")


def _analysis(stack: Stack, dataset_id: str) -> dict[str, Any]:
    response = stack.client.http.get(f"/v1/datasets/{dataset_id}/analysis")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_analysis_runs_on_the_worker_and_an_auto_job_uses_it(stack: Stack, tmp_path: Path) -> None:
    dataset_id = stack.client.upload(write_tiny_npz(tmp_path / "waves.npz", seed=5), "waves")["id"]
    # A token-id dataset as an extra source proxy for the text backbones (named by its id).
    rng = np.random.default_rng(0)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, x_train=rng.integers(0, 900, size=(40, 16)), y_train=np.arange(40) % 2)
    tokens_id = stack.client.upload(tokens, "tokens")["id"]

    response = stack.client.http.post(
        f"/v1/datasets/{dataset_id}/analyze",
        json={
            "backbones": ["tiny-bert", "tiny-roberta", "tiny-vit"],
            "sources": [tokens_id],
            "allow_random_init": True,
            "sample_size": 40,
            "align_epochs": 3,
            "distance": "otdd_gaussian",
            "queue": "cpu",
        },
    )
    assert response.status_code == 202, response.text
    analysis_id = response.json()["id"]

    def finished() -> dict[str, Any] | None:
        analysis = _analysis(stack, dataset_id)
        return analysis if analysis["status"] in ("succeeded", "failed") else None

    done = wait_for(finished, timeout=240, interval=0.5, what=f"analysis\n{stack.logs()}")
    assert done["id"] == analysis_id
    assert done["status"] == "succeeded", (done, stack.logs())
    assert done["started_at"] and done["finished_at"] and done["seconds"] > 0
    ranked = [c for c in done["ranking"] if c["status"] == "ok"]
    pairs = {(c["backbone"], c["source"]) for c in done["ranking"]}
    # Each backbone with its own proxy, plus the token dataset shown by its id (never a path).
    assert {
        ("tiny-bert", "english-text"),
        ("tiny-roberta", "english-text"),
        ("tiny-vit", "natural-images"),
        ("tiny-bert", tokens_id),
        ("tiny-roberta", tokens_id),
        ("tiny-vit", tokens_id),
    } == pairs
    skipped = [c for c in done["ranking"] if c["status"] == "skipped"]
    assert [(c["backbone"], c["source"]) for c in skipped] == [("tiny-vit", tokens_id)]
    assert len(ranked) == 5 and [c["rank"] for c in ranked] == [1, 2, 3, 4, 5]
    assert all(c["before"] is not None and c["after"] is not None for c in ranked)
    assert done["best"] == {"backbone": ranked[0]["backbone"], "source": ranked[0]["source"]}

    # backbone auto (source auto): the best stored pair whose source a job can name by itself.
    expected = next(c for c in ranked if c["source"] in NAMED_PROXIES)
    spec = tiny_spec(dataset_id, backbone="auto")
    job = stack.client.create_job(spec)
    final = stack.client.wait_for_status(
        job["id"], ("succeeded", "failed"), timeout=240, service_logs=stack.logs
    )
    assert final["status"] == "succeeded", final
    resolved = final["resolved_spec"]
    assert (resolved["backbone"], resolved["source"]) == (
        expected["backbone"],
        expected["source"],
    )
    assert "transferability analysis" in resolved["reasons"]["backbone"]
    choice = [
        e
        for e in stack.client.events(job["id"])
        if e["kind"] == "choice" and (e["data"] or {}).get("param") == "backbone_source"
    ]
    assert len(choice) == 1
    assert choice[0]["data"]["analysis"]["ranking"][0]["backbone"] == ranked[0]["backbone"]
    assert f"ranked {expected['rank']} of 5" in choice[0]["message"]
