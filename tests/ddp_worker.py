"""Trains LightGCN on a seeded synthetic dataset and saves the learned item vectors (rank 0).

Run directly for one process, or under ``python -m torch.distributed.run --nproc_per_node=2`` for two (gloo);
tests/test_distributed.py compares the two.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from training.data.dataset import InteractionDataset
from training.data.splits import random_811
from training.fit.trainer import TrainConfig, train


def synthetic_dataset() -> InteractionDataset:
    rng = np.random.default_rng(7)
    n_users, n_items = 60, 80
    pairs = np.unique(rng.integers(0, [n_users, n_items], size=(1500, 2)), axis=0)
    user, item = pairs[:, 0], pairs[:, 1]
    return InteractionDataset(
        name="synthetic-ddp", split_name="random", sequential=False,
        user_ids=[str(u) for u in range(n_users)], item_ids=[str(i) for i in range(n_items)],
        user=user, item=item, timestamp=np.zeros_like(user), split=random_811(user, seed=3),
        item_text=[None] * n_items, item_image=[None] * n_items,
    )  # fmt: skip


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = train(
        synthetic_dataset(), "lightgcn", dataset_dir=Path("."), runs_root=None,
        # reg_weight 0: MMRec's norm penalty (‖·‖/B) does not split over batch shards; BPR's mean does.
        model_config={"reg_weight": 0.0, "embedding_size": 16},
        train_config=TrainConfig(epochs=8, batch_size=256, patience=100, progress=False, seed=11),
    )  # fmt: skip
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        np.save(out, result.model.representations().items.detach().numpy())
        (out.with_suffix(".recall")).write_text(str(result.valid["recall@20"]))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves while another still talks to it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's background threads can abort ("terminate called without an active
    # exception") while C++ statics are destroyed, after all the work above is done and saved.
    os._exit(0)
