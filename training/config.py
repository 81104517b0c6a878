"""One way to configure a run: ``compose(dataset, model, overrides)`` → frozen configs.

Layers, the later wins:

1. the dataclass defaults: :class:`TrainConfig` here, each model's config dataclass in ``models/``;
2. ``presets.toml``: ``[defaults.train]``, ``[defaults.<model>]``, ``[defaults.<model>.train]``, then the same three
   tables of the dataset (model settings there were chosen on VALIDATION by `mmrec tune`);
3. overrides: the command line's ``--set`` / ``--train``, a script's seeds, caps and grids, a test's values.

A run may also be trained on deliberately damaged item content (:class:`CorruptionConfig`, the command line's
``--corrupt``; the corruption benchmark, docs/modality-quality.md). It has no preset layer: clean unless asked.

Every key of every layer is checked against its dataclass and every value coerced to its field's type; a mistake
raises :class:`~models.config.ConfigError` with one line that names the key and the valid ones. `mmrec config MODEL`
prints the keys with their defaults and preset values (:func:`describe`). Importing this module does not import
torch: ``models`` (whose package imports torch) is imported only when a config is built.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS_FILE = Path(__file__).with_name("presets.toml")

# The model registry's names (models.MODELS, which imports torch), for help texts; a test keeps the two equal.
# The raw sources of training/data/sources.py (SOURCES); "<source>-seq" is a source with the leave-one-out split.
SOURCE_NAMES = ("ml100k-posters", "ml100k", "lfm2k", "amazon-baby", "amazon-scientific")
MODEL_NAMES = ("popularity", "bpr", "lightgcn", "vbpr", "sasrec", "mp4sr", "mmmlp", "qarm", "mmgcn", "lattice",
               "freedom", "r2mr", "mmgcl", "mario", "promptmm", "mkgat", "mcln", "tmfun", "pamd")  # fmt: skip

DEFAULT_TOPK = (5, 10, 20, 50)


@dataclass(frozen=True)
class TrainConfig:
    """The trainer's settings (training/fit/trainer.py). Runs end by early stopping or the epoch cap."""

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
    # A wall-clock SAFETY cap on the epoch loop in minutes (0: none). Runs are meant to end by early stopping or
    # `epochs`, so that a seed gives the same model on any machine; a run that hits this cap is reported as
    # stopped_by="safety_cap" in metrics.json and on the command line.
    max_minutes: float = 0.0
    sequence_length: int = 50  # history length for sequence models
    sequence_stride: int = 1  # sequence models: every prefix is an example (1), or every k-th; 0: k = history length
    mask_history: bool = True  # mask the user's earlier items when ranking (MMRec); False: RecBole's sequential protocol
    init_from: str = ""  # a run directory whose checkpoint initialises the model (pre-training → fine-tuning)
    eval_batch_users: int = 4096
    progress: bool = True


CORRUPTION_KINDS = ("none", "missing", "swapped", "noise")


@dataclass(frozen=True)
class CorruptionConfig:
    """How a run's item content is damaged before the model is built (training/data/corruption.py).

    ``fraction`` of the items that have any content get ONE of their present modalities (a seeded uniform choice)
    damaged: ``missing`` (mask off), ``swapped`` (another item's feature of that modality), ``noise`` (a draw from
    the modality's mean and covariance). Interactions and splits are never touched. ``kind = "none"`` (the default,
    with fraction 0) is the dataset's content as it is.
    """

    kind: str = "none"
    fraction: float = 0.0
    seed: int = 0  # seeds the damaged items, the damaged modality and the replacement (independent of training)

    def __post_init__(self) -> None:
        from models.config import ConfigError

        if self.kind not in CORRUPTION_KINDS:
            raise ConfigError(f"kind={self.kind!r}: expected one of {', '.join(CORRUPTION_KINDS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"fraction={self.fraction}: expected a share in [0, 1]")
        if (self.kind == "none") != (self.fraction == 0.0):
            raise ConfigError(f"kind={self.kind} with fraction={self.fraction}: a clean run is kind=none with "
                              "fraction 0 (leave --corrupt out); a corrupted one needs both")  # fmt: skip

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def label(self) -> str:
        """A run directory suffix: ``swapped-p40-c2024`` (kind, percent of items, corruption seed)."""
        return f"{self.kind}-p{round(self.fraction * 100)}-c{self.seed}" if self.active else ""


@dataclass(frozen=True)
class Overrides:
    """Settings that win over the presets: ``model`` for the model's config, ``train`` for :class:`TrainConfig`,
    ``corruption`` for :class:`CorruptionConfig`."""

    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    corruption: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_assignments(cls, model: Sequence[str] = (), train: Sequence[str] = (),
                         corruption: Sequence[str] = ()) -> Overrides:  # fmt: skip
        """From the command line's ``KEY=VALUE`` strings (``--set``, ``--train`` and ``--corrupt``)."""
        return cls(model=parse_assignments(model, option="--set"), train=parse_assignments(train, option="--train"),
                   corruption=parse_assignments(corruption, option="--corrupt"))  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything that configures one training run, composed once."""

    dataset: str
    model: str
    model_config: Any  # the model's frozen config dataclass (models/<model>.py)
    train: TrainConfig
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)

    def model_settings(self) -> dict[str, Any]:
        from models.config import config_to_dict

        return config_to_dict(self.model_config)


def parse_assignments(pairs: Sequence[str], *, option: str = "--set") -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}``; a pair without ``=`` raises :class:`ConfigError`."""
    from models.config import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def model_config_class(model: str) -> type[Any]:
    """The config dataclass of a registered model; an unknown name raises :class:`ConfigError`."""
    from models.config import ConfigError

    if model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(sorted(MODEL_NAMES))}")
    from models import model_spec

    config_class: type[Any] = model_spec(model).config_class
    return config_class


def preset(dataset: str, model: str, *, path: Path = PRESETS_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, trainer settings) for ``model`` on ``dataset`` from ``presets.toml``, defaults first."""
    return _merged(_preset_layers(dataset, model, path=path))


def train_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """``TrainConfig`` defaults overridden by each layer in turn (a thin path kept for callers of phase 1)."""
    from models.config import build_config

    return build_config(TrainConfig, *layers)


def compose(dataset: str, model: str, overrides: Overrides | None = None, *,
            presets: Path = PRESETS_FILE) -> RunConfig:  # fmt: skip
    """The frozen configs of ``model`` on ``dataset``: defaults → ``presets`` → ``overrides``."""
    overrides = overrides or Overrides()
    config_class = model_config_class(model)
    layers = _preset_layers(dataset, model, path=presets)
    model_layers: list[tuple[str, Mapping[str, Any]]] = [
        (f"{presets.name} {source}", layer) for source, kind, layer in layers if kind == "model"]
    train_layers: list[tuple[str, Mapping[str, Any]]] = [
        (f"{presets.name} {source}", layer) for source, kind, layer in layers if kind == "train"]
    model_layers.append(("--set", overrides.model))
    train_layers.append(("--train", overrides.train))
    corruption = _checked(CorruptionConfig, [("--corrupt", overrides.corruption)], model, "corruption")
    if corruption.active and not reads_content(model):
        from models.config import ConfigError

        raise ConfigError(f"--corrupt: {model} reads no item content, so damaging it changes nothing; train it clean")
    return RunConfig(dataset=dataset, model=model, model_config=_checked(config_class, model_layers, model, "model"),
                     train=_checked(TrainConfig, train_layers, model, "trainer"), corruption=corruption)  # fmt: skip


def reads_content(model: str) -> bool:
    """Whether ``model`` is built from item content (its spec needs modalities): the models a corruption applies to."""
    from models import model_spec

    return bool(model_spec(model).needs_modalities)


@dataclass(frozen=True)
class Setting:
    """One row of `mmrec config`: a key, its dataclass default, and the value after the presets."""

    scope: str  # "model" or "train"
    key: str
    default: Any
    value: Any
    note: str  # where ``value`` comes from: "default" or the presets table that sets it


def describe(model: str, dataset: str | None = None, *, presets: Path = PRESETS_FILE) -> list[Setting]:
    """Every key of ``model``'s config and of :class:`TrainConfig`, with the defaults and (for ``dataset``, or the
    ``[defaults]`` tables when None) the preset values that :func:`compose` starts from."""
    from models.config import config_to_dict

    config_class = model_config_class(model)
    run = compose(dataset or "defaults", model, presets=presets)
    sources = {(kind, key): source for source, kind, layer in _preset_layers(dataset or "defaults", model,
                                                                             path=presets) for key in layer}  # fmt: skip
    rows = []
    for scope, cls, config in (("model", config_class, run.model_config), ("train", TrainConfig, run.train)):
        defaults = config_to_dict(cls())
        for key, value in config_to_dict(config).items():
            rows.append(Setting(scope, key, defaults[key], value, sources.get((scope, key), "default")))
    return rows


def _checked(cls: type[Any], layers: Sequence[tuple[str, Mapping[str, Any]]], model: str, kind: str) -> Any:
    """``cls`` built from ``layers``; a mistake names the layer (presets table or option) it came from."""
    from models.config import ConfigError, build_config

    names = [f.name for f in dataclasses.fields(cls)]
    for source, layer in layers:
        unknown = sorted(set(layer) - set(names))
        if unknown:
            hint = "" if cls is CorruptionConfig else f" (`mmrec config {model}` lists them with defaults)"
            raise ConfigError(f"{source}: {model} has no {kind} setting {unknown[0]!r}; valid: {', '.join(names)}{hint}")
        try:
            build_config(cls, layer)  # each layer's values coerced on their own: a bad value names its layer
        except ConfigError as exc:
            raise ConfigError(f"{source}: {model} {kind} setting {exc}") from exc
    return build_config(cls, *(layer for _, layer in layers))


def _preset_layers(dataset: str, model: str, *, path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """[(presets table, "model" or "train", its settings)]: the ``defaults`` scope first, then the dataset's."""
    table = tomllib.loads(path.read_text()) if path.exists() else {}
    layers: list[tuple[str, str, dict[str, Any]]] = []
    for scope in dict.fromkeys(("defaults", dataset)):
        section = table.get(scope, {})
        model_section = dict(section.get(model, {}))
        model_train = model_section.pop("train", {})
        layers += [(f"[{scope}.train]", "train", dict(section.get("train", {}))),
                   (f"[{scope}.{model}]", "model", model_section),
                   (f"[{scope}.{model}.train]", "train", dict(model_train))]  # fmt: skip
    return [layer for layer in layers if layer[2]]


def _merged(layers: list[tuple[str, str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_layer: dict[str, Any] = {}
    train_layer: dict[str, Any] = {}
    for _, kind, layer in layers:
        (model_layer if kind == "model" else train_layer).update(layer)
    return model_layer, train_layer
