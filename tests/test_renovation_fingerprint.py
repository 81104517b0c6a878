"""Numbers unchanged across the training renovation (issue 13): the same `mmrec train` and `mmrec export`
commands give the same validation metrics (to 1e-6) and the same exported top-20 lists as recorded before it.

The expected fingerprint (tests/fixtures/renovation_fingerprint_synthetic.json) was recorded from the code before
the move; scripts/renovation_fingerprint.py does the same on lfm2k (tests/fixtures/renovation_fingerprint_lfm2k.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from project_scripts import load_script

from training.data.dataset import InteractionDataset, Modality
from training.data.splits import random_811

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = Path(__file__).with_name("fixtures") / "renovation_fingerprint_synthetic.json"
EPOCHS = 4
RUNS = {
    "lightgcn": ["--train", "learning_rate=0.01", "--set", "embedding_size=16"],
    "vbpr": ["--train", "learning_rate=0.01", "--set", "embedding_size=16"],
    "freedom": ["--train", "learning_rate=0.01", "--set", "embedding_size=16"],
    # R2MR reviews and rewrites at epoch 3; lr 0.01 so that every model's best epoch is a later one.
    "r2mr": ["--train", "learning_rate=0.01", "--set", "feature_dim=8", "--set", "rewrite_every=2", "--set", "first_round_epochs=2",
             "--set", "later_round_epochs=1", "--set", "encoder_channels=32,64", "--set", "decoder_channels=32,64",
             "--set", "codebook_size=64", "--set", "discriminator_channels=32,16"],
}  # fmt: skip


def taste_groups_dataset() -> InteractionDataset:
    """60 users in two taste groups (items 0-29 vs 30-59), 12 interactions each, mostly in their group; a 6-d
    "text" and a 10-d "audio" modality that carry the group (10% / 20% missing): validation improves over epochs."""
    rng = np.random.default_rng(13)
    n_users, n_items = 60, 60
    users, items = [], []
    for u in range(n_users):
        group = u % 2
        users += [u] * 12
        items += [*(rng.choice(30, 10, replace=False) + 30 * group), *(rng.choice(30, 2, replace=False) + 30 * (1 - group))]
    user = np.array(users, dtype=np.int64)
    item_group = (np.arange(n_items) >= 30).astype(np.float32)[:, None]
    modalities = {}
    for name, dim, missing in (("text", 6, 0.1), ("audio", 10, 0.2)):
        present = rng.random(n_items) > missing
        features = (rng.normal(size=(n_items, dim)) + 2.0 * item_group).astype(np.float32) * present[:, None]
        modalities[name] = Modality(name, features, present, f"synthetic-{name}")
    return InteractionDataset(
        name="synthetic-groups", split_name="random-811-seed1", sequential=False,
        user_ids=[f"u{u}" for u in range(n_users)], item_ids=[f"i{i}" for i in range(n_items)],
        user=user, item=np.array(items, dtype=np.int64), timestamp=np.arange(user.size, dtype=np.int64),
        split=random_811(user, seed=1), item_text=[f"item {i}" for i in range(n_items)], item_image=[None] * n_items,
        modalities=modalities,
    )  # fmt: skip


def synthetic_fingerprint(home: Path) -> dict[str, object]:
    taste_groups_dataset().save(home / "datasets" / "synthetic-groups")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result: dict[str, object] = load_script("renovation_fingerprint").fingerprint("synthetic-groups", RUNS, home=home, epochs=EPOCHS,
                                                                   n_users=5)
    finally:
        torch.set_num_threads(threads)
    return result


def test_train_and_export_give_the_recorded_metrics_and_top20(tmp_path: Path) -> None:
    script = load_script("renovation_fingerprint")
    actual = synthetic_fingerprint(tmp_path)
    expected = json.loads(EXPECTED.read_text())
    assert script.differences(expected, actual) == []


def test_fingerprint_differences_see_a_changed_metric_and_a_changed_list() -> None:
    differences = load_script("renovation_fingerprint").differences
    base = {"valid": {"recall@20": 0.25}, "top20": {"u1": ["i1", "i2"]}}
    assert differences(base, {"valid": {"recall@20": 0.25 + 5e-7}, "top20": {"u1": ["i1", "i2"]}}) == []
    assert differences(base, {"valid": {"recall@20": 0.2501}, "top20": {"u1": ["i1", "i2"]}}) == [
        "/valid/recall@20: 0.25 != 0.2501"
    ]
    assert differences(base, {"valid": {"recall@20": 0.25}, "top20": {"u1": ["i2", "i1"]}}) == [
        "/top20/u1: ['i1', 'i2'] != ['i2', 'i1']"
    ]

