"""resolve_device (training/device.py): the one place device names become torch devices (trainer and encoders)."""

from __future__ import annotations

import pytest
import torch

from training.device import resolve_device


@pytest.mark.parametrize(("cuda", "expected"), [(False, "cpu"), (True, "cuda")])
def test_auto_is_cuda_when_available_else_cpu(monkeypatch: pytest.MonkeyPatch, cuda: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, device: str | torch.device) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="requested but CUDA is not available"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_other_devices_pass_through(device: str | torch.device) -> None:
    assert resolve_device(device) == torch.device("cpu")
