"""bench.levers' command line refuses what would only fail after an hour of runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import levers


def test_keep_bundles_must_be_a_directory_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "bundles"
    target.write_text("not a directory")
    with pytest.raises(SystemExit) as raised:
        levers.main(["--keep-bundles", str(target), "--variants", "auto"])
    assert raised.value.code == 2
    assert f"--keep-bundles {target} exists and is not a directory" in capsys.readouterr().err


def test_an_unknown_variant_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        levers.main(["--variants", "auto,no-such-variant"])
    assert "no-such-variant" in capsys.readouterr().err
