"""KL calibration and labelling send every input they build (or are given) to the model's device (tests/devices.py:
what a CPU-only machine can prove). The tiny LLaVA is moved to the ``meta`` device; its first forward checks the
devices of its inputs and is stopped there."""

from __future__ import annotations

import pytest
import torch

import dyvte
from dyvte.data.records import build_inputs
from dyvte.exits.labels import label_batch, on_the_fly_labels
from dyvte.exits.onthefly import fresh_labels

from ..devices import StopForward, stop_on_forward
from ..tiny_models import TEMPLATE, make_tiny, records


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model.to("meta"), processor


@pytest.mark.parametrize("positions", ["first", "answer"])
def test_calibrate_moves_host_batches_to_the_model_device(tiny, positions):
    model, processor = tiny
    batches = [build_inputs(processor, records(2), with_answers=True)]
    assert batches[0]["input_ids"].device.type == "cpu"
    with stop_on_forward(model, "meta") as seen, pytest.raises(StopForward):
        dyvte.calibrate(model, batches, positions=positions, progress=False)
    assert "pixel_values" in seen[0] and "labels" not in seen[0]


def test_labelling_builds_its_inputs_on_the_model_device(tiny):
    model, processor = tiny
    with stop_on_forward(model, "meta"), pytest.raises(StopForward):
        label_batch(model, processor, records(2))


def test_on_the_fly_labels_move_their_inputs_to_the_model_device(tiny):
    model, processor = tiny
    with stop_on_forward(model, "meta"), pytest.raises(StopForward):
        fresh_labels(model, processor, records(2), [1, 2])
    inputs = build_inputs(processor, records(2), with_answers=True)  # the caller's batch, on the host
    with stop_on_forward(model, "meta"), pytest.raises(StopForward):
        on_the_fly_labels(model, inputs, layer=1)
    assert inputs["input_ids"].device == torch.device("cpu")  # the caller's batch is left as it was
