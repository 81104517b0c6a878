"""QARM's alignment (docs/qarm.md, step 3): the ``AlignmentHead`` on frozen encoder features, trained with CLIP's
symmetric in-batch InfoNCE over mined (trigger, target) pairs by the project's ``Trainer`` loop; the epoch is chosen
by held-out pair recall."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.base import ModelInputs
from models.losses import in_batch_info_nce
from models.qarm import AlignmentHead
from training.config import TrainConfig
from training.experiments.qarm_pairs import pair_recall
from training.fit.trainer import Callback, Trainer


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
    history: list[dict[str, Any]]


class ReportProgress(Callback):
    """Each evaluation's held-out pair recall, as one line to ``progress``."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress

    def on_evaluation(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        loss = "–" if entry["loss"] is None else f"{entry['loss']:.4f}"
        metric, value = next(iter(entry["valid"].items()))
        self.progress(f"alignment epoch {entry['epoch']}: loss {loss}, held-out {metric.replace('_', ' ')} {value:.4f}")


class AlignmentTrainer(Trainer):
    """The project's :class:`Trainer` loop on QARM's alignment: seeded shuffles of the mined pairs in batches, the
    symmetric in-batch InfoNCE, held-out pair Recall@k as the validation metric that chooses the epoch."""

    def __init__(self, head: AlignmentHead, content: list[torch.Tensor], train_pairs: np.ndarray,
                 valid_pairs: np.ndarray, *, eligible: np.ndarray, config: AlignmentTrainConfig,
                 callbacks: Sequence[Callback] = ()) -> None:  # fmt: skip
        if valid_pairs.shape[0] == 0:
            raise ValueError("no held-out pairs to choose the alignment epoch (raise valid_share or mine more pairs)")
        self.generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.metric = f"pair_recall@{config.eval_k}"
        loop = TrainConfig(epochs=config.epochs, patience=config.patience, eval_every=1, select_metric=self.metric,
                           seed=config.seed, progress=False)  # fmt: skip
        super().__init__(head, optimizer, config=loop, callbacks=callbacks, name="alignment", show_progress=False)
        self.head, self.content, self.align = head, content, config
        self.train_pairs, self.valid_pairs, self.eligible = torch.from_numpy(train_pairs), valid_pairs, eligible

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        order = self.train_pairs[torch.randperm(self.train_pairs.shape[0], generator=self.generator)]
        for start in range(0, order.shape[0], self.align.batch_size):
            batch = order[start : start + self.align.batch_size]  # (B, 2)
            if batch.shape[0] >= 2:  # an in-batch loss needs a negative
                yield batch

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(batch.reshape(-1), return_inverse=True)
        z = self.head(*[t[unique] for t in self.content])[inverse.reshape(-1, 2)]  # (B, 2, d): each item encoded once
        return symmetric_info_nce(z[:, 0], z[:, 1], batch[:, 0], batch[:, 1], temperature=self.align.temperature)

    def validate(self) -> dict[str, float]:
        embeddings = embed_items(self.head, self.content).numpy()
        return {self.metric: pair_recall(embeddings, self.valid_pairs, eligible=self.eligible, k=self.align.eval_k)}


def train_alignment(head: AlignmentHead, content: list[torch.Tensor], train_pairs: np.ndarray,
                    valid_pairs: np.ndarray, *, eligible: np.ndarray, config: AlignmentTrainConfig,
                    progress: Callable[[str], None] | None = None) -> AlignmentResult:  # fmt: skip
    """In-batch contrastive training of ``head`` on (trigger, target) pairs; the head is left at its best epoch
    by held-out pair Recall@k (epoch 0 = untrained)."""
    trainer = AlignmentTrainer(head, content, train_pairs, valid_pairs, eligible=eligible, config=config,
                               callbacks=[ReportProgress(progress)] if progress is not None else [])  # fmt: skip
    trainer.evaluate(0, None)  # the untrained head is a candidate too
    best = trainer.fit()
    head.eval()
    assert best.state is not None
    return AlignmentResult(state=best.state, best_epoch=best.epoch, valid_recall=best.score, history=trainer.history)
