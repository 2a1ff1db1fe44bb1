"""``minilm-l6-scratch``: MiniLM's architecture with random weights, only when asked for."""

from __future__ import annotations

import json

import pytest
import torch

from orca_engine.backbones import create_backbone
from orca_engine.errors import BackboneUnavailable


def test_scratch_minilm_refuses_without_allow_random_init() -> None:
    with pytest.raises(BackboneUnavailable, match="allow_random_init"):
        create_backbone("minilm-l6-scratch")


def test_scratch_minilm_has_minilm_shape_but_not_its_weights() -> None:
    pretrained = create_backbone("minilm-l6")
    torch.manual_seed(0)
    scratch = create_backbone("minilm-l6-scratch", allow_random_init=True)
    assert scratch.name == "minilm-l6-scratch"
    assert (scratch.embed_dim, scratch.output_dim, scratch.max_tokens) == (384, 384, 512)
    ours = dict(scratch.named_parameters())
    theirs = dict(pretrained.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    query = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(ours[query], theirs[query])
    # The tokenizer comes along, so the english-text proxy (and alignment) still works.
    assert scratch.tokenizer is not None  # type: ignore[attr-defined]

    # Seeded: the same seed gives the same random encoder; a stored config rebuilds it
    # without the flag (the weights then come from a checkpoint).
    torch.manual_seed(0)
    again = create_backbone("minilm-l6-scratch", allow_random_init=True)
    assert torch.equal(dict(again.named_parameters())[query], ours[query])
    config = json.loads(json.dumps(scratch.rebuild_config()))
    rebuilt = create_backbone("minilm-l6-scratch", pretrained=False, config=config)
    rebuilt.load_state_dict(scratch.state_dict())
    tokens = torch.randn(1, 5, 384)
    torch.testing.assert_close(rebuilt.eval()(tokens), scratch.eval()(tokens))
