"""The CSR products (models.graph.sparse_matmul, light_propagate on a CSR adjacency) and PromptMM's reassociated
feature prompt compute what they replace: values and gradients equal to the COO / dense reference within float32
rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.graph import (
    light_propagate,
    mean_aggregation,
    normalized_bipartite_adjacency,
    sparse_matmul,
    to_csr,
)
from models.promptmm import projected_feature_prompt

N_USERS, N_ITEMS, N_EDGES = 30, 40, 200


def random_edges(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    users = torch.randint(0, N_USERS, (N_EDGES,), generator=generator)
    items = torch.randint(0, N_ITEMS, (N_EDGES,), generator=generator)
    return users, items


def value_and_gradient(
    product: torch.Tensor, dense: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    upstream = torch.randn(product.shape, generator=torch.Generator().manual_seed(seed))
    (gradient,) = torch.autograd.grad(product, dense, upstream)
    return product.detach(), gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_matmul_with_transpose_equals_coo_product_and_gradient(seed: int) -> None:
    users, items = random_edges(seed)
    matrix = mean_aggregation(N_ITEMS, N_USERS, items, users)  # (I, U), not symmetric
    dense = torch.randn(N_USERS, 8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    expected = value_and_gradient(torch.sparse.mm(matrix, dense), dense, seed)
    got = value_and_gradient(sparse_matmul(to_csr(matrix), dense, transposed=to_csr(matrix.t())), dense, seed)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_light_propagate_on_csr_equals_coo_values_and_gradient(n_layers: int) -> None:
    users, items = random_edges(n_layers)
    adjacency = normalized_bipartite_adjacency(N_USERS, N_ITEMS, users, items)
    ego = torch.randn(N_USERS + N_ITEMS, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    expected = value_and_gradient(light_propagate(adjacency, ego, n_layers), ego, 7)
    got = value_and_gradient(light_propagate(to_csr(adjacency), ego, n_layers), ego, 7)
    assert to_csr(adjacency).layout == torch.sparse_csr
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_sparse_matmul_refuses_a_matrix_that_requires_grad() -> None:
    users, items = random_edges(0)
    matrix = to_csr(mean_aggregation(N_USERS, N_ITEMS, users, items)).requires_grad_(True)
    with pytest.raises(ValueError, match="the sparse matrix is a constant"):
        sparse_matmul(matrix, torch.randn(N_ITEMS, 4))


@pytest.mark.parametrize("width", [5, 64, 300])
def test_projected_feature_prompt_equals_projecting_the_normalised_prompt(width: int) -> None:
    generator = torch.Generator().manual_seed(width)
    features = F.normalize(torch.rand(50, width, generator=generator), dim=1)
    prompts = torch.randn(50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(16, width, generator=generator, requires_grad=True)
    upstream = torch.randn(50, 16, generator=generator)

    def values_and_gradients(out: torch.Tensor) -> list[torch.Tensor]:
        return [out.detach(), *torch.autograd.grad(out, (prompts, weight), upstream)]

    expected = values_and_gradients(F.normalize(prompts @ (prompts.T @ features), dim=1) @ weight.T)
    got = values_and_gradients(projected_feature_prompt(features, prompts, weight))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
