"""Regenerate ``data/english_sentences.txt`` from the docstrings of CPython's standard library.

The English-text proxy needs real English prose, and nothing can be downloaded at run time. The
standard library's docstrings are plain technical English under the PSF licence and are present
wherever Python is. This script walks stdlib modules (importing each; failures are skipped),
collects module / class / function docstrings, splits them into sentences, drops anything that
looks like code, doctest output or a table, dedupes, and writes one sentence per line in a
stable order.

Run: ``python -m orca_engine.proxies.build_corpus [--max-sentences N]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

OUTPUT = Path(__file__).parent / "data" / "english_sentences.txt"

# Modules whose import has side effects (GUI windows, "this" prints the Zen, antigravity opens a
# browser) or that are platform specific.
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__"}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_HINTS = re.compile(
    r"[{}\[\]<>=_`|\\#@$~^*]|\(\)|::|->|\.\.\.|\b(?:def|self|None|True|False)\b"
)


def _docstrings(module_name: str) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except BaseException:  # any import failure just means "skip this module"
            return
    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for _, member in sorted(vars(module).items()):
        if getattr(member, "__module__", None) != module_name:
            continue
        if inspect.isclass(member) or inspect.isroutine(member):
            member_doc = inspect.getdoc(member)
            if member_doc:
                yield member_doc
            if inspect.isclass(member):
                for _, method in sorted(vars(member).items()):
                    if inspect.isroutine(method):
                        method_doc = inspect.getdoc(method)
                        if method_doc:
                            yield method_doc


def _paragraph_sentences(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        # Indented blocks, doctest prompts and option tables are code, not prose.
        if any(line.startswith((" ", ">>>", "...", "-", "*", "+")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        yield from _SENTENCE_END.split(text)


def is_prose(sentence: str) -> bool:
    """A sentence of ordinary English: capitalised, ends with a full stop, no code-like symbols."""
    words = sentence.split()
    if not 5 <= len(words) <= 50:
        return False
    if not (sentence[0].isupper() and sentence.endswith(".")):
        return False
    if _CODE_HINTS.search(sentence):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    if letters < 0.9 * len(sentence):
        return False
    # Identifiers such as foo.bar or camelCase betray code even without symbols.
    return not any(re.search(r"\w\.\w|[a-z][A-Z]", word) for word in words)


def _stdlib_module_names() -> Iterator[str]:
    """Top-level stdlib modules and the public submodules of stdlib packages."""
    for name in sys.stdlib_module_names:
        if name in SKIPPED_MODULES or name.startswith("_"):
            continue
        yield name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                package = importlib.import_module(name)
        except BaseException:  # unimportable here: skip
            continue
        if hasattr(package, "__path__"):
            for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
                parts = info.name.split(".")
                if not any(p.startswith("_") or p in ("test", "tests") for p in parts[1:]):
                    yield info.name


def collect_sentences_with_modules() -> Iterator[tuple[str, str]]:
    """Deduplicated prose sentences from the stdlib, in module-name order, each with the name of
    the module whose docstrings it came from (its first occurrence)."""
    seen: set[str] = set()
    for name in sorted(_stdlib_module_names()):
        for doc in _docstrings(name):
            for sentence in _paragraph_sentences(doc):
                sentence = " ".join(sentence.split())
                key = sentence.lower()
                if key not in seen and is_prose(sentence):
                    seen.add(key)
                    yield sentence, name


def collect_sentences(max_sentences: int) -> list[str]:
    """Deduplicated prose sentences from the stdlib, in module-name order."""
    sentences: list[str] = []
    for sentence, _ in collect_sentences_with_modules():
        if len(sentences) == max_sentences:
            break
        sentences.append(sentence)
    return sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-sentences", type=int, default=20000)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    sentences = collect_sentences(args.max_sentences)
    args.output.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    logging.basicConfig(level=logging.INFO)
    logger.info("wrote %d sentences to %s", len(sentences), args.output)


if __name__ == "__main__":
    main()
