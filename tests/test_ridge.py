"""The one ridge regression (models/ridge.py) behind R2MR's content encoder (MSE) and the export ridge map (cosine):
solutions and strength selection checked against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ridge import RIDGE_STRENGTHS, SelectionCriterion, fit_ridge


def regression_rows(seed: int, n: int = 120, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n, 5)), np.ones((n, 1))], axis=1)
    y = x @ rng.normal(size=(6, 4)) + noise * rng.normal(size=(n, 4))
    held = rng.random(n) < 0.25
    return x, y, held


def reference_solution(x: np.ndarray, y: np.ndarray, strength: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ y)


def reference_score(pred: np.ndarray, true: np.ndarray, criterion: SelectionCriterion) -> float:
    if criterion == "mse":
        return float(((pred - true) ** 2).mean())
    cosine = (pred * true).sum(axis=1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1) + 1e-12)
    return float(cosine.mean())


@pytest.mark.parametrize("criterion", ["mse", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_ridge_picks_the_strength_numpy_picks_and_refits_on_all_rows(criterion: SelectionCriterion, seed: int) -> None:
    x, y, held = regression_rows(seed)
    scores = {s: reference_score(x[held] @ reference_solution(x[~held], y[~held], s), y[held], criterion)
              for s in RIDGE_STRENGTHS}  # fmt: skip
    best = (min if criterion == "mse" else max)(scores, key=lambda s: scores[s])
    fit = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(held), criterion=criterion)
    assert fit.strength == best
    assert fit.held_out == pytest.approx(scores, rel=1e-9)
    np.testing.assert_allclose(fit.weight.numpy(), reference_solution(x, y, best), rtol=1e-9, atol=1e-12)


def test_fit_ridge_criteria_pick_different_strengths_on_noisy_rows() -> None:
    """Few noisy rows: held-out MSE and held-out cosine disagree on the strength (each pick the brute-force one
    above), so the criterion is a real choice of each caller, not a spelling."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 8)), np.ones((30, 1))], axis=1)
    y = x @ rng.normal(size=(9, 3)) + 3.0 * rng.normal(size=(30, 3))
    held = np.arange(30) % 3 == 0
    picks = {c: fit_ridge(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(held), criterion=c).strength
             for c in ("mse", "cosine")}  # fmt: skip
    assert picks == {"mse": 10.0, "cosine": 100.0}


@pytest.mark.parametrize("held_share", [0.0, 1.0])
def test_fit_ridge_without_rows_to_score_takes_the_middle_strength(held_share: float) -> None:
    x, y, _ = regression_rows(3, n=20)
    held = np.full(20, held_share > 0.5)
    fit = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(held), criterion="cosine")
    assert fit.strength == RIDGE_STRENGTHS[len(RIDGE_STRENGTHS) // 2] and fit.held_out == {}
    np.testing.assert_allclose(fit.weight.numpy(), reference_solution(x, y, fit.strength), rtol=1e-9)
