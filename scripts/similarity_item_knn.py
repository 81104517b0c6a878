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

RP³β (Paudel et al., TiiS 2016; the strongest item-to-item list in Dacrema et al., RecSys 2019): the three-step
random walk item → user → item with each step's probability raised to α, its columns divided by the neighbour's
popularity to the power β: ``s(i, j) = n_i^(−α) Σ_{u ∈ U_i ∩ U_j} |I_u|^(−α) / n_j^β`` (α = 0 is item-kNN's
co-occurrence; α > 0 lets users with many items count less). EASE with a popularity tilt: its positive weights divided
by ``n_j^β``.

Per-popularity exponents: the trained items are cut into five buckets at the quantiles of their training popularity
(ties make them unequal) and each bucket gets its own RP³β exponent β, chosen on validation (every combination of
``BUCKET_EXPONENTS``, with one α for all buckets) to maximise the co-like rate while keeping the lists admissible by
docs/similarity-and-blending.md's declared rule (genre agreement at least the inner product's, neighbour popularity at
most 2x the catalogue's). The co-like rate saturates for a popular query (many held-out users like almost any fairly
popular item) and not for a rare one, so one exponent for every query need not be the best use of a popularity
budget. An ingested item's list sums its content neighbours' rows, each row with its own bucket's β (not validated
for ingested items: they have no validation interactions of their own).

Prints one line per candidate and writes docs/similarity-and-blending/item-knn-ml100k-posters.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
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
EASE_TILTS = ((2000.0, 0.1), (2000.0, 0.2), (500.0, 0.1))  # (λ, β)
RP3_ALPHAS = (0.0, 0.5, 1.0)
RP3_BETAS = (0.3, 0.4, 0.5, 0.6)
BUCKET_EXPONENTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
POPULARITY_BUCKETS = 5
CONTENT_NEIGHBOURS = (5, 10, 20, 50)
SEED = 2024
COLD_SHARE = 0.1


def co_occurrence(dataset: InteractionDataset, user_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(n_items, n_items) users shared in training, each user counted ``|I_u|^(−user_weight)`` times (``|I_u|`` their
    training items; 0: once), zero diagonal; and (n_items,) training users per item."""
    keep = dataset.split == TRAIN
    users_items = sp.csr_matrix((np.ones(int(keep.sum())), (dataset.user[keep], dataset.item[keep])),
                                shape=(dataset.n_users, dataset.n_items))  # fmt: skip
    users_items.data[:] = 1.0  # repeated (user, item) pairs count once
    activity = np.asarray(users_items.sum(axis=1)).ravel()
    weighted = sp.diags(np.where(activity > 0, activity, 1.0) ** -user_weight) @ users_items
    shared = (users_items.T @ weighted).toarray()
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


def rp3beta(weighted_shared: np.ndarray, n_users: np.ndarray, alpha: float, beta: float | np.ndarray) -> np.ndarray:
    """RP³β from ``co_occurrence(dataset, user_weight=alpha)``: ``n_i^(−α) Σ_u |I_u|^(−α) / n_j^β``; columns of items
    without training users get −1. ``beta``: one exponent, or a column (n_items, 1) of one exponent per query row."""
    n = np.where(n_users > 0, n_users, 1.0)
    scores = weighted_shared / n[:, None] ** alpha / n[None, :] ** beta
    scores[:, n_users == 0] = -1.0
    return scores


def tilted(weights: np.ndarray, n_users: np.ndarray, beta: float) -> np.ndarray:
    """Positive item-to-item weights divided by the neighbour's training popularity to the power β (the others, the
    −1 of items without users included, kept)."""
    n = np.where(n_users > 0, n_users, 1.0)
    return np.where(weights > 0, weights / n[None, :] ** beta, weights)


def candidates(
    shared: np.ndarray, n_users: np.ndarray, rp3_shared: Mapping[float, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every item-to-item score matrix measured, by name (``rp3_shared``: ``co_occurrence`` by user weight α)."""
    out = {f"item-knn β={beta}": item_knn(shared, n_users, beta) for beta in BETAS}
    weights = {shrinkage: ease(shared, n_users, shrinkage) for shrinkage in EASE_SHRINKAGE}
    out.update({f"ease λ={shrinkage:g}": w for shrinkage, w in weights.items()})
    out.update(
        {f"ease λ={lam:g}, tilt β={beta}": tilted(weights[lam], n_users, beta) for lam, beta in EASE_TILTS}
    )
    for alpha, weighted in rp3_shared.items():
        out.update(
            {f"rp3β α={alpha}, β={beta}": rp3beta(weighted, n_users, alpha, beta) for beta in RP3_BETAS}
        )
    return out


def bucket_edges(n_users: np.ndarray, queries: np.ndarray, n_buckets: int = POPULARITY_BUCKETS) -> np.ndarray:
    """The ``n_buckets − 1`` edges between popularity buckets: quantiles of the queries' training users (ties can
    make the buckets unequal)."""
    edges: np.ndarray = np.quantile(n_users[queries], np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])
    return edges


def popularity_buckets(n_users: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket (0 = least popular) of every item by its training users: bucket b holds ``edges[b−1] ≤ n < edges[b]``;
    an item without training users is in bucket 0."""
    buckets: np.ndarray = np.searchsorted(edges, n_users, side="right")
    return buckets


def bucketed_rp3beta(weighted_shared: np.ndarray, n_users: np.ndarray, alpha: float, bucket: np.ndarray,
                     exponents: Sequence[float]) -> np.ndarray:  # fmt: skip
    """RP³β whose row ``i`` uses the exponent β of the query's popularity bucket, ``exponents[bucket[i]]``."""
    return rp3beta(weighted_shared, n_users, alpha, np.asarray(exponents, dtype=np.float64)[bucket][:, None])


def bucket_figures(judge: Judge, queries: np.ndarray, neighbours: np.ndarray, genres: Sequence[frozenset[str]],
                   in_bucket: np.ndarray) -> tuple[float, float, float, int, int, int]:  # fmt: skip
    """Sums of the figures of the queries in one bucket, to be pooled over buckets: (co-like rate sum, genre agreement
    sum, neighbour popularity sum, co-like queries, genre queries, queries)."""
    mine = queries[in_bucket]
    if mine.size == 0:
        return 0.0, 0.0, 0.0, 0, 0, 0
    f = judge.figures(mine, neighbours[in_bucket])
    with_genres = sum(1 for i in mine if genres[i])
    n_co = int(f["co_like_query_items"])
    return (f["co_like_rate@10"] * n_co if n_co else 0.0, f["genre_agreement@10"] * with_genres if with_genres else 0.0,
            f["neighbour_popularity"] * mine.size, n_co, with_genres, int(mine.size))  # fmt: skip


def choose_exponents(
    sums: np.ndarray, genre_floor: float, popularity_cap: float
) -> tuple[tuple[int, ...], dict[str, float]] | None:
    """The exponent index per bucket with the highest pooled co-like rate among admissible combinations.

    ``sums[b, e]`` is ``bucket_figures`` of bucket ``b`` under exponent ``e``. Admissible: pooled genre agreement ≥
    ``genre_floor`` and pooled neighbour popularity ≤ ``popularity_cap``. Equal rates: the first combination in
    ``itertools.product`` order. None if no combination is admissible."""
    n_buckets, n_exponents, _ = sums.shape
    best: tuple[tuple[int, ...], dict[str, float]] | None = None
    for choice in itertools.product(range(n_exponents), repeat=n_buckets):
        pooled = sums[np.arange(n_buckets), choice].sum(axis=0)
        figures = {
            "genre_agreement@10": pooled[1] / pooled[4],
            "co_like_rate@10": pooled[0] / pooled[3],
            "neighbour_popularity": pooled[2] / pooled[5],
        }
        if figures["genre_agreement@10"] < genre_floor or figures["neighbour_popularity"] > popularity_cap:
            continue
        if best is None or figures["co_like_rate@10"] > best[1]["co_like_rate@10"]:
            best = (tuple(choice), figures)
    return best


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
    rp3_shared = {alpha: co_occurrence(dataset, user_weight=alpha)[0] for alpha in RP3_ALPHAS}
    queries = np.flatnonzero(n_users > 0)
    judges = {part: Judge(genres, heldout_matrix(dataset, splits), popularity)
              for part, splits in (("validation", (VALID,)), ("trained", (TEST,)))}  # fmt: skip
    for part, judge in judges.items():
        rows = {}
        for name, scores in candidates(shared, n_users, rp3_shared).items():
            rows[name] = rounded(judge.figures(queries, top_neighbours(scores[queries], queries)))
            print(part, name, rows[name], flush=True)
        report[part] = rows

    # Per-popularity exponents, chosen on validation by the declared rule's admissibility (the LightGCN run's
    # inner product: docs/similarity-and-blending/similarity-ml100k-posters.json).
    declared = json.loads(
        (PROJECT_ROOT / "docs" / "similarity-and-blending" / "similarity-ml100k-posters.json").read_text()
    )
    genre_floor = float(declared["correction"]["inner_product"]["genre_agreement@10"])
    popularity_cap = 2.0 * float(popularity.mean())
    edges = bucket_edges(n_users, queries)
    bucket = popularity_buckets(n_users, edges)
    chosen: tuple[float, tuple[int, ...], dict[str, float]] | None = None
    for alpha, weighted in rp3_shared.items():
        sums = np.zeros((POPULARITY_BUCKETS, len(BUCKET_EXPONENTS), 6))
        for e, beta in enumerate(BUCKET_EXPONENTS):
            neighbours = top_neighbours(rp3beta(weighted, n_users, alpha, beta)[queries], queries)
            for b in range(POPULARITY_BUCKETS):
                sums[b, e] = bucket_figures(
                    judges["validation"], queries, neighbours, genres, bucket[queries] == b
                )
        best = choose_exponents(sums, genre_floor, popularity_cap)
        print("per-popularity exponents, α =", alpha, "validation:", best, flush=True)
        if best is not None and (chosen is None or best[1]["co_like_rate@10"] > chosen[2]["co_like_rate@10"]):
            chosen = (alpha, *best)
    if chosen is not None:
        alpha, choice, validation = chosen
        exponents = [BUCKET_EXPONENTS[e] for e in choice]
        scores = bucketed_rp3beta(rp3_shared[alpha], n_users, alpha, bucket, exponents)
        test = rounded(judges["trained"].figures(queries, top_neighbours(scores[queries], queries)))
        print(
            "per-popularity exponents, chosen α =", alpha, "β by bucket", exponents, "test:", test, flush=True
        )
        report["per_popularity_exponents"] = {
            "rule": "RP3beta with one exponent per training-popularity bucket; highest validation co_like_rate@10 with "
            "genre_agreement@10 >= the inner product's and neighbour_popularity <= 2 x catalogue",
            "genre_floor": round(genre_floor, 4),
            "popularity_cap": round(popularity_cap, 4),
            "bucket_upper_edges": [float(x) for x in edges],  # exclusive
            "bucket_sizes": np.bincount(bucket[queries], minlength=POPULARITY_BUCKETS).tolist(),
            "alpha": alpha,
            "exponents": exponents,
            "validation": rounded(validation),
            "trained": test,
        }
    else:
        report["per_popularity_exponents"] = {"chosen": None}

    held_out = make_cold_split(dataset, share=COLD_SHARE, seed=SEED)
    cold_shared, cold_users = co_occurrence(held_out.dataset)
    cold_rp3 = {alpha: co_occurrence(held_out.dataset, user_weight=alpha)[0] for alpha in RP3_ALPHAS}
    families = candidates(cold_shared, cold_users, cold_rp3)
    if chosen is not None:  # an ingested item borrows its content neighbours' rows, each with its own bucket's β
        families[f"rp3β α={alpha}, per-popularity β"] = bucketed_rp3beta(
            cold_rp3[alpha], cold_users, alpha, popularity_buckets(cold_users, edges), exponents
        )
    cold = held_out.cold
    content = content_space(dataset)
    trained_rows = np.flatnonzero(cold_users > 0)
    content_cosine = content[cold] @ content[trained_rows].T  # (n_cold, n_trained)
    content_order = np.argsort(-content_cosine, axis=1, kind="stable")  # nearest trained items first
    judge = Judge(genres, heldout_matrix(held_out.dataset, (TEST, COLD)), popularity)
    rows = {}
    for family, item_scores in families.items():
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
