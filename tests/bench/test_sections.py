"""docs/BENCHMARKS.md is written by several suites; each must replace only its own section."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.sections import bench_command, machine_line, replace_in_text, replace_section


def test_a_new_document_gets_a_title_and_the_marked_section(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    replace_section(doc, "Speed", "| a | b |\n|---|---|\n| 1 | 2 |")
    assert doc.read_text() == (
        "# Benchmarks\n\n<!-- bench:speed -->\n## Speed\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "<!-- /bench:speed -->\n"
    )


def test_replacing_one_section_keeps_the_others_and_their_order(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    replace_section(doc, "Quality", "quality v1")
    replace_section(doc, "Speed", "speed v1")
    replace_section(doc, "Prediction load", "load v1")
    replace_section(doc, "Speed", "speed v2\n\nwith a second paragraph")
    text = doc.read_text()
    assert "speed v1" not in text
    assert text.count("## Speed") == 1
    assert "speed v2\n\nwith a second paragraph" in text
    assert text.index("quality v1") < text.index("speed v2") < text.index("load v1")
    replace_section(doc, "Speed", "speed v2\n\nwith a second paragraph")
    assert doc.read_text() == text  # writing the same body again changes nothing


def test_an_unmarked_section_is_found_by_its_heading_and_the_rest_kept() -> None:
    text = (
        "# Benchmarks\n\nIntro kept.\n\n## Alignment step speed\n\nold table\n\n### detail\n\n"
        "old detail\n\n## Prediction load\n\nload table\n"
    )
    updated = replace_in_text(text, "Alignment step speed", "new table")
    assert "old table" not in updated and "old detail" not in updated
    assert updated.startswith("# Benchmarks\n\nIntro kept.\n\n<!-- bench:alignment-step-speed -->")
    assert updated.endswith(
        "<!-- /bench:alignment-step-speed -->\n\n## Prediction load\n\nload table\n"
    )
    # the next run finds it by its markers
    again = replace_in_text(updated, "Alignment step speed", "newer table")
    assert "new table" not in again and again.count("## Alignment step speed") == 1


def test_a_title_that_only_prefixes_another_heading_is_not_taken_for_it() -> None:
    text = "# Benchmarks\n\n## Speed on GPU\n\ngpu numbers\n"
    updated = replace_in_text(text, "Speed", "cpu numbers")
    assert "gpu numbers" in updated and "cpu numbers" in updated


def test_an_unterminated_marker_is_an_error_not_a_silent_duplicate() -> None:
    with pytest.raises(ValueError, match="no <!-- /bench:speed -->"):
        replace_in_text("<!-- bench:speed -->\n## Speed\n\nhalf", "Speed", "x")


def test_the_produced_by_line_names_the_command_and_the_machine() -> None:
    command = bench_command("bench.speed", ["--quick", "--device", "cpu"])
    assert command == "python -m bench.speed --quick --device cpu"
    line = machine_line(command, device="cpu")
    assert f"`{command}`" in line
    for part in ("cores)", "GPU:", "torch ", "device: cpu"):
        assert part in line
