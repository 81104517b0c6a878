"""Graph builders shared by every graph model: the normalised user–item adjacency and item–item kNN graphs.

All graphs are built as sparse COO tensors (``to_csr`` converts one for the faster ``sparse_matmul``); nothing here
reads or writes files.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def normalized_bipartite_adjacency(
    n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """Â = D^{-1/2} A D^{-1/2} over the (U+I)×(U+I) bipartite graph, items offset by ``n_users``.

    Duplicate edges count once. Nodes without edges get zero rows (no division by zero).
    """
    key = torch.unique(users * n_items + items)
    u, i = key // n_items, key % n_items + n_users
    rows = torch.cat([u, i])
    cols = torch.cat([i, u])
    # A is symmetric with unit weights, so its row sums are the node degrees.
    return row_sum_normalized(n_users + n_items, rows, cols, torch.ones(rows.shape[0], device=rows.device))


def mean_aggregation(
    n_rows: int, n_cols: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Row-normalised sparse matrix M with M[r, c] = 1/deg(r) for each distinct edge: M @ X averages neighbours."""
    key = torch.unique(rows * n_cols + cols)
    r, c = key // n_cols, key % n_cols
    degree = torch.bincount(r, minlength=n_rows).float().clamp(min=1.0)
    return torch.sparse_coo_tensor(
        torch.stack([r, c]), 1.0 / degree[r], (n_rows, n_cols), check_invariants=True
    ).coalesce()


# ------------------------------------------------------------- multimodal graphs (MMGCN, LATTICE, FREEDOM)
def bipartite_mean_aggregation(
    n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor, *, self_loops: bool = False
) -> torch.Tensor:
    """D^{-1}(A [+ I]) over the (U+I)×(U+I) bipartite graph, items offset by ``n_users``: row r averages r's
    neighbours (and r itself with ``self_loops``). MMGCN's mean aggregation; LATTICE's user–item graph uses
    ``self_loops=True``. Nodes without edges (and no self loop) get zero rows.
    """
    n = n_users + n_items
    rows = torch.cat([users, items + n_users])
    cols = torch.cat([items + n_users, users])
    if self_loops:
        rows = torch.cat([rows, torch.arange(n)])
        cols = torch.cat([cols, torch.arange(n)])
    return mean_aggregation(n, n, rows, cols)


def knn_edges(
    features: torch.Tensor, k: int, *, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine kNN edges of an item–item graph as LATTICE and FREEDOM build them: row i keeps its k most similar
    items, ITSELF INCLUDED (its own similarity 1 tops the list, as in both papers' code). Items without the
    modality neither keep nor become neighbours. Returns (rows, cols, cosine similarities), each (E,); the
    similarities are differentiable in ``features`` (LATTICE learns a graph from projected features).
    """
    x = torch.nn.functional.normalize(features, dim=1)
    sim = x @ x.T  # (I, I)
    if present is not None:
        absent = ~present.to(sim.device)
        sim = sim.masked_fill(absent[:, None] | absent[None, :], -float("inf"))
    n = features.shape[0]
    top = sim.topk(min(k, n), dim=1)
    rows = torch.arange(n, device=sim.device).repeat_interleave(top.indices.shape[1])
    cols = top.indices.reshape(-1)
    values = top.values.reshape(-1)
    valid = torch.isfinite(values)
    return rows[valid], cols[valid], values[valid]


def row_sum_normalized(
    n: int, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """D^{-1/2} W D^{-1/2} with D the ROW sums of the (possibly directed) weighted graph W (LATTICE's and FREEDOM's
    ``compute_normalized_laplacian``), as a sparse (n, n) tensor; differentiable in ``values``. Empty rows stay 0.
    Duplicate (row, col) pairs are summed.
    """
    degree = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt = torch.where(torch.isinf(inv_sqrt), torch.zeros_like(inv_sqrt), inv_sqrt)
    normalized = inv_sqrt[rows] * values * inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), normalized, (n, n), check_invariants=True).coalesce()


def per_item_modality_weights(weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(M,) modality weights and (M, I) presence → (M, I): each item's weights renormalised over the modalities it
    HAS, so a missing modality gets weight 0 instead of acting as a zero feature of full weight. Equal to the
    plain weights for an item with every modality; an item with none keeps the plain weights (it has no
    modality edges to weigh, and MMGCN then falls back to its ID part).
    """
    w = weights[:, None] * present.to(weights.dtype)  # (M, I)
    total = w.sum(dim=0, keepdim=True)  # (1, I)
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), weights[:, None].expand_as(w))


def fuse_graphs(graphs: list[torch.Tensor], row_weights: torch.Tensor) -> torch.Tensor:
    """Σ_m diag(row_weights[m]) G_m for sparse (n, n) graphs G_m and (M, n) per-row weights; differentiable."""
    indices = torch.cat([g.indices() for g in graphs], dim=1)
    values = torch.cat([g.values() * w[g.indices()[0]] for g, w in zip(graphs, row_weights, strict=True)])
    n = graphs[0].shape[0]
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=True).coalesce()


def light_propagate(adjacency: torch.Tensor, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """LightGCN propagation: the mean of E, ÂE, …, Â^L E (no weights, no non-linearities).

    A CSR ``adjacency`` (``to_csr`` of the symmetric Â) goes through ``sparse_matmul`` as its own transpose."""
    layers = [ego]
    for _ in range(n_layers):
        if adjacency.layout == torch.sparse_csr:
            layers.append(sparse_matmul(adjacency, layers[-1]))
        else:
            layers.append(torch.sparse.mm(adjacency, layers[-1]))
    return torch.stack(layers).mean(dim=0)


# ------------------------------------------------------------------ CSR products (the same sums, faster on the CPU)
def to_csr(matrix: torch.Tensor) -> torch.Tensor:
    """A sparse COO matrix as CSR, for ``sparse_matmul``."""
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; its matrix product is stable since 2.0
        warnings.simplefilter("ignore", UserWarning)
        return matrix.coalesce().to_sparse_csr()


class _CSRMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, matrix: torch.Tensor, transposed: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        ctx.transposed = transposed
        product: torch.Tensor = torch.sparse.mm(matrix, dense)
        return product

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, torch.sparse.mm(ctx.transposed, grad)


def sparse_matmul(
    matrix: torch.Tensor, dense: torch.Tensor, *, transposed: torch.Tensor | None = None
) -> torch.Tensor:
    """``matrix @ dense`` for a constant CSR ``matrix``, the gradient of ``dense`` taken with the CSR ``transposed``
    (matrixᵀ built once, e.g. ``to_csr(coo.t())``; None: ``matrix`` is symmetric, its own transpose).

    ``torch.sparse.mm`` on a COO matrix, and the backward of a CSR one, transpose and re-sort the matrix at every
    call: on ml100k-posters' graphs ~3× the time of these two CSR products. The matrix gets no gradient."""
    if matrix.requires_grad:
        raise ValueError("sparse_matmul: the sparse matrix is a constant; it cannot require a gradient")
    product: torch.Tensor = _CSRMatmul.apply(  # type: ignore[no-untyped-call]
        matrix, matrix if transposed is None else transposed, dense
    )
    return product


def degree_sensitive_edge_sample(
    n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor, keep: float, *, generator: torch.Generator
) -> torch.Tensor:
    """FREEDOM's degree-sensitive edge pruning: ⌊keep·E⌋ distinct user–item edges drawn without replacement with
    probability ∝ 1/√(d_u d_i) (degrees of the full graph, so edges between popular nodes, likelier noise, are
    dropped more), returned as the normalised adjacency of the kept edges (degrees recounted on them).
    Sampling runs on the CPU with ``generator``; the result is on the CPU.
    """
    key = torch.unique(users.cpu() * n_items + items.cpu())
    u, i = key // n_items, key % n_items
    d_u = torch.bincount(u, minlength=n_users).float()
    d_i = torch.bincount(i, minlength=n_items).float()
    probability = (d_u[u] * d_i[i]).rsqrt()  # (E,)
    n_keep = int(key.numel() * keep)
    kept = torch.multinomial(probability, n_keep, replacement=False, generator=generator)
    return normalized_bipartite_adjacency(n_users, n_items, u[kept], i[kept])
