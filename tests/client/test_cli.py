"""The `orca` HTTP commands, run as subprocesses against a real service (exit codes and output)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.client.conftest import TINY_SPEC, ClientStack, tiny_arrays
from tests.worker.harness import REPO_ROOT, wait_for


@dataclass
class CliJob:
    result: subprocess.CompletedProcess[str]
    job: dict[str, Any]
    dataset_id: str


@pytest.fixture(scope="module")
def dataset_id(client_stack: ClientStack) -> str:
    x, y = tiny_arrays(40)
    with client_stack.client() as orca:
        return orca.upload_dataset(x, y, name="cli-waves").id


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "spec.json"
    path.write_text(json.dumps(TINY_SPEC))
    return path


@pytest.fixture(scope="module")
def cli_job(client_stack: ClientStack, dataset_id: str, spec_file: Path) -> Iterator[CliJob]:
    result = client_stack.cli(
        "jobs", "create", "--dataset", dataset_id, "--spec", str(spec_file),
        "--set", "finetune.epochs=1", "--set", "name=cli-job", "--wait", "--json",
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{client_stack.logs()}"
    yield CliJob(result, json.loads(result.stdout), dataset_id)


def test_datasets_upload_prints_the_report_table_and_ls_show_it(
    client_stack: ClientStack, tmp_path: Path
) -> None:
    x, y = tiny_arrays(20)
    path = tmp_path / "with-extra.npz"
    np.savez(path, x_train=x, y_train=y, notes=np.zeros(3))  # an unknown member: a warning
    uploaded = client_stack.cli("datasets", "upload", str(path), "--name", "extra")
    assert uploaded.returncode == 0, uploaded.stderr
    assert "validation report" in uploaded.stdout
    assert "warning" in uploaded.stdout and "notes" in uploaded.stdout
    assert "seq1d (1, 32)" in uploaded.stdout and "classification" in uploaded.stdout

    listed = client_stack.cli("datasets", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    newest = json.loads(listed.stdout)[0]
    assert newest["name"] == "extra" and newest["report"]["warnings"][0]["field"] == "notes"
    shown = client_stack.cli("datasets", "show", newest["id"])
    assert shown.returncode == 0 and newest["sha256"] in shown.stdout


def test_a_bad_upload_exits_1_with_the_report(client_stack: ClientStack, tmp_path: Path) -> None:
    x, y = tiny_arrays(20)
    x[0, 0, 0] = np.inf
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=x, y_train=y[:-1])
    human = client_stack.cli("datasets", "upload", str(path))
    assert human.returncode == 1
    assert "dataset_invalid" in human.stderr
    assert "x_train" in human.stderr and "y_train" in human.stderr and "infinite" in human.stderr
    machine = client_stack.cli("datasets", "upload", str(path), "--json")
    assert machine.returncode == 1
    report = json.loads(machine.stdout)["error"]["report"]
    assert {issue["field"] for issue in report["errors"]} == {"x_train", "y_train"}


def test_jobs_create_wait_json_exits_0_with_the_model(cli_job: CliJob) -> None:
    assert cli_job.job["status"] == "succeeded"
    assert cli_job.job["model_id"].startswith("mdl_")
    assert cli_job.job["name"] == "cli-job"
    assert cli_job.job["spec"]["finetune"]["epochs"] == 1  # --set beat the spec file
    assert cli_job.job["spec"]["backbone"] == "tiny-bert"


def test_predict_from_npy_writes_json(
    client_stack: ClientStack, cli_job: CliJob, tmp_path: Path
) -> None:
    model_id = cli_job.job["model_id"]
    x, _ = tiny_arrays(4, seed=3)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "answer.json"
    result = client_stack.cli(
        "predict", model_id, str(tmp_path / "x.npy"), "--json", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert json.loads(out.read_text()) == answer
    assert len(answer["predictions"]) == 4
    assert set(answer["predictions"]) <= {"ramp", "sine"}
    assert len(answer["probabilities"][0]) == 2


def test_tabular_csv_upload_train_and_predict(
    client_stack: ClientStack, spec_file: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 3)).round(4)
    target = np.where(features[:, 0] > 0, "high", "low")

    def write_csv(path: Path, rows: range) -> Path:
        lines = ["f1,f2,f3,target"]
        lines += [",".join([*map(str, features[i]), str(target[i])]) for i in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    train = write_csv(tmp_path / "train.csv", range(32))
    uploaded = client_stack.cli(
        "datasets", "upload", str(train), "--label-column", "target", "--json"
    )
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["input_kind"] == "tabular" and dataset["classes"] == ["high", "low"]

    created = client_stack.cli(
        "jobs", "create", "--dataset", dataset["id"], "--spec", str(spec_file),
        "--set", "finetune.epochs=1", "--wait", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    model_id = json.loads(created.stdout)["model_id"]

    # The label column of a held-out table is dropped before predicting, as at upload.
    held_out = write_csv(tmp_path / "held-out.csv", range(32, 40))
    human = client_stack.cli("predict", model_id, str(held_out), "--label-column", "target")
    assert human.returncode == 0, human.stderr
    assert "prediction" in human.stdout and "probability" in human.stdout
    rows = [line for line in human.stdout.splitlines() if '"high"' in line or '"low"' in line]
    assert len(rows) == 8


def test_cancelling_a_finished_job_exits_1_with_the_409(
    client_stack: ClientStack, cli_job: CliJob
) -> None:
    result = client_stack.cli("jobs", "cancel", cli_job.job["id"])
    assert result.returncode == 1
    assert "409" in result.stderr and "already finished" in result.stderr


def test_a_job_cancelled_while_waiting_exits_3(
    client_stack: ClientStack, cli_job: CliJob, spec_file: Path
) -> None:
    with client_stack.client() as orca:
        known = {job.id for job in orca.list_jobs()}
        command = [
            sys.executable, "-m", "cli.main", "jobs", "create", "--dataset", cli_job.dataset_id,
            "--spec", str(spec_file), "--set", "finetune.epochs=200",
            "--set", "finetune.early_stopping_patience=0", "--wait", "--json",
        ]  # fmt: skip
        env = client_stack.cli_env()
        waiting = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            new_job = wait_for(
                lambda: next((j for j in orca.list_jobs() if j.id not in known), None),
                timeout=30,
                what="the CLI to create its job",
            )
            orca.cancel_job(new_job.id)
            try:
                stdout, stderr = waiting.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                state = orca.get_job(new_job.id)
                raise AssertionError(
                    f"the CLI kept waiting; job {state}\n{client_stack.logs()}"
                ) from None
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    assert waiting.returncode == 3, stderr
    assert json.loads(stdout)["status"] == "cancelled"


def test_usage_errors_exit_2(client_stack: ClientStack) -> None:
    assert client_stack.cli("jobs", "create").returncode == 2  # --dataset missing
    bad_set = client_stack.cli("jobs", "create", "--dataset", "ds_x", "--set", "no-equals-sign")
    assert bad_set.returncode == 2 and "key.path=value" in bad_set.stderr
