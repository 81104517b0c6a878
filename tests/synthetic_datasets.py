"""Seeded synthetic datasets shared by several test modules (not a test module itself)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.data.dataset import InteractionDataset, Modality
from training.data.splits import random_811


def multimodal_dataset(
    n_users: int = 40,
    n_items: int = 60,
    seed: int = 5,
    *,
    item_text: Callable[[int], str] = lambda i: f"item {i}",
) -> InteractionDataset:
    """Random interactions split 8:1:1, with a 12-d "text" (10% missing) and a 20-d "image" (20% missing)."""
    rng = np.random.default_rng(seed)
    pairs = np.unique(rng.integers(0, [n_users, n_items], size=(900, 2)), axis=0)
    user, item = pairs[:, 0], pairs[:, 1]
    text_present = rng.random(n_items) > 0.1
    image_present = rng.random(n_items) > 0.2
    modalities = {
        "text": Modality("text", rng.normal(size=(n_items, 12)).astype(np.float32) * text_present[:, None],
                         text_present, "fake-text"),
        "image": Modality("image", rng.normal(size=(n_items, 20)).astype(np.float32) * image_present[:, None],
                          image_present, "fake-image"),
    }  # fmt: skip
    return InteractionDataset(
        name="synthetic-mm", split_name="random", sequential=False,
        user_ids=[f"u{u}" for u in range(n_users)], item_ids=[f"i{i}" for i in range(n_items)],
        user=user, item=item, timestamp=np.zeros_like(user), split=random_811(user, seed=1),
        item_text=[item_text(i) for i in range(n_items)], item_image=[None] * n_items, modalities=modalities,
    )  # fmt: skip
