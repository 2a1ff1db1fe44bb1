"""One way for every benchmark to write its part of docs/BENCHMARKS.md, and to say how it got it.

Each suite owns one section, written as::

    <!-- bench:<slug> -->
    ## <title>

    <body>

    <!-- /bench:<slug> -->

:func:`replace_section` swaps that block for a new one and leaves every other section as it was,
so suites can run in any order and one rerun never loses another's numbers. A section written
before the markers existed (a bare ``## <title>`` heading) is found by its heading and replaced
up to the next heading. :func:`machine_line` is the "produced by" line under every table: the
command, the machine and the date, so each number in the file can be traced and reproduced.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
DOCUMENT_TITLE = "# Benchmarks"


def slugify(title: str) -> str:
    """``"Alignment step speed"`` -> ``"alignment-step-speed"`` (the marker's name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError(f"a section title needs at least one letter or digit: {title!r}")
    return slug


def render_section(title: str, body_markdown: str) -> str:
    """The marked block for one section (no trailing newline)."""
    slug = slugify(title)
    return f"<!-- bench:{slug} -->\n## {title}\n\n{body_markdown.strip()}\n\n<!-- /bench:{slug} -->"


def replace_in_text(text: str, title: str, body_markdown: str) -> str:
    """``text`` with the section ``title`` replaced, or appended at the end when it has none."""
    block = render_section(title, body_markdown)
    slug = slugify(title)
    start_marker, end_marker = f"<!-- bench:{slug} -->", f"<!-- /bench:{slug} -->"
    start = text.find(start_marker)
    end = text.find(end_marker, start + len(start_marker)) if start >= 0 else -1
    if start >= 0:
        if end < 0:
            raise ValueError(f"{start_marker} has no {end_marker} after it; fix the file by hand")
        return text[:start] + block + text[end + len(end_marker) :]

    heading = re.search(rf"^## {re.escape(title)}[ \t]*$", text, flags=re.MULTILINE)
    if heading is not None:
        # An unmarked section ends where the next heading or marked section begins.
        following = re.compile(r"^(#{1,2} |<!-- bench:)", flags=re.MULTILINE)
        next_part = following.search(text, heading.end())
        stop = next_part.start() if next_part is not None else len(text)
        tail = text[stop:]
        return text[: heading.start()] + block + ("\n\n" + tail if tail else "\n")

    if not text.strip():
        text = DOCUMENT_TITLE + "\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def replace_section(doc_path: str | Path, title: str, body_markdown: str) -> None:
    """Replace (or append) the section ``title`` of the Markdown file ``doc_path``.

    The file is rewritten atomically (a temporary file renamed over it), so an interrupted run
    leaves either the old or the new document, never half of one.
    """
    path = Path(doc_path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    updated = replace_in_text(text, title, body_markdown).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(updated, encoding="utf-8")
    os.replace(scratch, path)


def bench_command(module: str, argv: Sequence[str]) -> str:
    """The command line that reproduces a run: ``python -m <module> <args>``."""
    return shlex.join(["python", "-m", module, *argv])


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The first CUDA device's name, or ``"none"``.

    Asks torch only when the benchmark has imported it already (importing it here would cost
    seconds), nvidia-smi otherwise.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "none"
    names = [line.strip() for line in answer.stdout.splitlines() if line.strip()]
    return names[0] if names else "none"


def torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def machine_line(command: str, *, device: str | None = None, notes: str = "") -> str:
    """The "produced by" line under a table: command, date, CPU, GPU, torch, device used."""
    parts = [
        f"Produced by `{command}` on {dt.date.today().isoformat()}",
        f"CPU: {cpu_model()} ({os.cpu_count()} cores)",
        f"GPU: {gpu_name()}",
        f"torch {torch_version()}",
    ]
    if device is not None:
        parts.append(f"device: {device}")
    if notes:
        parts.append(notes)
    return "_" + " · ".join(parts) + "._"
