"""The issue-14 measurements (training/experiments/): their figures against hand-computed values and the
evaluator, and a whole run of each on a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from synthetic_datasets import multimodal_dataset

from training.data.dataset import TEST
from training.experiments.item_similarity import Judge, content_space, run_similarity, top_neighbours
from training.experiments.recent_events import blended_scores, ranking_metrics, replay, replay_splits
from training.fit.evaluator import FullRankingEvaluator
from training.fit.trainer import TrainConfig, train


def test_blended_scores_are_the_formulas_per_user() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    events = [np.array([0, 2]), np.array([], dtype=np.int64), np.array([5])]
    mean = items[[0, 2]].mean(axis=0)
    unit_u0 = users[0] / np.linalg.norm(users[0])
    normalised = blended_scores(users, items, events, 0.5)
    np.testing.assert_allclose(normalised[0], items @ (unit_u0 + 0.5 * mean / np.linalg.norm(mean)))
    np.testing.assert_allclose(normalised[1], items @ users[1])  # no events: the user's vector as it is
    np.testing.assert_allclose(blended_scores(users, items, events, 0.5, form="raw")[2], items @ (users[2] + 0.5 * items[5]))
    cosine = blended_scores(users, items, events, 0.5, form="cosine")[0]
    cos = [[items[j] @ items[e] / np.linalg.norm(items[j]) / np.linalg.norm(items[e]) for e in (0, 2)] for j in range(6)]
    np.testing.assert_allclose(cosine, items @ unit_u0 + 0.5 * np.mean(cos, axis=1))
    np.testing.assert_allclose(blended_scores(users, items, events, 0.0, form="cosine"), users @ items.T)


def test_top_neighbours_leave_the_query_out_and_break_ties_by_row() -> None:
    scores = np.array([[9.0, 1.0, 5.0, 5.0], [2.0, 9.0, 2.0, 0.0]])
    np.testing.assert_array_equal(top_neighbours(scores, np.array([0, 1]), k=2), [[2, 3], [0, 2]])


def test_judge_figures_equal_hand_counts() -> None:
    genres = [frozenset({"Action"}), frozenset({"Action", "Drama"}), frozenset({"Comedy"}), frozenset()]
    # held-out: user 0 likes items 0 and 1; user 1 likes items 0 and 2; item 3 has no held-out user
    heldout = sp.csc_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=np.float32))
    judge = Judge(genres, heldout, popularity=np.array([10.0, 4.0, 2.0, 0.0]))
    figures = judge.figures(np.array([0, 3, 1]), np.array([[1, 3], [0, 1], [2, 3]]))
    # genre: item 0 -> (1 yes, 3 no) = 0.5; item 3 has no genre (not counted); item 1 -> (2 no, 3 no) = 0
    assert figures["genre_agreement@10"] == pytest.approx(0.25)
    # co-like: item 0 (users {0, 1}) -> item 1 shares user 0, item 3 none: 0.5, share (1/2 + 0) / 2;
    # item 1 (user {0}) -> item 2 none, item 3 none: 0; item 3 has no held-out user (not counted)
    assert figures["co_like_rate@10"] == pytest.approx(0.25)
    assert figures["co_like_share@10"] == pytest.approx((0.25 + 0.0) / 2)
    assert figures["neighbour_popularity"] == pytest.approx(np.mean([4, 0, 10, 4, 2, 0]))
    assert figures["co_like_query_items"] == 2 and judge.catalogue_popularity == 4.0


def test_content_space_rows_are_unit_and_each_modality_counts_alike() -> None:
    dataset = multimodal_dataset()
    space = content_space(dataset)
    norms = np.linalg.norm(space, axis=1)
    has_any = np.any([m.present for m in dataset.modalities.values()], axis=0)
    np.testing.assert_allclose(norms[has_any], 1.0, rtol=1e-6)
    both = np.flatnonzero(dataset.modalities["text"].present & dataset.modalities["image"].present)[0]
    np.testing.assert_allclose(np.linalg.norm(space[both, :20]), np.sqrt(0.5), rtol=1e-6)  # image part (sorted: image, text)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("experiments")
    dataset = multimodal_dataset(n_users=20, n_items=50)  # ~30 items a user: every user has 2+ validation items
    dataset.save(root / "data")
    result = train(dataset, "lightgcn", dataset_dir=root / "data", runs_root=root / "runs",
                   model_config={"embedding_size": 8}, train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20)))  # fmt: skip
    return root, result


def test_replay_static_arm_equals_the_evaluators_test_metrics(trained: tuple[Path, object]) -> None:
    """w = 0 is the trained model scored as the trainer scores it: same users, masks and metrics."""
    root, result = trained
    from training.data.dataset import InteractionDataset

    dataset = InteractionDataset.load(root / "data")
    model = result.model  # type: ignore[attr-defined]
    reps = model.representations()
    users, items = reps.users.detach().numpy(), reps.items.detach().numpy()
    report = replay(users, items, dataset, seed=3, weights=(0.0, 0.5, 1.0))
    expected = FullRankingEvaluator(dataset, split=TEST, topk=(10, 20)).evaluate(model).metrics
    for name in ("recall@20", "ndcg@20", "recall@10"):
        assert report["test"]["static"][name] == pytest.approx(expected[name], abs=1e-6)
    assert set(report["selection"]["chosen"]) == {"normalised", "raw", "cosine"}
    chosen = report["selection"]["chosen"]["normalised"]
    grid = report["selection"]["grid"]["normalised"]
    assert grid[str(chosen)]["recall@20"] == max(g["recall@20"] for g in grid.values())


def test_replay_splits_feed_half_of_each_users_validation_and_hold_the_rest(trained: tuple[Path, object]) -> None:
    root, _ = trained
    from training.data.dataset import VALID, InteractionDataset

    dataset = InteractionDataset.load(root / "data")
    splits = replay_splits(dataset, seed=0)
    valid = dataset.matrix(VALID)
    fed, held = splits.select_events, splits.select_truth
    assert (fed.multiply(held)).nnz == 0 and ((fed + held) - valid).max() <= 0  # disjoint parts of validation
    n_valid, n_fed = np.diff(valid.indptr), np.diff(fed.indptr)
    assert np.array_equal(n_fed, np.where(n_valid >= 2, n_valid // 2, 0))
    m = ranking_metrics(np.ones((dataset.n_users, dataset.n_items)), held, fed, np.flatnonzero(np.diff(held.indptr)))
    assert set(m) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}


def test_similarity_run_measures_every_candidate_on_trained_and_cold_items(trained: tuple[Path, object]) -> None:
    root, result = trained
    genres = {f"i{i}": frozenset({("A", "B", "C")[i % 3]}) for i in range(50)}
    report = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "lightgcn", train_settings={"epochs": "2"},
                            seed=1, cold_share=0.2, run=result.run_dir, runs_root=None)  # type: ignore[attr-defined]  # fmt: skip
    names = {"inner_product", "cosine", "content", "encoded", "blend-content", "blend-encoded"}
    assert set(report["trained"]["figures"]) == names and set(report["ingested"]["figures"]) == names
    assert report["ingested"]["cold_items"] == 10
    for part in ("trained", "ingested"):
        for figures in report[part]["figures"].values():
            assert 0.0 <= figures["genre_agreement@10"] <= 1.0 and 0.0 <= figures["co_like_rate@10"] <= 1.0
    for space, grid in report["selection"]["grid"].items():  # α chosen on validation co-likes
        best = max(g["co_like_rate@10"] for g in grid.values())
        assert grid[str(report["selection"]["chosen"][space])]["co_like_rate@10"] == best
