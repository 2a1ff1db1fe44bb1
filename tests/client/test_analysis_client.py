"""Transferability analysis through the Python client and the `orca datasets analyze` command,
against the real service and worker of this package."""

from __future__ import annotations

import json

import pytest

from orca_client import AnalysisFailed, ApiError, Client
from tests.client.conftest import ClientStack, tiny_arrays

QUICK = [
    "--allow-random-init",
    "--sample-size",
    "32",
    "--epochs",
    "2",
    "--distance",
    "otdd_gaussian",
]


@pytest.fixture(scope="module")
def dataset_id(client_stack: ClientStack) -> str:
    x, y = tiny_arrays(40, seed=4)
    with client_stack.client() as orca:
        return orca.upload_dataset(x, y, name="analysis-waves").id


def test_client_analyses_waits_and_reads_the_latest(
    orca: Client, dataset_id: str, client_stack: ClientStack
) -> None:
    x, y = tiny_arrays(20, seed=9)
    fresh = orca.upload_dataset(x, y, name="never-analysed").id
    with pytest.raises(ApiError) as missing:
        orca.get_analysis(fresh)
    assert missing.value.status == 404 and missing.value.code == "analysis_not_found"

    queued = orca.analyze_dataset(
        dataset_id,
        backbones=["tiny-bert", "tiny-vit"],
        allow_random_init=True,
        sample_size=32,
        align_epochs=2,
        distance="otdd_gaussian",
    )
    assert queued.status == "queued" and not queued.done
    done = queued.wait(timeout=180, poll_seconds=0.3)
    assert done.id == queued.id and done.status == "succeeded", client_stack.logs()
    assert [row["rank"] for row in done.ranking] == [1, 2]
    assert done.best == {
        "backbone": done.ranking[0]["backbone"],
        "source": done.ranking[0]["source"],
    }
    assert {row["source"] for row in done.ranking} == {"english-text", "natural-images"}
    assert orca.get_analysis(dataset_id).id == done.id


def test_cli_analyze_wait_prints_the_ranking_table(
    client_stack: ClientStack, dataset_id: str
) -> None:
    result = client_stack.cli(
        "datasets", "analyze", dataset_id, "--backbone", "tiny-bert", "--backbone", "tiny-roberta",
        *QUICK, "--wait",
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{client_stack.logs()}"
    assert "transferability of" in result.stdout
    assert "tiny-bert" in result.stdout and "tiny-roberta" in result.stdout
    assert "english-text" in result.stdout and "best" in result.stdout

    shown = client_stack.cli("datasets", "analysis", dataset_id, "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["status"] == "succeeded" and len(body["ranking"]) == 2
    assert body["params"]["backbones"] == ["tiny-bert", "tiny-roberta"]


def test_cli_analyze_exit_codes(client_stack: ClientStack, dataset_id: str) -> None:
    queued = client_stack.cli("datasets", "analyze", dataset_id, *QUICK, "--json")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["status"] == "queued"
    # Nothing measurable: the analysis fails and --wait exits 3 with the reason.
    failed = client_stack.cli(
        "datasets", "analyze", dataset_id, "--backbone", "no-such-backbone", *QUICK, "--wait"
    )
    assert failed.returncode == 3, f"{failed.stdout}\n{failed.stderr}"
    assert "no-such-backbone" in failed.stderr
    bad = client_stack.cli("datasets", "analyze", dataset_id, "--source", "wikipedia", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["param"] == "sources.0"
    unknown = client_stack.cli("datasets", "analysis", "ds_000000000000000000000000")
    assert unknown.returncode == 1 and "404" in unknown.stderr


def test_wait_raises_analysis_failed(orca: Client, dataset_id: str) -> None:
    with pytest.raises(AnalysisFailed) as failure:
        orca.analyze_dataset(
            dataset_id, backbones=["no-such-backbone"], sample_size=16, wait=True, timeout=120
        )
    assert failure.value.code == "bad_hyperparameter"
