"""Item-to-item collaborative filtering as the similar-items list: a check after the declared run of
docs/similarity-and-blending.md, on the same figures, splits and held-out items.

Trained items: ``s(i, j) = |U_i ∩ U_j| / (n_i^(1−β) · n_j^β)`` over the training interactions (β = 0.5 is the
cosine of the items' user sets; a larger β divides more by the neighbour's popularity). Items held out of training
(the one cold-start protocol's draw) have no users, so their list is the item-kNN rows of their ``m`` nearest trained
items in the content space (text + image features), weighted by that content cosine.

    MMREC_HOME=/work/var-shared python scripts/similarity_item_knn.py [--out JSON]

Also EASE (Steck, WWW 2019), the item-to-item regression ``B = I − P·diag(1/diag P)``, ``P = (XᵀX + λI)⁻¹`` with
a zero diagonal, whose row ``B[i]`` says how much an interaction with ``i`` predicts each other item (λ, the
shrinkage, trades popular neighbours against rare ones), measured the same way (ingested items: the EASE rows of
their ``m`` nearest trained items).

Prints one line per candidate and writes docs/similarity-and-blending/item-knn-ml100k-posters.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.experiments.cold_protocol import COLD, make_cold_split
from training.experiments.item_similarity import (
    Judge,
    content_space,
    heldout_matrix,
    ml100k_genres,
    top_neighbours,
)
from training.settings import PROJECT_ROOT, default_paths

BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)
EASE_SHRINKAGE = (100.0, 500.0, 2000.0)
CONTENT_NEIGHBOURS = (5, 10, 20, 50)
SEED = 2024
COLD_SHARE = 0.1


def co_occurrence(dataset: InteractionDataset) -> tuple[np.ndarray, np.ndarray]:
    """(n_items, n_items) users shared in training (zero diagonal) and (n_items,) training users per item."""
    keep = dataset.split == TRAIN
    users_items = sp.csr_matrix((np.ones(int(keep.sum())), (dataset.user[keep], dataset.item[keep])),
                                shape=(dataset.n_users, dataset.n_items))  # fmt: skip
    users_items.data[:] = 1.0  # repeated (user, item) pairs count once
    shared = (users_items.T @ users_items).toarray()
    np.fill_diagonal(shared, 0.0)
    return shared, np.asarray(users_items.sum(axis=0)).ravel()


def item_knn(shared: np.ndarray, n_users: np.ndarray, beta: float) -> np.ndarray:
    """Asymmetric cosine of the items' user sets; columns of items without training users get −1."""
    n = np.where(n_users > 0, n_users, 1.0)
    scores = shared / n[:, None] ** (1.0 - beta) / n[None, :] ** beta
    scores[:, n_users == 0] = -1.0
    return scores


def ease(shared: np.ndarray, n_users: np.ndarray, shrinkage: float) -> np.ndarray:
    """EASE's item-item weights ``B`` (zero diagonal) from the Gram matrix ``XᵀX`` (``shared`` off the diagonal,
    ``n_users`` on it); columns of items without training users get −1."""
    gram = shared.copy()
    gram[np.diag_indices_from(gram)] = n_users + shrinkage
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    weights[:, n_users == 0] = -1.0
    return weights


def candidates(shared: np.ndarray, n_users: np.ndarray) -> dict[str, np.ndarray]:
    """Every item-to-item score matrix measured, by name."""
    out = {f"item-knn β={beta}": item_knn(shared, n_users, beta) for beta in BETAS}
    out.update({f"ease λ={shrinkage:g}": ease(shared, n_users, shrinkage) for shrinkage in EASE_SHRINKAGE})
    return out


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in figures.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON report (default docs/similarity-and-blending/item-knn-ml100k-posters.json)",
    )
    args = parser.parse_args(argv)
    paths = default_paths()
    dataset = InteractionDataset.load(paths.datasets / "ml100k-posters")
    genres = ml100k_genres(paths.data_root, dataset.item_ids)
    popularity = np.bincount(dataset.item, minlength=dataset.n_items).astype(np.float64)
    report: dict[str, object] = {"dataset": dataset.name, "catalogue_popularity": float(popularity.mean())}

    shared, n_users = co_occurrence(dataset)
    queries = np.flatnonzero(n_users > 0)
    for part, splits in (("validation", (VALID,)), ("trained", (TEST,))):
        judge = Judge(genres, heldout_matrix(dataset, splits), popularity)
        rows = {}
        for name, scores in candidates(shared, n_users).items():
            rows[name] = rounded(judge.figures(queries, top_neighbours(scores[queries], queries)))
            print(part, name, rows[name], flush=True)
        report[part] = rows

    held_out = make_cold_split(dataset, share=COLD_SHARE, seed=SEED)
    cold_shared, cold_users = co_occurrence(held_out.dataset)
    cold = held_out.cold
    content = content_space(dataset)
    trained_rows = np.flatnonzero(cold_users > 0)
    content_cosine = content[cold] @ content[trained_rows].T  # (n_cold, n_trained)
    content_order = np.argsort(-content_cosine, axis=1, kind="stable")  # nearest trained items first
    judge = Judge(genres, heldout_matrix(held_out.dataset, (TEST, COLD)), popularity)
    rows = {}
    for family, item_scores in candidates(cold_shared, cold_users).items():
        for m in CONTENT_NEIGHBOURS:
            nearest = content_order[:, :m]
            weights = np.take_along_axis(content_cosine, nearest, axis=1)
            scores = np.einsum("qm,qmn->qn", weights, item_scores[trained_rows[nearest]])
            scores[:, cold_users == 0] = -np.inf
            name = f"{family}, {m} content neighbours"
            rows[name] = rounded(judge.figures(cold, top_neighbours(scores, cold)))
            print("ingested", name, rows[name], flush=True)
    report["ingested"] = {"cold_items": int(cold.size), "seed": SEED, "figures": rows}

    path = args.out or PROJECT_ROOT / "docs" / "similarity-and-blending" / "item-knn-ml100k-posters.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
