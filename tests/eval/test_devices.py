"""The evaluation harness sends every input it builds to the model's device (tests/devices.py: what a CPU-only
machine can prove). The tiny LLaVA is moved to the ``meta`` device; its first forward checks the devices of its
inputs and is stopped there (``meta`` holds no data, so nothing could run past it)."""

from __future__ import annotations

import pytest

import dyvte
from dyvte.eval.methods import PolicyRun

from ..devices import StopForward, stop_on_forward
from ..tiny_models import TEMPLATE, make_tiny, records


@pytest.fixture(scope="module")
def on_meta():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model.to("meta"), processor


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("method", [None, PolicyRun("static", {"layer": 2})], ids=["full", "static"])
def test_evaluate_builds_its_inputs_on_the_model_device(on_meta, warmup, method):
    model, processor = on_meta
    with stop_on_forward(model, "meta") as seen, pytest.raises(StopForward):
        dyvte.evaluate(
            model, processor, records(3), method, batch_size=2, max_new_tokens=2, progress=False, warmup=warmup
        )
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(seen[0])
