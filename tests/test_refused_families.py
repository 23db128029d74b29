"""Families dyvte refuses on purpose say why (docs/design.md §7): GLM-4V-MoE."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import dyvte
from dyvte.registry import REFUSED


def tiny_glm4v_moe() -> torch.nn.Module:
    text = tf.Glm4vMoeTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_intermediate_size=16,
        num_experts_per_tok=2,
        n_routed_experts=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    vision = tf.Glm4vMoeVisionConfig(
        depth=1, hidden_size=16, intermediate_size=32, out_hidden_size=32, num_heads=2, patch_size=4
    )
    config = tf.Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=60, video_token_id=61)
    return tf.Glm4vMoeForConditionalGeneration._from_config(config).eval()


def test_glm4v_moe_is_refused_with_its_reason() -> None:
    model = tiny_glm4v_moe()
    assert model.config.model_type == "glm4v_moe" and "glm4v_moe" in REFUSED
    for call in (
        lambda: dyvte.withdraw(model, layer=1),
        lambda: dyvte.prune(model, "fastv", layer=1, ratio=0.5),
        lambda: dyvte.prune(model, "fastervlm", ratio=0.5),
    ):
        with pytest.raises(dyvte.UnsupportedModelError, match=r"glm4v_moe.*shared experts.*glm4v, idefics3"):
            call()
    assert not model._forward_pre_hooks and not model._forward_hooks
