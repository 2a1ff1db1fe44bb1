"""Probe: could a text source proxy have classes that lie apart in the pooled embedding space?

``python -m bench.proxy_separation [--rows N] [--seed S] [--classes K]`` embeds English text
through the packaged backbone's own embedding layer, mean-pooled over tokens exactly as the
``english-text`` proxy is (:func:`orca_engine.proxies.embed_token_ids`), under three kinds of
labels, and prints how far apart the classes lie (:func:`bench.align_probe.class_separation`:
leave-one-out 1-NN accuracy and the separation guard's between/within scatter ratio) on ``N``
seeded rows, one JSON line per candidate and a table:

* ``kmeans``: random spans of ``w`` tokens of the shipped sentences (``full``: the whole
  sentence with [CLS]/[SEP], the shipped proxy itself), labelled by seeded k-means — what the
  engine does for a proxy without labels;
* ``centre-token``: windows of ``w`` tokens around an occurrence of one of the ``K`` most
  frequent words, labelled by that word (a real label, local to the window);
* ``module``: whole sentences labelled by the standard-library package whose docstrings they
  come from, the ``K`` largest packages (a real topic label; the sentences are collected afresh
  from this interpreter's stdlib by :mod:`orca_engine.proxies.build_corpus`, in a child process
  because the walk imports every stdlib module).

The alignment stage matches the task's classes to the proxy's; session 25 found that the
shipped proxy's classes barely separate and that matching them draws the task's classes
together. Used in docs/QUALITY.md, session 26. Nothing here is part of the service.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from typing import Any

import numpy as np

from bench.align_probe import class_separation
from bench.quality import BACKBONE

SPAN_WIDTHS: tuple[int | None, ...] = (1, 2, 4, 8, 16, None)
WINDOW_WIDTHS = (3, 5, 9, 17)

_MODULE_WALK = (
    "import json, sys\n"
    "from orca_engine.proxies.build_corpus import collect_sentences_with_modules\n"
    "json.dump([[s, m.split('.')[0]] for s, m in collect_sentences_with_modules()], sys.stdout)\n"
)


def _padded(rows: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _embedded(backbone: Any, rows: list[list[int]]) -> Any:
    """Token-id rows of any lengths through the proxy's own pooling (non-padding tokens)."""
    from orca_engine.proxies import embed_token_ids

    ids, mask = _padded(rows)
    return embed_token_ids(backbone, ids, mask)


def _measure(backbone: Any, rows: list[list[int]], labels: np.ndarray) -> dict[str, float]:
    return class_separation(_embedded(backbone, rows).numpy(), labels)


def kmeans_spans(
    backbone: Any, encoded: list[list[int]], width: int | None, seed: int, k: int
) -> dict[str, float]:
    """Spans of ``width`` tokens (None: whole sentences with special tokens), k-means labels."""
    from orca_engine.distances import kmeans_labels

    rng = np.random.default_rng(seed)
    rows = []
    for tokens in encoded:
        if width is None:
            rows.append([backbone.tokenizer.cls_token_id, *tokens, backbone.tokenizer.sep_token_id])
        elif len(tokens) <= width:
            rows.append(tokens)
        else:
            start = int(rng.integers(0, len(tokens) - width + 1))
            rows.append(tokens[start : start + width])
    features = _embedded(backbone, rows)
    return class_separation(features.numpy(), kmeans_labels(features, k, seed))


def centre_token_windows(
    backbone: Any, encoded: list[list[int]], width: int, rows: int, seed: int, k: int
) -> dict[str, float]:
    """Windows of ``width`` tokens centred on one of the ``k`` most frequent words, labelled by it."""
    vocab = backbone.tokenizer.convert_ids_to_tokens
    counts = collections.Counter(token for tokens in encoded for token in tokens)
    words = [
        t for t, _ in counts.most_common() if vocab(t).isalpha() and not vocab(t).startswith("##")
    ]
    classes = {token: label for label, token in enumerate(words[:k])}
    half = width // 2
    found: list[tuple[int, int, int]] = []
    for i, tokens in enumerate(encoded):
        for j in range(half, len(tokens) - (width - half) + 1):
            if tokens[j] in classes:
                found.append((i, j - half, classes[tokens[j]]))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(found), size=min(rows, len(found)), replace=False)
    windows = [encoded[found[p][0]][found[p][1] : found[p][1] + width] for p in picks]
    return _measure(backbone, windows, np.array([found[p][2] for p in picks]))


def module_topics(backbone: Any, rows: int, seed: int, k: int) -> dict[str, float]:
    """Whole sentences labelled by their stdlib package, the ``k`` largest packages."""
    from orca_engine.proxies import TEXT_MAX_TOKENS

    walk = subprocess.run(
        [sys.executable, "-c", _MODULE_WALK], capture_output=True, text=True, check=True
    )
    pairs = json.loads(walk.stdout)
    largest = [name for name, _ in collections.Counter(m for _, m in pairs).most_common(k)]
    chosen = [(s, largest.index(m)) for s, m in pairs if m in largest]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(chosen), size=min(rows, len(chosen)), replace=False)
    sentences = [chosen[p][0] for p in picks]
    encoded = backbone.tokenizer(sentences, truncation=True, max_length=TEXT_MAX_TOKENS)
    return _measure(backbone, encoded["input_ids"], np.array([chosen[p][1] for p in picks]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_separation")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from orca_engine.backbones import create_backbone
    from orca_engine.proxies import TEXT_MAX_TOKENS, load_sentences

    torch.set_num_threads(args.threads)
    backbone: Any = create_backbone(BACKBONE)
    sentences = load_sentences()
    picks = np.random.default_rng(args.seed).choice(len(sentences), size=args.rows, replace=False)
    every = backbone.tokenizer(sentences, add_special_tokens=False)["input_ids"]
    sample = [every[i][: TEXT_MAX_TOKENS - 2] for i in picks]
    lines = []
    for width in SPAN_WIDTHS:
        sep = kmeans_spans(backbone, sample, width, args.seed, args.classes)
        lines.append({"labels": "kmeans", "width": width or "full", **sep})
    for width in WINDOW_WIDTHS:
        sep = centre_token_windows(backbone, every, width, args.rows, args.seed, args.classes)
        lines.append({"labels": "centre-token", "width": width, **sep})
    lines.append(
        {
            "labels": "module",
            "width": "full",
            **module_topics(backbone, args.rows, args.seed, args.classes),
        }
    )
    for line in lines:
        print(json.dumps({"rows": args.rows, "classes": args.classes, **line}))
    print("\n| labels | tokens per row | 1-NN | scatter ratio |\n|---|---|---|---|")
    for line in lines:
        print(
            f"| {line['labels']} | {line['width']} | {line['nn1']:.3f} | {line['scatter_ratio']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
