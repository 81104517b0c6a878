"""QARM's alignment (docs/qarm.md, step 3): the ``AlignmentHead`` on frozen encoder features, trained with CLIP's
symmetric in-batch InfoNCE over mined (trigger, target) pairs; the epoch is chosen by held-out pair recall."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.base import ModelInputs
from models.losses import in_batch_info_nce
from models.qarm import AlignmentHead
from training.experiments.qarm_pairs import pair_recall


@dataclass(frozen=True)
class AlignmentTrainConfig:
    epochs: int = 40
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.1  # in-batch InfoNCE temperature on cosine similarities (CLIP-style range 0.05–0.2)
    patience: int = 5  # epochs without a better held-out pair recall before stopping
    valid_share: float = 0.1  # share of mined pairs held out to choose the epoch
    eval_k: int = 10  # pair Recall@k: is the target among the trigger's k nearest items?
    i2i_neighbours: int = 10  # I2I pairs per item from the recommender's item–item cosine
    max_pairs: int = 60_000  # cap on mined training pairs (seeded subsample): keeps an epoch a few seconds on CPU
    seed: int = 2024



def content_tensors(inputs: ModelInputs, names: Sequence[str]) -> list[torch.Tensor]:
    """[features (I, d_m) zeroed where absent, mask (I, 1)] per modality in ``names`` order: an embedder's inputs."""
    out = []
    for name in names:
        m = inputs.modalities[name]
        out += [m.features.float() * m.present[:, None], m.present.float()[:, None]]
    return out


@torch.no_grad()
def embed_items(embedder: torch.nn.Module, content: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    was_training = embedder.training
    embedder.eval()
    inputs = content if rows is None else [t[rows] for t in content]
    out: torch.Tensor = embedder(*inputs)
    embedder.train(was_training)
    return out


def symmetric_info_nce(triggers: torch.Tensor, targets: torch.Tensor, trigger_ids: torch.Tensor,
                       target_ids: torch.Tensor, *, temperature: float) -> torch.Tensor:  # fmt: skip
    """CLIP's symmetric in-batch loss over (trigger_b, target_b) pairs (B, d): each trigger against the batch's
    targets and each target against its triggers; the same item twice in a batch is not its own negative."""
    rows = torch.arange(triggers.shape[0], device=triggers.device)
    forward = in_batch_info_nce(triggers, targets, rows, temperature=temperature, key_ids=target_ids)
    backward = in_batch_info_nce(targets, triggers, rows, temperature=temperature, key_ids=trigger_ids)
    return 0.5 * (forward + backward)


@dataclass(frozen=True)
class AlignmentResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    valid_recall: float
    history: list[dict[str, float]]


def train_alignment(head: AlignmentHead, content: list[torch.Tensor], train_pairs: np.ndarray,
                    valid_pairs: np.ndarray, *, eligible: np.ndarray, config: AlignmentTrainConfig,
                    progress: Callable[[str], None] | None = None) -> AlignmentResult:  # fmt: skip
    """In-batch contrastive training of ``head`` on (trigger, target) pairs; the head is left at its best epoch
    by held-out pair Recall@k (epoch 0 = untrained)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    pairs = torch.from_numpy(train_pairs)

    def evaluate() -> float:
        return pair_recall(embed_items(head, content).numpy(), valid_pairs, eligible=eligible, k=config.eval_k)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in head.state_dict().items()}

    best_epoch, best_recall, best_state = 0, evaluate(), snapshot()
    history: list[dict[str, float]] = [{"epoch": 0, "valid_pair_recall": best_recall}]
    stale = 0
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = pairs[torch.randperm(pairs.shape[0], generator=generator)]
        total, batches = 0.0, 0
        for start in range(0, order.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]  # (B, 2)
            if batch.shape[0] < 2:
                continue
            unique, inverse = torch.unique(batch.reshape(-1), return_inverse=True)
            z = head(*[t[unique] for t in content])[inverse.reshape(-1, 2)]  # (B, 2, d): each item encoded once
            loss = symmetric_info_nce(z[:, 0], z[:, 1], batch[:, 0], batch[:, 1], temperature=config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        recall = evaluate()
        history.append({"epoch": epoch, "loss": total / max(batches, 1), "valid_pair_recall": recall})
        if progress is not None:
            progress(f"alignment epoch {epoch}: loss {total / max(batches, 1):.4f}, held-out pair recall@{config.eval_k} {recall:.4f}")
        if recall > best_recall:
            best_epoch, best_recall, best_state = epoch, recall, snapshot()
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return AlignmentResult(state=best_state, best_epoch=best_epoch, valid_recall=best_recall, history=history)
