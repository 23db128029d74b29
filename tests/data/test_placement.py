"""load_model's device, device_map and dtype: checked (with one message per mistake) before any weight is read."""

from __future__ import annotations

import pytest
import torch

from dyvte.data import sources
from dyvte.data.placement import CPU_DTYPES, DTYPES, check_dtype, check_placement
from dyvte.data.sources import load_model

NO_CUDA = not torch.cuda.is_available()
CPU_FP16 = r"--dtype must be one of \['bf16', 'bfloat16', 'float32', 'fp32'\] on CPU, got 'float16': float16 is ~100x"


def test_float16_is_refused_on_the_cpu_and_accepted_for_cuda():
    assert set(DTYPES) - set(CPU_DTYPES) == {"float16", "fp16"}
    for device, device_map in [(None, None), ("cpu", None), (None, "cpu"), (None, {"": "cpu"}), (None, "disk")]:
        with pytest.raises(ValueError, match=CPU_FP16):
            check_dtype("float16", device, device_map, option="--dtype")
    assert check_dtype("float16", "cuda") == check_dtype("fp16", torch.device("cuda", 1)) == torch.float16
    assert check_dtype("fp16", None, {"model": 0, "lm_head": "cpu"}) == torch.float16  # a layer on a GPU
    assert check_dtype("bf16") == torch.bfloat16 and check_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'bfloat16', 'float16', 'float32', 'fp16'"):
        check_dtype("float64")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_an_auto_device_map_is_the_cpu_without_cuda():
    with pytest.raises(ValueError, match=CPU_FP16.replace("--dtype", "dtype")):
        check_dtype("float16", None, "auto")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if load_model reaches the point of reading weights."""

    def forbid(*args, **kwargs):
        raise AssertionError("load_model read weights before refusing its arguments")

    monkeypatch.setattr(sources, "_load", forbid)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "float16"}, ValueError, r"dtype must be one of .* on CPU, got 'float16': float16 is ~100x slower"),
        ({"dtype": "float16", "device": "cpu"}, ValueError, r"on CPU, got 'float16'"),
        ({"device": "cpu", "device_map": "auto"}, ValueError, r"give device or device_map, not both"),
        ({"device": "tpu"}, ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"device_map": 3.5}, ValueError, r"device_map must be 'auto', a device or a mapping"),
        ({"device_map": {"": "npu:7"}}, ValueError, r"device_map: 'npu:7' is not a device|device_map must be 'cpu'"),
        ({"prompt_template": "no placeholder"}, ValueError, r"\{question\}"),
    ],
)
def test_load_model_refuses_bad_placement_before_reading_weights(no_loading, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model("demo", **kwargs)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize(
    "kwargs",
    [{"device": "cuda"}, {"device": "cuda:1", "dtype": "float16"}, {"device_map": "cuda:0"}, {"device_map": {"": 0}}],
)
def test_load_model_refuses_cuda_on_a_machine_without_it_before_loading(no_loading, kwargs):
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine"):
        load_model("/no/such/model", **kwargs)


def test_device_map_needs_accelerate(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ImportError, match="device_map needs the accelerate package"):
        check_placement(None, "auto")


def test_load_model_on_a_device_and_with_a_device_map():
    model, _ = load_model("demo", "bf16", device="cpu")
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16 and not model.training
    model, _ = load_model("demo", device_map={"": "cpu"})  # through accelerate, as "auto" places a model
    assert model.device == torch.device("cpu") and not model.training
