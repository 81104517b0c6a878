"""Graph builders shared by every graph model: the normalised user–item adjacency and item–item kNN graphs.

All graphs are sparse COO tensors; nothing here reads or writes files.
"""

from __future__ import annotations

import torch


def normalized_bipartite_adjacency(
    n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """Â = D^{-1/2} A D^{-1/2} over the (U+I)×(U+I) bipartite graph, items offset by ``n_users``.

    Duplicate edges count once. Nodes without edges get zero rows (no division by zero).
    """
    n = n_users + n_items
    key = torch.unique(users * n_items + items)
    u, i = key // n_items, key % n_items + n_users
    rows = torch.cat([u, i])
    cols = torch.cat([i, u])
    degree = torch.bincount(rows, minlength=n).float()
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt[torch.isinf(inv_sqrt)] = 0.0
    values = inv_sqrt[rows] * inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()


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


def knn_graph(features: torch.Tensor, k: int, *, present: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric-normalised cosine kNN item–item graph (LATTICE/FREEDOM): each item keeps its k most similar
    items (itself excluded), weights 1, then D^{-1/2} S D^{-1/2}. Items without the modality get no edges.
    """
    x = torch.nn.functional.normalize(features, dim=1)
    sim = x @ x.T  # (I, I)
    sim.fill_diagonal_(-float("inf"))
    if present is not None:
        sim[~present] = -float("inf")
        sim[:, ~present] = -float("inf")
    n = features.shape[0]
    k = min(k, n - 1)
    top = sim.topk(k, dim=1)
    rows = torch.arange(n).repeat_interleave(k)
    cols = top.indices.reshape(-1)
    valid = torch.isfinite(top.values.reshape(-1))
    rows, cols = rows[valid], cols[valid]
    degree = torch.bincount(rows, minlength=n).float()
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt[torch.isinf(inv_sqrt)] = 0.0
    values = inv_sqrt[rows] * inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()
