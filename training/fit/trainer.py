"""The one trainer for every model: seeded batches, Adam, validation-based early stopping, a run directory.

Selection happens on VALIDATION only (``select_metric``, default Recall@20); the test split is evaluated at each
new best validation epoch and the numbers reported are those of the best validation epoch. The test metrics never
influence any decision.

Under ``torchrun`` (WORLD_SIZE > 1) the same code trains with DistributedDataParallel over gloo: every rank draws
the same global batch and keeps its slice, gradients are averaged, and every rank evaluates identically so that
early stopping agrees; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, model_spec
from models.base import Recommender
from models.config import build_config, config_to_dict
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.data.inputs import model_inputs
from training.device import resolve_device
from training.fit.evaluator import DEFAULT_TOPK, FullRankingEvaluator
from training.fit.sampling import BPRSampler, SequenceSampler
from training.runs import initialise_from_run, new_run_directory, write_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1000  # MMRec's ceiling; early stopping ends runs long before it
    batch_size: int = 2048  # MMRec default
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # multiply the learning rate by this every lr_decay_every epochs (LATTICE uses 0.96/50)
    lr_decay_every: int = 50
    patience: int = 20  # evaluations without a better validation metric before stopping (MMRec: 20)
    eval_every: int = 1
    select_metric: str = "recall@20"
    topk: tuple[int, ...] = DEFAULT_TOPK
    seed: int = 2024
    device: str = "auto"
    max_minutes: float = 0.0  # wall-clock budget for the epoch loop; 0 means none
    sequence_length: int = 50  # history length for sequence models
    sequence_stride: int = 1  # sequence models: every prefix is an example (1), or every k-th; 0: k = history length
    mask_history: bool = True  # mask the user's earlier items when ranking (MMRec); False: RecBole's sequential protocol
    init_from: str = ""  # a run directory whose checkpoint initialises the model (pre-training → fine-tuning)
    eval_batch_users: int = 4096
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path | None
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    model: Recommender


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if world_size > 1:
        return torch.distributed.get_rank(), world_size
    return 0, 1


def train(
    dataset: InteractionDataset,
    model_name: str,
    *,
    dataset_dir: Path,
    model_config: Mapping[str, Any] | None = None,
    train_config: TrainConfig = TrainConfig(),
    runs_root: Path | None,
    tag: str = "",
    initialise: Callable[[Recommender], None] | None = None,
) -> TrainResult:
    """Train ``model_name`` on ``dataset`` and, when ``runs_root`` is given, write a run directory there.

    ``initialise`` is called once on the freshly built model, before it moves to the device and before the optimiser
    sees its parameters: it installs pretrained parts that a config cannot carry (QARM's alignment head and
    codebooks); they must live in the model's state_dict so that the checkpoint rebuilds the model.
    """
    metric_name, _, metric_k = train_config.select_metric.partition("@")
    if not metric_k.isdigit() or int(metric_k) not in train_config.topk:
        raise ValueError(f"select_metric {train_config.select_metric!r} needs its k among topk {train_config.topk}")
    rank, world_size = _distributed()
    seed_everything(train_config.seed)
    spec = model_spec(model_name)
    if spec.needs_modalities and not dataset.modalities:
        raise ValueError(f"{model_name} needs item modalities and {dataset.name} has none")
    config = build_config(spec.config_class, model_config or {})
    device = resolve_device(train_config.device)
    inputs = model_inputs(dataset)
    model = build_model(model_name, inputs, config_to_dict(config))
    if initialise is not None:
        initialise(model)
    if train_config.init_from:
        missing = initialise_from_run(model, Path(train_config.init_from), model_name=model_name)
        log.info("%s: initialised from %s; new parameters: %s", model_name, train_config.init_from, missing)
    model = model.to(device)
    history_length = int(getattr(config, "max_length", train_config.sequence_length))
    valid_eval = FullRankingEvaluator(dataset, split=VALID, topk=train_config.topk,
                                      batch_users=train_config.eval_batch_users, history_length=history_length,
                                      mask_history=train_config.mask_history)  # fmt: skip
    test_eval = FullRankingEvaluator(dataset, split=TEST, topk=train_config.topk,
                                     batch_users=train_config.eval_batch_users, history_length=history_length,
                                     mask_history=train_config.mask_history)  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped: torch.nn.Module = model
    if world_size > 1 and trainable:
        # Graph buffers are built identically on every rank from the data: nothing to broadcast.
        wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = (
        torch.optim.Adam(trainable, lr=train_config.learning_rate, weight_decay=train_config.weight_decay)
        if trainable
        else None
    )
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=train_config.lr_decay_every, gamma=train_config.lr_decay)
        if optimizer is not None
        else None
    )
    sampler: BPRSampler | SequenceSampler
    if model.batch_kind == "sequence":
        sampler = SequenceSampler(dataset.chronological_history(through=TRAIN), max_length=history_length,
                                  seed=train_config.seed, stride=train_config.sequence_stride or history_length)  # fmt: skip
    else:
        users, items = dataset.edges(TRAIN)
        sampler = BPRSampler(users, items, dataset.n_items, seed=train_config.seed)

    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -np.inf, "valid": {}, "test": {}, "state": None}
    stale = 0
    epochs = train_config.epochs if optimizer is not None and model.batch_kind != "none" else 0
    show = train_config.progress and rank == 0
    epoch_bar = tqdm(range(1, epochs + 1), desc=f"{model_name}@{dataset.name}", disable=not show, leave=False)
    epoch_seconds: list[float] = []

    def evaluate(epoch: int, loss: float | None) -> bool:
        nonlocal stale
        valid = valid_eval.evaluate(model).metrics
        entry: dict[str, Any] = {"epoch": epoch, "loss": loss, "valid": valid}
        improved = valid[train_config.select_metric] > best["score"]
        if improved:
            best.update(
                epoch=epoch,
                score=valid[train_config.select_metric],
                valid=valid,
                test=test_eval.evaluate(model).metrics,
                state=copy.deepcopy(model.state_dict()),
            )
            stale = 0
        else:
            stale += 1
        history.append(entry)
        return bool(improved)

    if epochs == 0:
        evaluate(0, None)
    for epoch in epoch_bar:
        epoch_start = time.perf_counter()
        model.train()
        model.on_epoch_start(epoch, torch.Generator().manual_seed(train_config.seed * 100_003 + epoch))
        total, batches = 0.0, 0
        assert optimizer is not None and scheduler is not None
        for batch in sampler.epoch(epoch, train_config.batch_size, rank=rank, world_size=world_size):
            batch = type(batch)(**{k: v.to(device) for k, v in vars(batch).items()})
            optimizer.zero_grad(set_to_none=True)
            loss = wrapped(batch)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        scheduler.step()
        epoch_seconds.append(time.perf_counter() - epoch_start)
        mean_loss = total / max(batches, 1)
        if not np.isfinite(mean_loss):
            raise FloatingPointError(f"{model_name}: training loss became {mean_loss} at epoch {epoch}")
        if epoch % train_config.eval_every == 0 or epoch == epochs:
            evaluate(epoch, mean_loss)
            epoch_bar.set_postfix(loss=f"{mean_loss:.4f}", **{
                f"val_{train_config.select_metric}": f"{history[-1]['valid'][train_config.select_metric]:.4f}",
                "best": best["epoch"]})  # fmt: skip
            if stale >= train_config.patience:
                log.info("%s: early stop at epoch %d (best %d)", model_name, epoch, best["epoch"])
                break
        else:
            history.append({"epoch": epoch, "loss": mean_loss})
        if train_config.max_minutes and (time.perf_counter() - started) > 60 * train_config.max_minutes:
            log.warning("%s: stopped by the %.1f-minute budget at epoch %d", model_name, train_config.max_minutes, epoch)
            break
    wall = time.perf_counter() - started
    if best["state"] is not None:
        model.load_state_dict(best["state"])

    run_dir = None
    if runs_root is not None and rank == 0:
        run_dir = new_run_directory(runs_root, dataset.name, model_name, train_config.seed, tag)
        train_dict = config_to_dict(train_config)
        write_run(run_dir, config={
            "model": model_name, "model_config": config_to_dict(config), "train_config": train_dict,
            "dataset": {"name": dataset.name, "split": dataset.split_name, "dir": str(dataset_dir),
                        "n_users": dataset.n_users, "n_items": dataset.n_items},
            "tag": tag, "world_size": world_size,
        }, metrics={
            "model": model_name, "dataset": dataset.name, "seed": train_config.seed, "tag": tag,
            "best_epoch": best["epoch"], "select_metric": train_config.select_metric,
            "valid": best["valid"], "test": best["test"], "wall_seconds": wall,
            "epochs_run": len(epoch_seconds),
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
            "n_parameters": sum(p.numel() for p in trainable),
            "history": history,
        }, model_name=model_name, model_config=config_to_dict(config), state=model.state_dict(),
            dataset_dir=dataset_dir, train_config=train_dict, select_metric=train_config.select_metric)  # fmt: skip
    return TrainResult(run_dir=run_dir, best_epoch=best["epoch"], valid=best["valid"], test=best["test"], model=model)
