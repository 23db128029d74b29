"""Fixtures shared by test folders (each folder's own fixtures live in its test files)."""

from __future__ import annotations

import pytest

from .tiny_models import TEMPLATE, make_tiny


@pytest.fixture
def dropout_model():
    """A tiny LLaVA whose attention has real dropout (0.5), returned in eval mode."""
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
        if isinstance(getattr(module, "dropout", None), float):  # CLIP's attention keeps its rate as `dropout`
            module.dropout = 0.5
    return model, processor
