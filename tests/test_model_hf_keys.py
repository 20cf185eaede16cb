"""`model.hf_keys`: the one key table between our state dicts and transformers', read both ways.

The reference is transformers itself: the keys `ours_to_hf` writes are exactly those of transformers' model built
from the exported config, and `hf_to_ours` gives our state dict back bit for bit, from either q / v bias spelling.
(The file-level round trips and the numerical parity are in test_model_export_hf.py and test_model_parity_hf.py.)
"""

from __future__ import annotations

import pytest
import torch
from model_weights import randomize_, tiny_config
from transformers import VideoMAEConfig as HFConfig
from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

from model import build_model
from model.export_hf import hf_config
from model.hf_keys import hf_to_ours, ours_to_hf

HF_CLASSES = {"classify": VideoMAEForVideoClassification, "pretrain": VideoMAEForPreTraining}


def our_state(kind: str) -> dict[str, torch.Tensor]:
    model = build_model(kind, tiny_config(num_classes=3))
    randomize_(model, 0)
    return model.state_dict()


@pytest.mark.parametrize("kind", ["classify", "pretrain"])
def test_keys_are_transformers_own_and_come_back_exactly(kind):
    state = our_state(kind)
    hf = ours_to_hf(state, kind)  # q / v biases spelt as save_pretrained writes them: attention.attention.q_bias
    cfg = tiny_config(num_classes=3)
    theirs = HF_CLASSES[kind](HFConfig(**hf_config(cfg, kind))).state_dict()  # in memory: query.bias / value.bias
    newer = {k.replace(".q_bias", ".query.bias").replace(".v_bias", ".value.bias"): v for k, v in hf.items()}
    assert newer.keys() != hf.keys()
    assert sorted(newer) == sorted(theirs)
    assert all(newer[k].shape == theirs[k].shape for k in newer)
    for spelling in (hf, newer):
        back = hf_to_ours(spelling, kind)
        assert sorted(back) == sorted(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_what_has_no_counterpart_is_refused_in_one_line():
    state = our_state("classify")
    with pytest.raises(ValueError, match=r"^pos_embed: no transformers VideoMAE counterpart$"):
        ours_to_hf({**state, "pos_embed": torch.zeros(1)}, "classify")
    hf = ours_to_hf(state, "classify")
    with pytest.raises(ValueError, match=r"layer videomae.encoder.layer.1: query/key/value weights incomplete"):
        hf_to_ours(
            {k: v for k, v in hf.items() if k != "videomae.encoder.layer.1.attention.attention.key.weight"}, "classify"
        )
    with pytest.raises(ValueError, match=r"layer videomae.encoder.layer.0 has a key bias"):
        hf_to_ours({**hf, "videomae.encoder.layer.0.attention.attention.key.bias": torch.zeros(64)}, "classify")
    # a key the table does not know keeps its transformers name, for the strict load to name
    assert "videomae.pooler.dense.weight" in hf_to_ours(
        {**hf, "videomae.pooler.dense.weight": torch.zeros(1)}, "classify"
    )
