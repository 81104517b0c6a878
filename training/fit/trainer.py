"""The one trainer for every model: seeded batches, Adam, validation-based early stopping, a run directory.

Selection happens on VALIDATION only (``select_metric``, default Recall@20); the test split is evaluated at each
new best validation epoch and the numbers reported are those of the best validation epoch. The test metrics never
influence any decision. A run ends by early stopping (``patience`` evaluations without a better validation metric)
or at ``epochs``; ``max_minutes`` is a safety cap whose firing is reported (``stopped_by``), never the intended end.

Under ``torchrun`` (WORLD_SIZE > 1) the same code trains with DistributedDataParallel over gloo: every rank draws
the same global batch and keeps its slice, gradients are averaged, and every rank evaluates identically so that
early stopping agrees; rank 0 alone writes the run directory.

The API, smallest first:

- :func:`train` — build, fit and (with ``runs_root``) write a run directory for a registered model;
- :class:`RecommenderTrainer` — the same as an object: ``fit()``, then ``write_run(runs_root, tag)``;
- :class:`Trainer` — the loop itself, for any ``nn.Module``: subclass it and override ``batches(epoch)``,
  ``loss(batch)``, ``validate()`` and ``test()`` (a loop that is not a Recommender's, e.g. QARM's alignment);
- :class:`Callback` — hooks (epoch start, after backward, evaluation, epoch end) to add behaviour such as
  :class:`ClipGradNorm` without editing the loop.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, model_spec
from models.base import Recommender
from models.config import build_config, config_to_dict
from training.config import CorruptionConfig, TrainConfig, reads_content
from training.data.corruption import corrupt_content
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.data.inputs import model_inputs
from training.device import resolve_device
from training.fit.evaluator import FullRankingEvaluator
from training.fit.sampling import BPRSampler, SequenceSampler
from training.runs import initialise_from_run, new_run_directory, write_corruption, write_run
from training.settings import world_size as configured_world_size

__all__ = ["Callback", "ClipGradNorm", "RecommenderTrainer", "TrainConfig", "TrainResult", "Trainer", "train"]

log = logging.getLogger(__name__)

# Why a run ended (metrics.json "stopped_by").
EARLY_STOPPING = "early_stopping"  # `patience` evaluations without a better validation metric
EPOCH_CAP = "epochs"  # the configured number of epochs ran
SAFETY_CAP = "safety_cap"  # the wall-clock safety cap (max_minutes) fired: NOT an intended end, reported loudly
NOTHING_TO_TRAIN = "nothing_to_train"  # no trainable parameters (popularity): evaluated once, at epoch 0


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path | None
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    model: Recommender
    stopped_by: str = EPOCH_CAP


@dataclass
class Best:
    """The best validation evaluation so far and the model state at it."""

    epoch: int = 0
    score: float = -np.inf
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] | None = None


class Callback:
    """Hooks the :class:`Trainer` calls; override what you need (each is a no-op here)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the epoch's first batch."""

    def after_backward(self, trainer: Trainer) -> None:
        """Gradients are computed, the optimiser has not stepped yet."""

    def on_evaluation(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        """After a validation pass; ``entry`` is its history line (epoch, loss, valid)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, loss: float) -> None:
        """After the epoch (and its evaluation, if one was due)."""


@dataclass(frozen=True)
class ClipGradNorm(Callback):
    """Clip the gradients' global L2 norm to ``max_norm`` before every optimiser step."""

    max_norm: float

    def after_backward(self, trainer: Trainer) -> None:
        torch.nn.utils.clip_grad_norm_(trainer.parameters, self.max_norm)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the gloo process group under torchrun."""
    world_size = configured_world_size()
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if world_size > 1:
        return torch.distributed.get_rank(), world_size
    return 0, 1


class Trainer:
    """Epochs of optimiser steps, a validation pass every ``eval_every`` epochs, early stopping on
    ``config.select_metric``, the best state restored at the end.

    Override in a subclass: :meth:`batches`, :meth:`loss`, :meth:`validate` (dict of metrics, one of which is
    ``select_metric``) and :meth:`test` (evaluated at each new best validation epoch only). After :meth:`fit`:
    ``best``, ``history``, ``stopped_by``, ``epochs_run``, ``wall_seconds``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, config: TrainConfig,
                 epochs: int | None = None, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 callbacks: Sequence[Callback] = (), name: str = "model", show_progress: bool = True) -> None:  # fmt: skip
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.epochs = config.epochs if epochs is None else epochs
        self.callbacks = list(callbacks)
        self.name = name
        self.show_progress = show_progress and config.progress
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.best = Best()
        self.history: list[dict[str, Any]] = []
        self.stale = 0
        self.epoch_seconds: list[float] = []
        self.stopped_by = ""
        self.wall_seconds = 0.0
        self._started = 0.0

    # ------------------------------------------------------------------------------------------ override points
    def batches(self, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def test(self) -> dict[str, float]:
        return {}

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()

    # ----------------------------------------------------------------------------------------------- the loop
    @property
    def epochs_run(self) -> int:
        return len(self.epoch_seconds)

    def fit(self) -> Best:
        """Train until early stopping, the epoch cap or the safety cap; leave the model at its best state."""
        self._started = time.perf_counter()
        if self.epochs == 0:
            self.evaluate(0, None)
            self.stopped_by = NOTHING_TO_TRAIN
        # The bar counts to the epoch by which this run will have stopped unless validation improves again
        # (latest_stop_epoch: early stopping or the epoch cap, whichever comes first), so its total moves out when a
        # new best is found. Its ETA is the mean time of the epochs so far (evaluations included) times the epochs
        # left: smoothing=0, not tqdm's recent-rate average, which swings between evaluated and plain epochs.
        bar = tqdm(total=self.epochs, desc=self.name, unit="epoch", smoothing=0, disable=not self.show_progress,
                   leave=False)  # fmt: skip
        for epoch in range(1, self.epochs + 1):
            loss = self.train_epoch(epoch)
            evaluated = epoch % self.config.eval_every == 0 or epoch == self.epochs
            if evaluated:
                self.evaluate(epoch, loss)
                bar.total = self.latest_stop_epoch()
                bar.set_postfix(loss=f"{loss:.4f}", best=self.best.epoch, **{
                    f"val_{self.config.select_metric}": f"{self.history[-1]['valid'][self.config.select_metric]:.4f}"},
                    refresh=False)  # fmt: skip
            else:
                self.history.append({"epoch": epoch, "loss": loss})
            bar.update(1)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, loss)
            self.stopped_by = self.stop_reason(epoch, evaluated=evaluated) or ""
            if self.stopped_by:
                break
        else:
            self.stopped_by = self.stopped_by or EPOCH_CAP
        bar.close()
        self.wall_seconds = time.perf_counter() - self._started
        self.restore_best()
        return self.best

    def train_epoch(self, epoch: int) -> float:
        """One pass over ``batches(epoch)``; the mean loss (a non-finite one raises FloatingPointError)."""
        started = time.perf_counter()
        self.begin_epoch(epoch)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        total, n_batches = 0.0, 0
        for batch in self.batches(epoch):
            total += self.step(batch)
            n_batches += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch_seconds.append(time.perf_counter() - started)
        mean_loss = total / max(n_batches, 1)
        if not np.isfinite(mean_loss):
            raise FloatingPointError(f"{self.name}: training loss became {mean_loss} at epoch {epoch}")
        return mean_loss

    def step(self, batch: Any) -> float:
        """One optimiser step on ``batch``; its loss."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()  # type: ignore[no-untyped-call]
        for callback in self.callbacks:
            callback.after_backward(self)
        self.optimizer.step()
        return float(loss.detach())

    def evaluate(self, epoch: int, loss: float | None) -> bool:
        """Validate; on a new best, evaluate the test split and keep the state. Whether it improved."""
        valid = self.validate()
        entry: dict[str, Any] = {"epoch": epoch, "loss": loss, "valid": valid}
        improved = bool(valid[self.config.select_metric] > self.best.score)
        if improved:
            self.best = Best(epoch=epoch, score=valid[self.config.select_metric], valid=valid, test=self.test(),
                             state=copy.deepcopy(self.model.state_dict()))  # fmt: skip
            self.stale = 0
        else:
            self.stale += 1
        self.history.append(entry)
        for callback in self.callbacks:
            callback.on_evaluation(self, entry)
        return improved

    def latest_stop_epoch(self) -> int:
        """The epoch at which this run stops if validation does not improve again: ``patience`` more evaluations
        after the best epoch (evaluations fall on multiples of ``eval_every``), or the epoch cap if that comes first."""
        every = self.config.eval_every
        last_evaluated = self.history[-1]["epoch"] if self.history else 0
        evaluations_left = self.config.patience - self.stale
        return int(min(self.epochs, (last_evaluated // every + evaluations_left) * every))

    def stop_reason(self, epoch: int, *, evaluated: bool) -> str | None:
        """Early stopping (checked after an evaluation), or the safety cap (logged as a warning); None to go on."""
        if evaluated and self.stale >= self.config.patience:
            log.info("%s: early stop at epoch %d (best %d)", self.name, epoch, self.best.epoch)
            return EARLY_STOPPING
        minutes = self.config.max_minutes
        if minutes and (time.perf_counter() - self._started) > 60 * minutes:
            log.warning("%s: the %.1f-minute SAFETY cap stopped training at epoch %d of %d (best %d): the run did "
                        "not reach early stopping or its epoch cap", self.name, minutes, epoch, self.epochs,
                        self.best.epoch)  # fmt: skip
            return SAFETY_CAP
        return None

    def restore_best(self) -> None:
        if self.best.state is not None:
            self.model.load_state_dict(self.best.state)

    def summary(self) -> dict[str, Any]:
        """How the loop went, for metrics.json."""
        out: dict[str, Any] = {
            "best_epoch": self.best.epoch, "select_metric": self.config.select_metric, "valid": self.best.valid,
            "test": self.best.test, "wall_seconds": self.wall_seconds, "epochs_run": self.epochs_run,
            "seconds_per_epoch": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else 0.0,
            "n_parameters": sum(p.numel() for p in self.parameters), "stopped_by": self.stopped_by,
        }  # fmt: skip
        if self.stopped_by == SAFETY_CAP:
            out["safety_cap"] = {"max_minutes": self.config.max_minutes, "epoch": self.epochs_run,
                                 "epochs": self.epochs, "warning": safety_cap_warning(self.config.max_minutes,
                                                                                      self.epochs_run, self.epochs)}  # fmt: skip
        return out


def safety_cap_warning(minutes: float, epoch: int, epochs: int) -> str:
    return (f"WARNING: the {minutes:g}-minute wall-clock safety cap stopped training at epoch {epoch} of {epochs}; "
            "this model depends on how busy the machine was (cap runs with epochs, not minutes)")  # fmt: skip


class RecommenderTrainer(Trainer):
    """A registered model (``models.MODELS``) trained on an :class:`InteractionDataset`: BPR or sequence batches,
    Adam (with the StepLR decay of ``lr_decay``), full-ranking Recall/NDCG/... on the valid and test splits.

    With an active ``corruption`` the model is built from damaged item content (``training/data/corruption.py``),
    the one place where a corruption reaches a model; interactions, sampling and evaluation are the same."""

    def __init__(self, dataset: InteractionDataset, model_name: str, *, dataset_dir: Path,
                 model_config: Mapping[str, Any] | Any = None, config: TrainConfig | None = None,
                 initialise: Callable[[Recommender], None] | None = None,
                 callbacks: Sequence[Callback] = (), corruption: CorruptionConfig | None = None) -> None:  # fmt: skip
        config = config or TrainConfig()
        check_select_metric(config)
        self.rank, self.world_size = distributed()
        seed_everything(config.seed)
        self.dataset, self.dataset_dir, self.model_name = dataset, dataset_dir, model_name
        corruption = corruption or CorruptionConfig()
        if corruption.active and not reads_content(model_name):
            raise ValueError(f"{model_name} reads no item content: a corruption of it would change nothing")
        self.content = corrupt_content(dataset, corruption)  # the dataset itself when clean
        self.model_config = self._model_config(model_config)
        self.device = resolve_device(config.device)
        self.recommender = self._build(initialise, config)
        history_length = int(getattr(self.model_config, "max_length", config.sequence_length))
        self.valid_eval, self.test_eval = (
            FullRankingEvaluator(dataset, split=split, topk=config.topk, batch_users=config.eval_batch_users,
                                 history_length=history_length, mask_history=config.mask_history)
            for split in (VALID, TEST))  # fmt: skip
        trainable = [p for p in self.recommender.parameters() if p.requires_grad]
        self.wrapped: torch.nn.Module = self.recommender
        if self.world_size > 1 and trainable:
            # Graph buffers are built identically on every rank from the data: nothing to broadcast.
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.recommender, broadcast_buffers=False)
        optimizer = (torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
                     if trainable else None)  # fmt: skip
        scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
                     if optimizer is not None else None)  # fmt: skip
        self.sampler = self._sampler(config, history_length)
        epochs = config.epochs if optimizer is not None and self.recommender.batch_kind != "none" else 0
        super().__init__(self.recommender, optimizer, config=config, epochs=epochs, scheduler=scheduler,
                         callbacks=callbacks, name=f"{model_name}@{dataset.name}", show_progress=self.rank == 0)  # fmt: skip

    def _model_config(self, model_config: Mapping[str, Any] | Any) -> Any:
        spec = model_spec(self.model_name)
        if spec.needs_modalities and not self.dataset.modalities:
            raise ValueError(f"{self.model_name} needs item modalities and {self.dataset.name} has none")
        layer = model_config if isinstance(model_config, Mapping) or model_config is None else config_to_dict(model_config)
        return build_config(spec.config_class, layer or {})

    def _build(self, initialise: Callable[[Recommender], None] | None, config: TrainConfig) -> Recommender:
        """The model: built from its config, then ``initialise``, then ``init_from``'s checkpoint, on the device.

        ``initialise`` is called once on the freshly built model, before it moves to the device and before the
        optimiser sees its parameters: it installs pretrained parts that a config cannot carry (QARM's alignment
        head and codebooks); they must live in the model's state_dict so that the checkpoint rebuilds the model.
        """
        inputs = model_inputs(self.content.dataset, knowledge_graph=model_spec(self.model_name).needs_knowledge_graph)
        model = build_model(self.model_name, inputs, config_to_dict(self.model_config))
        if initialise is not None:
            initialise(model)
        if config.init_from:
            missing = initialise_from_run(model, Path(config.init_from), model_name=self.model_name)
            log.info("%s: initialised from %s; new parameters: %s", self.model_name, config.init_from, missing)
        return model.to(self.device)

    def _sampler(self, config: TrainConfig, history_length: int) -> BPRSampler | SequenceSampler:
        if self.recommender.batch_kind == "sequence":
            return SequenceSampler(self.dataset.chronological_history(through=TRAIN), max_length=history_length,
                                   seed=config.seed, stride=config.sequence_stride or history_length)  # fmt: skip
        users, items = self.dataset.edges(TRAIN)
        return BPRSampler(users, items, self.dataset.n_items, seed=config.seed)

    def begin_epoch(self, epoch: int) -> None:
        self.recommender.train()
        self.recommender.on_epoch_start(epoch, torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))

    def batches(self, epoch: int) -> Iterable[Any]:
        for batch in self.sampler.epoch(epoch, self.config.batch_size, rank=self.rank, world_size=self.world_size):
            yield type(batch)(**{k: v.to(self.device) for k, v in vars(batch).items()})

    def loss(self, batch: Any) -> torch.Tensor:
        loss: torch.Tensor = self.wrapped(batch)
        return loss

    def validate(self) -> dict[str, float]:
        return self.valid_eval.evaluate(self.recommender).metrics

    def test(self) -> dict[str, float]:
        return self.test_eval.evaluate(self.recommender).metrics

    def write_run(self, runs_root: Path, tag: str = "") -> Path:
        """The checkpoint: a run directory with config, metrics, learning curve and the best state."""
        corruption = self.content.config
        directory_tag = "-".join(part for part in (tag, corruption.label()) if part)
        run_dir = new_run_directory(runs_root, self.dataset.name, self.model_name, self.config.seed, directory_tag)
        train_dict, model_dict = config_to_dict(self.config), config_to_dict(self.model_config)
        data = self.dataset
        damaged = {"corruption": config_to_dict(corruption)} if corruption.active else {}  # clean runs: no key
        write_run(run_dir, config={
            "model": self.model_name, "model_config": model_dict, "train_config": train_dict,
            "dataset": {"name": data.name, "split": data.split_name, "dir": str(self.dataset_dir),
                        "n_users": data.n_users, "n_items": data.n_items},
            "tag": tag, "world_size": self.world_size, **damaged,
        }, metrics={
            "model": self.model_name, "dataset": data.name, "seed": self.config.seed, "tag": tag,
            **self.summary(), "history": self.history,
        }, model_name=self.model_name, model_config=model_dict, state=self.recommender.state_dict(),
            dataset_dir=self.dataset_dir, train_config=train_dict, select_metric=self.config.select_metric)  # fmt: skip
        if corruption.active:
            write_corruption(run_dir, self.content.record())
        return run_dir


def check_select_metric(config: TrainConfig) -> None:
    _, _, k = config.select_metric.partition("@")
    if not k.isdigit() or int(k) not in config.topk:
        raise ValueError(f"select_metric {config.select_metric!r} needs its k among topk {config.topk}")


def train(
    dataset: InteractionDataset,
    model_name: str,
    *,
    dataset_dir: Path,
    model_config: Mapping[str, Any] | Any = None,
    train_config: TrainConfig | None = None,
    runs_root: Path | None,
    tag: str = "",
    initialise: Callable[[Recommender], None] | None = None,
    callbacks: Sequence[Callback] = (),
    corruption: CorruptionConfig | None = None,
) -> TrainResult:
    """Train ``model_name`` on ``dataset`` and, when ``runs_root`` is given, write a run directory there.

    ``model_config`` is a mapping of settings or the model's config dataclass (``compose(...).model_config``);
    ``initialise`` installs pretrained parts (see :meth:`RecommenderTrainer._build`); ``corruption``
    (``compose(...).corruption``) damages the item content the model is built from, and is recorded in the run.
    """
    trainer = RecommenderTrainer(dataset, model_name, dataset_dir=dataset_dir, model_config=model_config,
                                 config=train_config, initialise=initialise, callbacks=callbacks,
                                 corruption=corruption)  # fmt: skip
    best = trainer.fit()
    run_dir = trainer.write_run(runs_root, tag) if runs_root is not None and trainer.rank == 0 else None
    return TrainResult(run_dir=run_dir, best_epoch=best.epoch, valid=best.valid, test=best.test,
                       model=trainer.recommender, stopped_by=trainer.stopped_by)  # fmt: skip
