"""scripts/similarity_item_knn.py's score matrices against brute-force references on a small random interaction
matrix: item-kNN is the asymmetric cosine of the items' user sets, EASE's closed form is the ridge regression of each
item's column on the other items' columns (no self-weight)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("similarity_item_knn", REPO / "scripts" / "similarity_item_knn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def interactions(seed: int = 0) -> np.ndarray:
    """(users, items) binary, one item without users (its column must score −1)."""
    x = (np.random.default_rng(seed).random((40, 9)) < 0.3).astype(np.float64)
    x[:, 4] = 0.0
    return x


def gram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shared = x.T @ x
    n_users = np.diag(shared).copy()
    np.fill_diagonal(shared, 0.0)
    return shared, n_users


def test_ease_is_the_ridge_regression_of_each_item_on_the_others(script: ModuleType) -> None:
    x = interactions()
    shared, n_users = gram(x)
    shrinkage = 3.0
    weights = script.ease(shared, n_users, shrinkage)
    n = x.shape[1]
    for j in range(n):
        if n_users[j] == 0:
            assert np.all(weights[:, j] == -1.0)
            continue
        others = [i for i in range(n) if i != j]
        a = x[:, others]
        b = np.linalg.solve(a.T @ a + shrinkage * np.eye(n - 1), a.T @ x[:, j])  # argmin |x_j − A b|² + λ|b|²
        assert weights[j, j] == 0.0
        np.testing.assert_allclose(weights[others, j], b, rtol=1e-8, atol=1e-10)


def test_item_knn_is_the_asymmetric_cosine_of_user_sets(script: ModuleType) -> None:
    x = interactions(1)
    shared, n_users = gram(x)
    beta = 0.7
    scores = script.item_knn(shared, n_users, beta)
    for i in range(x.shape[1]):
        for j in range(x.shape[1]):
            if n_users[j] == 0:
                assert scores[i, j] == -1.0
            elif i != j:
                common = float(np.sum(x[:, i] * x[:, j]))
                expected = common / (max(n_users[i], 1.0) ** (1 - beta) * n_users[j] ** beta)
                assert scores[i, j] == pytest.approx(expected)
