"""The issue-14 measurements (training/experiments/): their figures against hand-computed values and the
evaluator, and a whole run of each on a small synthetic dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from synthetic_datasets import multimodal_dataset

from models.base import ContentEncoder
from training.data.dataset import TEST
from training.experiments.item_similarity import (
    NORM_EXPONENTS,
    POPULARITY_WEIGHTS,
    Judge,
    ModelVectors,
    Spaces,
    choose_correction,
    content_space,
    corrections,
    encoder_output,
    goal,
    ridge_encoded,
    run_similarity,
    top_neighbours,
)
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


def test_popularity_corrections_score_as_their_formulas() -> None:
    """Each correction against its formula per (query, item) in float64; a zero vector scores 0 everywhere."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(7, 3)) * rng.uniform(0.1, 5.0, size=(7, 1))
    vectors[4] = 0.0
    popularity = np.array([0.0, 3, 50, 1, 7, 0, 120])
    spaces = Spaces(vectors=vectors, encoded=vectors, content=vectors, popularity=popularity)
    queries = np.array([0, 2, 6])
    norm = np.linalg.norm
    for a in NORM_EXPONENTS:
        expected = [[0.0 if not norm(vectors[j]) else vectors[q] @ vectors[j] / norm(vectors[q]) / norm(vectors[j]) ** a
                     for j in range(7)] for q in queries]  # fmt: skip
        np.testing.assert_allclose(spaces.scorer("norm-exponent", a)(queries), expected, atol=1e-12)
    for b in POPULARITY_WEIGHTS:
        expected = [[(0.0 if not norm(vectors[j]) else vectors[q] @ vectors[j] / norm(vectors[q]) / norm(vectors[j]))
                     + b * np.log(1 + popularity[j]) for j in range(7)] for q in queries]  # fmt: skip
        np.testing.assert_allclose(spaces.scorer("popularity-shrinkage", b)(queries), expected, atol=1e-12)
    # the family's ends: a = 0 ranks as the inner product, a = 1 is the cosine
    np.testing.assert_array_equal(top_neighbours(spaces.scorer("norm-exponent", 0.0)(queries), queries, k=6),
                                  top_neighbours(spaces.scorer("inner_product")(queries), queries, k=6))  # fmt: skip
    np.testing.assert_allclose(spaces.scorer("norm-exponent", 1.0)(queries), spaces.scorer("cosine")(queries))
    assert list(corrections())[0] == "norm_exponent=1" and len(corrections()) == len(NORM_EXPONENTS) + len(POPULARITY_WEIGHTS)


def _figures(genre: float, co_like: float, popularity: float) -> dict[str, float]:
    return {"genre_agreement@10": genre, "co_like_rate@10": co_like, "neighbour_popularity": popularity}


def test_choose_correction_takes_the_best_co_likes_among_the_admissible() -> None:
    baseline = _figures(0.40, 0.30, 260.0)
    grid = {"a": _figures(0.45, 0.25, 70.0), "b": _figures(0.39, 0.40, 80.0),  # b: genres below the baseline
            "c": _figures(0.50, 0.35, 130.0),  # c: too popular for a cap of 120
            "d": _figures(0.40, 0.28, 120.0), "e": _figures(0.41, 0.28, 90.0)}  # fmt: skip
    assert choose_correction(baseline, grid, 120.0) == (["a", "d", "e"], "d")  # d and e tie on co-likes: d first
    assert choose_correction(baseline, {"b": grid["b"], "c": grid["c"]}, 120.0) == ([], None)


def test_goal_needs_both_figures_above_the_inner_product_for_both_parts_within_the_cap() -> None:
    def report(ingested_co_like: float) -> dict[str, object]:
        figures = {"inner_product": _figures(0.4, 0.3, 260.0), "x": _figures(0.5, 0.31, 100.0)}
        cold = {"inner_product": _figures(0.4, 0.6, 400.0), "x": _figures(0.45, ingested_co_like, 110.0)}
        return {"catalogue_popularity": 60.0, "correction": {"chosen": "x"}, "trained": {"figures": figures},
                "ingested": {"figures": cold}}  # fmt: skip

    assert goal(report(0.61))["met"]
    missed = goal(report(0.6))
    assert not missed["met"] and missed["parts"]["ingested"] == {
        "genre_agreement_above_inner_product": True, "co_like_rate_above_inner_product": False,
        "neighbour_popularity_within_cap": True}  # fmt: skip
    assert not goal({**report(0.7), "correction": {"chosen": None}})["met"]


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


class FirstFeatures(ContentEncoder):
    """Returns its first input's features and, as an extra output, its second modality's mask."""

    extra_output_names = ("second_mask",)

    def __init__(self, modality_names: tuple[str, ...]) -> None:
        super().__init__()
        self.modality_names = modality_names

    def forward(self, *features_and_masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return features_and_masks[0], features_and_masks[3]


def test_encoder_output_feeds_the_encoders_modality_order_and_keeps_the_vector() -> None:
    dataset = multimodal_dataset(n_users=5, n_items=12)
    for first in ("text", "image"):  # the exported graph's input order is the encoder's, not the sorted one
        second = "image" if first == "text" else "text"
        out = encoder_output(FirstFeatures((first, second)), dataset)
        np.testing.assert_array_equal(out, dataset.modalities[first].features.astype(np.float32))


def test_ridge_encoded_is_the_linear_map_of_masked_content_fitted_on_the_given_rows() -> None:
    dataset = multimodal_dataset(n_users=5, n_items=300)
    x = np.concatenate([np.concatenate([m.features * m.present[:, None], m.present[:, None]], axis=1)
                        for _, m in sorted(dataset.modalities.items())] + [np.ones((300, 1))], axis=1)  # fmt: skip
    vectors = x @ np.random.default_rng(0).normal(size=(x.shape[1], 4))  # exactly linear in the masked content
    fit_rows = np.arange(200)
    encoded = ridge_encoded(dataset, vectors.astype(np.float32), fit_rows)
    cosine = (encoded * vectors).sum(1) / np.linalg.norm(encoded, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine[200:].min() > 0.95  # rows the map was not fitted on
    shifted = vectors.copy()
    shifted[200:] = -shifted[200:]  # only the fitted rows count: the others' targets do not move the map
    np.testing.assert_allclose(ridge_encoded(dataset, shifted.astype(np.float32), fit_rows), encoded, rtol=1e-5, atol=1e-5)


def test_model_vectors_round_trip_with_and_without_an_encoder_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base: dict[str, Any] = {"trained": rng.normal(size=(6, 3)), "trained_info": {"a": 1},
                            "cold": rng.normal(size=(6, 3)), "cold_info": {"b": 2}}  # fmt: skip
    encodings: list[dict[str, Any]] = [{}, {"trained_encoded": rng.normal(size=(6, 4)),
                                            "cold_encoded": rng.normal(size=(6, 4))}]  # fmt: skip
    for encoded in encodings:
        vectors = ModelVectors(**base, **encoded)
        vectors.save(tmp_path / "v.npz")
        loaded = ModelVectors.load(tmp_path / "v.npz")
        for name in ("trained", "cold", "trained_encoded", "cold_encoded"):
            mine, theirs = getattr(vectors, name), getattr(loaded, name)
            assert (mine is None and theirs is None) or np.array_equal(mine, theirs)
        assert (loaded.trained_info, loaded.cold_info) == ({"a": 1}, {"b": 2})


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
                            seed=1, cold_share=0.2, run=result.run_dir, runs_root=None,  # type: ignore[attr-defined]
                            vectors_file=root / "vectors.npz")  # fmt: skip
    assert report["ingested"]["model"]["epochs_run"] == 2 and report["ingested"]["model"]["stopped_by"] == "epochs"
    names = {"inner_product", "cosine", "content", "encoded", "blend-content", "blend-encoded", *corrections()}
    assert set(report["trained"]["figures"]) == names and set(report["ingested"]["figures"]) == names
    assert report["ingested"]["cold_items"] == 10
    for part in ("trained", "ingested"):  # the family's ends are the inner product and the cosine
        figures = report[part]["figures"]
        assert figures["norm_exponent=0"] == figures["inner_product"] and figures["norm_exponent=1"] == figures["cosine"]
    correction = report["correction"]  # chosen on validation by the declared rule
    cap = 2.0 * report["catalogue_popularity"]
    assert (correction["admissible"], correction["chosen"]) == choose_correction(correction["inner_product"],
                                                                                correction["grid"], cap)  # fmt: skip
    assert report["goal"] == goal(report)
    # the vectors file: a re-run reads both models' vectors instead of training (1000 epochs would be trained here)
    again = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "lightgcn", train_settings={"epochs": "1000"},
                           seed=1, cold_share=0.2, run=None, runs_root=None, vectors_file=root / "vectors.npz")  # fmt: skip
    assert again == report
    for part in ("trained", "ingested"):
        for figures in report[part]["figures"].values():
            assert 0.0 <= figures["genre_agreement@10"] <= 1.0 and 0.0 <= figures["co_like_rate@10"] <= 1.0
    for space, grid in report["selection"]["grid"].items():  # α chosen on validation co-likes
        best = max(g["co_like_rate@10"] for g in grid.values())
        assert grid[str(report["selection"]["chosen"][space])]["co_like_rate@10"] == best
    assert report["item_encoder"] == "ridge-map"  # LightGCN has no content encoder of its own
    # a model with its own encoder: its outputs replace the ridge map's; given the ridge map's own outputs, every
    # figure is the same
    from training.data.dataset import InteractionDataset
    from training.experiments.cold_protocol import make_cold_split

    dataset = InteractionDataset.load(root / "data")
    saved = ModelVectors.load(root / "vectors.npz")
    warm = np.setdiff1d(np.arange(dataset.n_items), make_cold_split(dataset, share=0.2, seed=1).cold)
    native = dataclasses.replace(saved, trained_encoded=ridge_encoded(dataset, saved.trained, np.arange(dataset.n_items)),
                                 cold_encoded=ridge_encoded(dataset, saved.cold, warm))  # fmt: skip
    native.save(root / "native.npz")
    as_native = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "lightgcn", train_settings={},
                               seed=1, cold_share=0.2, run=None, runs_root=None, vectors_file=root / "native.npz")  # fmt: skip
    assert as_native == {**report, "item_encoder": "native"}
    other = dataclasses.replace(native, cold_encoded=np.random.default_rng(0).normal(size=native.cold_encoded.shape))  # type: ignore[union-attr]
    other.save(root / "other.npz")
    moved = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "lightgcn", train_settings={},
                           seed=1, cold_share=0.2, run=None, runs_root=None, vectors_file=root / "other.npz")  # fmt: skip
    assert moved["trained"] == report["trained"] and moved["ingested"]["figures"] != report["ingested"]["figures"]
    trained_other = dataclasses.replace(native, trained_encoded=np.random.default_rng(1).normal(size=native.trained_encoded.shape))  # type: ignore[union-attr]
    trained_other.save(root / "trained-other.npz")
    shifted = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "lightgcn", train_settings={},
                             seed=1, cold_share=0.2, run=None, runs_root=None, vectors_file=root / "trained-other.npz")  # fmt: skip
    trained_figures, old_figures = shifted["trained"]["figures"], report["trained"]["figures"]
    assert trained_figures["encoded"] != old_figures["encoded"]  # the trained items' encoder outputs are read
    assert trained_figures["cosine"] == old_figures["cosine"]
    for name in ("inner_product", "cosine", "encoded"):  # the held-out part reads cold_encoded (its blend's α moves)
        assert shifted["ingested"]["figures"][name] == report["ingested"]["figures"][name]


def test_a_model_with_its_own_content_encoder_is_measured_through_it(trained: tuple[Path, object]) -> None:
    """VBPR has a content encoder: both of its models' outputs are kept, the report says "native", and the held-out
    items' served vectors are the cold model's encoder outputs, not a ridge map's."""
    root, _ = trained
    genres = {f"i{i}": frozenset({("A", "B", "C")[i % 3]}) for i in range(50)}
    report = run_similarity(root / "data", lambda ids: [genres[i] for i in ids], "vbpr", train_settings={"epochs": "1"},
                            seed=1, cold_share=0.2, run=None, runs_root=None, vectors_file=root / "vbpr.npz")  # fmt: skip
    assert report["item_encoder"] == "native"
    vectors = ModelVectors.load(root / "vbpr.npz")
    assert vectors.trained_encoded is not None and vectors.cold_encoded is not None
    assert vectors.trained_encoded.shape == vectors.trained.shape == vectors.cold_encoded.shape
    assert not np.allclose(vectors.trained_encoded, vectors.cold_encoded)  # two models, two encoders
