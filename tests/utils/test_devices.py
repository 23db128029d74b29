"""dyvte.utils.devices: a requested device checked against this machine, a model's device, inputs moved to it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyvte.utils.devices import check_device, model_device, to_device

NO_CUDA = not torch.cuda.is_available()


def test_check_device_accepts_the_cpu_and_refuses_malformed_devices():
    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "gpu", "cuda:x", "", 3.5):
        with pytest.raises(ValueError, match=r"--device must be 'cpu', 'cuda' or 'cuda:N', got"):
            check_device(bad, "--device")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", torch.device("cuda", 0)])
def test_check_device_refuses_cuda_without_cuda(device):
    with pytest.raises(ValueError, match=r"--device .*cuda.*: CUDA is not available on this machine.*use 'cpu'"):
        check_device(device, "--device")


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_check_device_refuses_a_cuda_index_this_machine_lacks():
    count = torch.cuda.device_count()
    assert check_device(f"cuda:{count - 1}").index == count - 1
    with pytest.raises(ValueError, match=f"has {count} CUDA device"):
        check_device(f"cuda:{count}")


def test_model_device_and_to_device():
    model = nn.Linear(2, 2).to("meta")
    assert model_device(model) == torch.device("meta")
    assert model_device(nn.Module()) == torch.device("cpu")  # no parameter, no buffer
    buffers = nn.Module()
    buffers.register_buffer("x", torch.zeros(1, device="meta"))
    assert model_device(buffers) == torch.device("meta")
    inputs = {"ids": torch.ones(2, dtype=torch.long), "sizes": [(1, 2)], "none": None}
    moved = to_device(inputs, "meta")
    assert moved["ids"].device == torch.device("meta") and moved["ids"].dtype == torch.long
    assert moved["sizes"] is inputs["sizes"] and moved["none"] is None
    assert inputs["ids"].device == torch.device("cpu")  # the caller's dict is left as it was
    same = to_device(inputs, "cpu")
    assert same["ids"] is inputs["ids"]  # already there: not copied
