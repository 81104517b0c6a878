"""Layers shared by several models (each model file keeps its own blocks; what is here is model-independent)."""

from __future__ import annotations

import torch
from torch import nn


class SameDrawsDropout(nn.Dropout):
    """``nn.Dropout`` with the same masks, drawn in half the time on the CPU.

    PyTorch's CPU dropout fills a mask laid out like its input with ``bernoulli_(1 − p)``: one float64 uniform u
    per element, in memory order, from the default generator, kept where u < 1 − p, then scaled by 1 / (1 − p).
    ``uniform_`` on a float64 tensor of that layout draws the same uniforms at about half the cost of
    ``bernoulli_``, which took ~45 % of an MMMLP training step (~37 M mask elements a batch). Same masks, outputs,
    gradients and generator state after (tests/test_mmmlp_dropout.py checks them against ``F.dropout``). Other
    devices, and p outside (0, 1), keep ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        uniforms = torch.empty_like(x, dtype=torch.float64).uniform_()  # laid out like x, as bernoulli_'s
        keep = uniforms < 1.0 - self.p  # bernoulli_(1 − p)'s comparison
        return x * keep.to(x.dtype).div_(1.0 - self.p)
