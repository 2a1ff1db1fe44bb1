"""bench.proxy_separation: labelled text candidates measured through the real MiniLM embedding."""

from __future__ import annotations

import math

import pytest

from orca_engine.backbones import Backbone, create_backbone
from orca_engine.proxies import build_corpus


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    return create_backbone("minilm-l6").eval()


def test_one_token_windows_labelled_by_their_token_are_points_apart(minilm: Backbone) -> None:
    from bench.proxy_separation import centre_token_windows
    from orca_engine.proxies import load_sentences

    encoded = minilm.tokenizer(load_sentences()[:300], add_special_tokens=False)["input_ids"]
    one = centre_token_windows(minilm, encoded, 1, 200, 0, 5)
    # a one-token window at position 0 embeds to the same vector for every copy of the token
    assert one["nn1"] == 1.0 and math.isinf(one["scatter_ratio"])
    wide = centre_token_windows(minilm, encoded, 9, 200, 0, 5)
    assert wide["scatter_ratio"] < 1.0  # eight neighbours of context wash the label out


def test_kmeans_spans_of_whole_sentences_measure_the_shipped_proxy(minilm: Backbone) -> None:
    from bench.proxy_separation import kmeans_spans
    from orca_engine.proxies import load_sentences

    encoded = minilm.tokenizer(load_sentences()[:200], add_special_tokens=False)["input_ids"]
    result = kmeans_spans(minilm, encoded, None, 0, 4)
    assert 0.0 < result["scatter_ratio"] < math.inf and 0.0 < result["nn1"] <= 1.0


def test_collect_sentences_is_the_sentence_column_of_the_module_walk() -> None:
    pairs = []
    for pair in build_corpus.collect_sentences_with_modules():
        pairs.append(pair)
        if len(pairs) == 5:
            break
    assert build_corpus.collect_sentences(5) == [sentence for sentence, _ in pairs]
    assert all(module for _, module in pairs)
