"""Item content damaged on purpose, seeded and recorded: the input side of the corruption benchmark
(``mmrec corrupt``, docs/modality-quality.md).

:func:`corrupt_content` returns a copy of a dataset whose modalities are damaged and the list of damaged
(item row, modality) pairs; its interactions, split and item texts/images are the same objects, untouched. The
trainer applies it to the model inputs before the model is built (``training/fit/trainer.py``) and
``training.runs.load_run`` applies it again when a corrupted run is rebuilt, so a run is reproducible from its
config.json alone. The draw, for ``fraction`` p and ``seed``:

1. the items that have at least one modality are put in a seeded random order; the first round(p · n) of them are
   damaged (so with one seed the items damaged at p = 0.2 are among those damaged at p = 0.4);
2. each damaged item gets ONE of its present modalities damaged, a seeded uniform choice per item (the same
   choice at every p and for every kind);
3. the damage, by kind:
   - ``missing``: the mask is switched off and the row zeroed (the dataset's convention for an absent modality);
   - ``swapped``: the row becomes the ORIGINAL feature of another item, drawn uniformly among the items that have
     that modality and whose feature differs from the item's own (29 ml100k posters repeat another's bytes);
   - ``noise``: the row becomes a draw from N(μ, Σ), μ and Σ the mean and the full empirical covariance of the
     modality over the items that have it, sampled as μ + Cᵀz / √(n − 1) with C the centred (n, d) feature matrix
     and z ~ N(0, I_n): exactly Σ without forming the d × d matrix (Σ has rank ≤ n − 1 either way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from training.config import CorruptionConfig
from training.data.dataset import InteractionDataset, Modality
from training.runs import CorruptionRecord

# Independent random streams of one corruption seed: which items, which modality, the replacements.
ITEM_STREAM, MODALITY_STREAM, REPLACEMENT_STREAM = 0, 1, 2


@dataclass(frozen=True)
class CorruptedContent:
    """A dataset with damaged modalities, and what was damaged: (item row, modality) pairs sorted by row."""

    dataset: InteractionDataset
    config: CorruptionConfig
    damaged: tuple[tuple[int, str], ...]

    def record(self) -> CorruptionRecord:
        """The run directory's record (training.runs): the pairs with the items' external ids."""
        return CorruptionRecord(dataset=self.dataset.name, kind=self.config.kind, fraction=self.config.fraction,
                                seed=self.config.seed,
                                damaged=tuple((self.dataset.item_ids[row], m) for row, m in self.damaged))  # fmt: skip

    def damaged_mask(self, modality: str) -> np.ndarray:
        """(I,) bool: True where ``modality`` of the item was damaged."""
        mask = np.zeros(self.dataset.n_items, dtype=bool)
        mask[[row for row, m in self.damaged if m == modality]] = True
        return mask


def damaged_pairs(dataset: InteractionDataset, *, fraction: float, seed: int) -> tuple[tuple[int, str], ...]:
    """Which (item row, modality) pairs a corruption of ``fraction`` with ``seed`` damages (steps 1 and 2 above)."""
    names = sorted(dataset.modalities)
    if not names:
        raise ValueError(f"{dataset.name} has no item modalities to corrupt")
    present = np.stack([dataset.modalities[m].present for m in names], axis=1)  # (I, M)
    candidates = np.flatnonzero(present.any(axis=1))
    n_damaged = round(fraction * candidates.size)
    order = np.random.default_rng([seed, ITEM_STREAM]).permutation(candidates)
    draws = np.random.default_rng([seed, MODALITY_STREAM]).random(dataset.n_items)  # one per item row, for every p
    pairs = []
    for row in np.sort(order[:n_damaged]):
        options = np.flatnonzero(present[row])
        pairs.append((int(row), names[int(options[int(draws[row] * options.size)])]))
    return tuple(pairs)


def corrupt_content(dataset: InteractionDataset, config: CorruptionConfig) -> CorruptedContent:
    """``dataset`` with its item content damaged as ``config`` says; unchanged (and nothing damaged) when clean."""
    if not config.active:
        return CorruptedContent(dataset=dataset, config=config, damaged=())
    pairs = damaged_pairs(dataset, fraction=config.fraction, seed=config.seed)
    rng = np.random.default_rng([config.seed, REPLACEMENT_STREAM])
    modalities = dict(dataset.modalities)
    for name in sorted(modalities):
        rows = np.array([row for row, m in pairs if m == name], dtype=np.int64)
        if rows.size:
            modalities[name] = damaged_modality(modalities[name], rows, config.kind, rng)
    return CorruptedContent(dataset=dataclasses.replace(dataset, modalities=modalities), config=config, damaged=pairs)


def damaged_modality(modality: Modality, rows: np.ndarray, kind: str, rng: np.random.Generator) -> Modality:
    """A copy of ``modality`` with ``rows`` (items that have it) damaged by ``kind``."""
    features, present = modality.features.copy(), modality.present.copy()
    if kind == "missing":
        features[rows] = 0.0
        present[rows] = False
    elif kind == "swapped":
        features[rows] = modality.features[swap_partners(modality, rows, rng)]
    elif kind == "noise":
        features[rows] = covariance_noise(modality, rows.size, rng)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return dataclasses.replace(modality, features=features, present=present)


def swap_partners(modality: Modality, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(len(rows),) partner rows: uniform among the items that have the modality, other than the row itself and
    with a different feature vector (redrawn until so)."""
    pool = np.flatnonzero(modality.present)
    partners = pool[rng.integers(0, pool.size, size=rows.size)]
    for _ in range(1000):
        same = (partners == rows) | (modality.features[partners] == modality.features[rows]).all(axis=1)
        if not same.any():
            return partners
        partners[same] = pool[rng.integers(0, pool.size, size=int(same.sum()))]
    raise ValueError(f"modality {modality.name!r}: no item with a different feature to swap in")


def covariance_noise(modality: Modality, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float32 draws from N(μ, Σ) of the modality's items that have it: μ + Cᵀz / √(m − 1), z ~ N(0, I_m)."""
    x = modality.features[modality.present].astype(np.float64)  # (m, d)
    mean = x.mean(axis=0)
    centred = x - mean
    z = rng.standard_normal((n, x.shape[0]))  # (n, m)
    noise: np.ndarray = (mean + z @ centred / np.sqrt(max(x.shape[0] - 1, 1))).astype(np.float32)
    return noise
