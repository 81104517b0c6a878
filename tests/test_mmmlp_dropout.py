"""MMMLP's speed-ups compute what they replace: SameDrawsDropout draws F.dropout's masks (outputs, gradients and
the generator's state after, bit for bit), and the user state from the last position alone equals the last row of
every position's output."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.layers import SameDrawsDropout
from models.mmmlp import MMMLP
from tests.test_mmmlp import SMALL, mmmlp, tiny_batch, tiny_inputs


@pytest.mark.parametrize("p", [0.5, 0.3, 0.1, 0.9])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_same_draws_dropout_equals_torch_dropout_bit_for_bit(p: float, layout: str) -> None:
    x = torch.randn(7, 5, 33, generator=torch.Generator().manual_seed(1))
    x = (x if layout == "contiguous" else x.transpose(1, 2)).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for dropout in (lambda t: F.dropout(t, p, training=True), SameDrawsDropout(p)):
        torch.manual_seed(3)
        out = dropout(x)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        results.append((out.detach(), grad, torch.rand(4)))
    (out_ref, grad_ref, next_ref), (out, grad, next_draws) = results
    assert 0 < int((out_ref == 0).sum()) < out_ref.numel()
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
    assert torch.equal(next_draws, next_ref)  # the generator is left where F.dropout leaves it


def test_same_draws_dropout_is_identity_in_eval() -> None:
    x = torch.randn(4, 6)
    assert torch.equal(SameDrawsDropout(0.5).eval()(x), x)


@pytest.mark.parametrize("overrides", [{}, {"fusion_layers": 0}, {"fusion_layers": 2}], ids=["one", "none", "two"])  # fmt: skip
def test_user_states_equal_last_row_of_every_position(overrides: dict[str, Any]) -> None:
    model = mmmlp(**overrides).eval()
    batch = tiny_batch(batch=9)
    table = F.pad(model.item_vectors(), (0, 0, 1, 0))
    with torch.no_grad():
        states = model.user_states(table[batch.histories], batch.histories > 0)
        every = model.positions(table[batch.histories], batch.histories > 0)
    assert states.shape == (9, SMALL["hidden_size"])
    torch.testing.assert_close(states, every[:, -1], rtol=1e-6, atol=1e-6)


def test_training_loss_with_dropout_is_unchanged_by_the_speed_ups() -> None:
    """The every-position and last-position losses with dropout equal a model whose Mixer dropouts are nn.Dropout
    and whose user state reads every position: same masks, same value, same gradients."""
    for overrides in ({}, {"token_mixing": "full", "train_positions": "last"}):
        losses, grads = [], []
        for plain in (False, True):
            torch.manual_seed(0)
            model = build_model("mmmlp", tiny_inputs(), SMALL, {"dropout": 0.5, **overrides})
            assert isinstance(model, MMMLP)
            if plain:
                for module in model.modules():
                    if hasattr(module, "dropout") and isinstance(module.dropout, SameDrawsDropout):
                        module.dropout = torch.nn.Dropout(0.5)
            torch.manual_seed(5)
            loss = model.loss(tiny_batch())
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        assert torch.equal(losses[0], losses[1])
        for a, b in zip(*grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)
