"""Transferability analysis: the ranking on a case whose answer is known, skipped candidates, and
how ``backbone: auto`` / ``alignment.source: auto`` jobs use it (recorded, and kept on resume).

The known case: the target is crops of scikit-learn's two sample photos (label = which photo).
One ``dataset:`` proxy holds *other crops of the same photos with the same labels* -- the target's
own distribution seen through the backbone's embedding layer, the "right modality" by
construction. Mismatched proxies (Gaussian-noise images, random text tokens through text
backbones) and another backbone family must rank below it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orca_engine.analyze import (
    MAX_ALIGN_EPOCHS,
    MAX_SAMPLE_SIZE,
    RANDOM_INIT_BACKBONES,
    AnalysisResult,
    Candidate,
    CandidateResult,
    analyze_transferability,
    available_backbones,
    choose_backbone_and_source,
    comparable_score,
    default_candidates,
)
from orca_engine.data import load_dataset
from orca_engine.distances import SourceData, create_distance
from orca_engine.errors import JobCancelled, SpecError
from orca_engine.pipeline import PREPARE_FILE, run_job
from orca_engine.progress import Callbacks
from orca_engine.specs import embedder_recipe


def photo_crops(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random square crops of the two sample photos, resized and ImageNet-normalised."""
    from sklearn.datasets import load_sample_images

    from orca_engine.proxies import normalise_images

    photos = [
        torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        for image in load_sample_images().images
    ]
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for _ in range(n):
        which = int(rng.integers(len(photos)))
        _, height, width = photos[which].shape
        side = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photos[which][:, top : top + side, left : left + side].unsqueeze(0)
        crops.append(
            torch.nn.functional.interpolate(
                crop, size=(size, size), mode="bilinear", antialias=True
            )
        )
        labels.append(which)
    return normalise_images(torch.cat(crops)).numpy().astype(np.float32), np.array(labels)


@pytest.fixture(scope="module")
def known_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    x, y = photo_crops(96, seed=1)
    np.savez(root / "target.npz", x_train=x, y_train=y)
    x_same, y_same = photo_crops(96, seed=2)
    np.savez(root / "same-photos.npz", x_train=x_same, y_train=y_same)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((96, 3, 32, 32)).astype(np.float32)
    np.savez(root / "noise.npz", x_train=noise, y_train=rng.integers(0, 2, 96))
    return {"root": root, **{p.stem: p for p in root.glob("*.npz")}}


class Recorder(Callbacks):
    def __init__(self, cancel_in_refine: bool = False) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []
        self.stages: list[str] = []
        self.cancel_in_refine = cancel_in_refine

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        self.stages.append(stage)
        if self.cancel_in_refine and stage == "refine" and step >= 1:
            raise JobCancelled()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_target_distributions_own_proxy_ranks_first(
    known_case: dict[str, Path], tmp_path: Path, seed: int
) -> None:
    dataset = load_dataset(known_case["target"])
    same, noise = f"dataset:{known_case['same-photos']}", f"dataset:{known_case['noise']}"
    candidates = [
        Candidate("tiny-vit", "natural-images"),
        Candidate("tiny-vit", same, "same-photos"),
        Candidate("tiny-vit", noise, "noise"),
        Candidate("tiny-swin", same, "same-photos"),
        Candidate("tiny-bert", "english-text"),
        Candidate("tiny-roberta", "english-text"),
        Candidate("tiny-bert", same, "same-photos"),  # image proxy for a text model: skipped
    ]
    recorder = Recorder()
    result = analyze_transferability(
        dataset,
        candidates,
        sample_size=64,
        align_epochs=5,
        seed=seed,
        callbacks=recorder,
        proxy_cache_dir=tmp_path,
        allow_random_init=True,
    )
    best = result.best
    assert best is not None
    assert (best.backbone, best.source) == ("tiny-vit", "same-photos"), [
        (c.backbone, c.source, c.score) for c in result.ranking
    ]
    ranked = result.ranking
    assert [c.rank for c in ranked] == list(range(1, 7))
    assert [c.score for c in ranked] == sorted(c.score for c in ranked)
    for candidate in ranked:
        # The score is the aligned distance in units of the proxy's own spread.
        assert candidate.score == pytest.approx(candidate.after / candidate.source_scale)
        assert math.isfinite(candidate.before) and candidate.epochs == 5
        assert len(candidate.curve) == 6
    # The short alignment moved the best pair closer, and noise is far from real photos.
    assert best.after < best.before
    by_pair = {(c.backbone, c.source): c for c in ranked}
    assert by_pair[("tiny-vit", "noise")].score > 5 * best.score
    skipped = [c for c in result.candidates if c.status == "skipped"]
    assert [(c.backbone, c.source) for c in skipped] == [("tiny-bert", "same-photos")]
    assert "text proxy dataset" in (skipped[0].reason or "")
    # One metric event per candidate, and the proxies were cached for the next analysis.
    assert sum(1 for kind, _, data in recorder.events if kind == "metric" and data) == 7
    assert set(recorder.stages) == {"analyze"}
    assert any(tmp_path.glob("natural-images-*.safetensors"))
    # The stored form round-trips to the same ranking.
    again = AnalysisResult.from_dict(result.to_dict())
    assert [(c.backbone, c.source, c.rank) for c in again.ranking] == [
        (c.backbone, c.source, c.rank) for c in ranked
    ]
    assert result.to_dict()["best"] == {"backbone": "tiny-vit", "source": "same-photos"}


@pytest.mark.parametrize("distance", ["otdd", "otdd_gaussian", "ot", "l2", "mmd"])
def test_the_score_does_not_change_when_a_backbone_space_is_rescaled(distance: str) -> None:
    """Raw distances grow with the square of an embedding space's scale; scores must not, or a
    backbone with larger embeddings would always look worse."""
    generator = torch.Generator().manual_seed(0)
    source_x = torch.randn(120, 16, generator=generator)
    target_x = torch.randn(90, 16, generator=generator) * 1.5 + 0.7
    source_y = torch.arange(120) % 3
    target_y = torch.arange(90) % 2
    scores, raws = [], []
    for factor in (1.0, 10.0):
        source = SourceData(source_x * factor, source_y, "proxy")
        raw = float(create_distance(distance, source, seed=0)(target_x * factor, target_y))
        raws.append(raw)
        scores.append(comparable_score(distance, raw, source)[0])
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    if distance != "mmd":  # a squared distance: 100 times larger in a 10 times larger space
        assert raws[1] == pytest.approx(100 * raws[0], rel=0.05)


def test_random_init_backbones_are_candidates_only_when_allowed(
    known_case: dict[str, Path],
) -> None:
    assert not set(RANDOM_INIT_BACKBONES) & set(available_backbones())
    assert set(RANDOM_INIT_BACKBONES) <= set(available_backbones(allow_random_init=True))
    dataset = load_dataset(known_case["target"])
    result = analyze_transferability(
        dataset, [Candidate("tiny-vit", "natural-images")], sample_size=16, align_epochs=1
    )
    assert result.best is None
    assert "allow_random_init" in (result.candidates[0].reason or "")
    pairs = default_candidates(["tiny-bert", "tiny-vit"], extra_sources=["natural-images"])
    assert pairs == [
        Candidate("tiny-bert", "english-text"),
        Candidate("tiny-vit", "natural-images"),
    ]


def test_analysis_bounds_keep_it_short(known_case: dict[str, Path]) -> None:
    dataset = load_dataset(known_case["target"])
    pair = [Candidate("tiny-vit", "natural-images")]
    with pytest.raises(SpecError, match="sample_size"):
        analyze_transferability(dataset, pair, sample_size=MAX_SAMPLE_SIZE + 1)
    with pytest.raises(SpecError, match="align_epochs"):
        analyze_transferability(dataset, pair, align_epochs=MAX_ALIGN_EPOCHS + 1)


def _stored(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {
        "distance": "otdd",
        "candidates": [
            {"backbone": b, "source": s, "status": "ok", "rank": i, "score": 0.1 * i, "after": i}
            for i, (b, s) in enumerate(pairs, start=1)
        ],
    }


def test_choice_takes_the_best_stored_pair_that_fits_the_job() -> None:
    stored = _stored(("tiny-vit", "natural-images"), ("minilm-l6", "english-text"))

    def must_not_run(_: list[Candidate]) -> AnalysisResult:
        raise AssertionError("a fitting stored analysis must be used as it is")

    allowed = choose_backbone_and_source(
        backbone="auto",
        source="auto",
        allow_random_init=True,
        stored_analysis=stored,
        run_analysis=must_not_run,
    )
    assert allowed is not None and (allowed.backbone, allowed.source) == (
        "tiny-vit",
        "natural-images",
    )
    assert "ranked 1 of 2" in allowed.reason
    # Without allow_random_init the random tiny model is passed over for the next fitting pair.
    pretrained = choose_backbone_and_source(
        backbone="auto", source="auto", allow_random_init=False, stored_analysis=stored
    )
    assert pretrained is not None and pretrained.backbone == "minilm-l6"
    assert "ranked 2 of 2" in pretrained.reason
    # A fixed source must match; a fixed backbone and source leave nothing to choose.
    text_only = choose_backbone_and_source(
        backbone="auto", source="english-text", allow_random_init=True, stored_analysis=stored
    )
    assert text_only is not None and text_only.backbone == "minilm-l6"
    assert (
        choose_backbone_and_source(
            backbone="tiny-bert", source="english-text", allow_random_init=True
        )
        is None
    )


def _job_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset_id": "photos",
        "backbone": "auto",
        "allow_random_init": True,
        "alignment": {"distance": "otdd_gaussian", "epochs": 1, "max_samples": 64},
        "finetune": {"epochs": 1, "batch_size": 16},
        "seed": 0,
    }
    spec.update(overrides)
    return spec


def _prepared_spec(workdir: Path) -> dict[str, Any]:
    import json

    return dict(json.loads((workdir / PREPARE_FILE).read_text())["resolved_spec"])


def test_an_auto_job_runs_the_analysis_and_records_its_choice(
    known_case: dict[str, Path], tmp_path: Path
) -> None:
    recorder = Recorder()
    result = run_job(
        _job_spec(),
        known_case["target"],
        tmp_path / "work",
        bundle_dir=tmp_path / "bundle",
        callbacks=recorder,
        proxy_cache_dir=tmp_path / "proxies",
        resolved_overrides={"token_budget": 16},
    )
    choices = [data for kind, _, data in recorder.events if kind == "choice" and data]
    chosen = [d for d in choices if d.get("param") == "backbone_source"]
    assert len(chosen) == 1, choices
    ranking = chosen[0]["analysis"]["ranking"]
    assert len(ranking) >= 4  # the four tiny models (plus MiniLM where it is installed)
    top = ranking[0]
    assert chosen[0]["value"] == {"backbone": top["backbone"], "source": top["source"]}
    assert result.resolved_spec["backbone"] == top["backbone"]
    assert result.resolved_spec["source"] == top["source"]
    assert "transferability analysis" in result.resolved_spec["reasons"]["backbone"]
    assert any("analysing" in message for _, message, _ in recorder.events)
    # The analysis ran inside the prepare stage: no made-up stage reached the progress bar.
    assert "analyze" not in recorder.stages


def test_a_resumed_auto_job_keeps_its_first_choice(
    known_case: dict[str, Path], tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    common: dict[str, Any] = {
        "bundle_dir": tmp_path / "bundle",
        "proxy_cache_dir": tmp_path / "proxies",
        "resolved_overrides": {"token_budget": 16},
    }
    first = Recorder(cancel_in_refine=True)
    with pytest.raises(JobCancelled):
        run_job(
            _job_spec(),
            known_case["target"],
            workdir,
            callbacks=first,
            stored_analysis=_stored(("tiny-roberta", "english-text")),
            **common,
        )
    assert not any("analysing" in message for _, message, _ in first.events)
    decided = _prepared_spec(workdir)
    assert (decided["backbone"], decided["source"]) == ("tiny-roberta", "english-text")
    assert "ranked 1 of 1" in decided["reasons"]["backbone"]

    # Resumed with a different stored ranking: the job must not decide again.
    second = Recorder()
    result = run_job(
        _job_spec(),
        known_case["target"],
        workdir,
        callbacks=second,
        stored_analysis=_stored(("tiny-vit", "natural-images")),
        **common,
    )
    assert result.resolved_spec["backbone"] == "tiny-roberta"
    assert not any(data and data.get("param") == "backbone_source" for _, _, data in second.events)


def _best(
    dataset_path: Path, cache: Path, align_epochs: int = 1, **embedder: Any
) -> CandidateResult:
    """One short tiny-bert + English-text analysis; what it measured for its one candidate."""
    result = analyze_transferability(
        load_dataset(dataset_path),
        [Candidate("tiny-bert", "english-text")],
        sample_size=32,
        align_epochs=align_epochs,
        proxy_cache_dir=cache,
        allow_random_init=True,
        **embedder,
    )
    assert result.best is not None
    return result.best


def _distance_before(dataset_path: Path, cache: Path, **embedder: int) -> float:
    """The starting distance of the embedder a short analysis measures."""
    before = _best(dataset_path, cache, **embedder).before
    assert before is not None
    return before


def test_the_analysis_measures_the_embedder_a_job_would_train(
    known_case: dict[str, Path], tmp_path: Path
) -> None:
    # A job passes its stem: the measured embedder then has one, and starts elsewhere.
    target = known_case["target"]
    plain = _distance_before(target, tmp_path, token_budget=4, stem_channels=0)
    stem = _distance_before(target, tmp_path, token_budget=4, stem_channels=8)
    assert stem != pytest.approx(plain)


def test_a_standalone_analysis_measures_the_embedder_an_auto_job_would_train(
    known_case: dict[str, Path], tmp_path: Path
) -> None:
    # No budget or stem given (the analysis endpoint): each candidate gets what `auto` resolves
    # for its backbone family; 32x32 images on a text body: patches through a conv stem.
    budget, stem, _, _ = embedder_recipe(
        "image2d", (3, 32, 32), "classification", family="text", device_kind="cpu"
    )
    assert (budget, stem) == (16, 64)
    target = known_case["target"]
    standalone = _distance_before(target, tmp_path)
    as_a_job = _distance_before(target, tmp_path, token_budget=budget, stem_channels=stem)
    generic = _distance_before(target, tmp_path, token_budget=64, stem_channels=0)
    assert standalone == pytest.approx(as_a_job)
    assert standalone != pytest.approx(generic)


def _ring_distances(dataset_path: Path, cache: Path, **embedder: Any) -> tuple[float, float]:
    """Distances before and after a short alignment of the embedder the analysis builds."""
    best = _best(dataset_path, cache, align_epochs=2, **embedder)
    assert best.before is not None and best.after is not None
    return best.before, best.after


def test_a_standalone_analysis_of_a_periodic_field_measures_the_deep_wrapped_stem(
    tmp_path: Path,
) -> None:
    # A dense series task on a ring: an auto job trains a three-layer stem that wraps around;
    # the analysis endpoint, given neither, measures that embedder and not the one-layer one.
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    phases = rng.uniform(0, 2 * np.pi, (40, 1))
    x = np.sin(grid + phases)[:, None, :] + 0.5 * np.cos(2 * grid + 2 * phases)[:, None, :]
    path = tmp_path / "ring.npz"
    np.savez(path, x_train=x.astype(np.float32), y_train=(x[:, 0] ** 2).astype(np.float32))
    cache = tmp_path / "proxies"
    standalone = _ring_distances(path, cache)
    as_a_job = _ring_distances(path, cache, stem_layers=3, circular=True)
    assert standalone == pytest.approx(as_a_job)
    # the wrap changes where the embedder starts; the later layers, where alignment takes it
    zero_padded = _ring_distances(path, cache, stem_layers=3, circular=False)
    shallow = _ring_distances(path, cache, stem_layers=1, circular=True)
    assert standalone[0] != pytest.approx(zero_padded[0])
    assert standalone[1] != pytest.approx(shallow[1])
