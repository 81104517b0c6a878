"""Layered settings: model defaults (the dataclasses) → per-dataset presets (``presets.toml``) → command line.

``presets.toml`` holds, per dataset, trainer settings and the model settings chosen on VALIDATION by `mmrec tune`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import build_config

if TYPE_CHECKING:
    from training.fit.trainer import TrainConfig

PRESETS_FILE = Path(__file__).with_name("presets.toml")


def preset(dataset: str, model: str, *, path: Path = PRESETS_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, trainer settings) for ``model`` on ``dataset``: the ``defaults`` tables, then the dataset's."""
    table = tomllib.loads(path.read_text()) if path.exists() else {}
    model_layer: dict[str, Any] = {}
    train_layer: dict[str, Any] = {}
    for scope in ("defaults", dataset):
        section = table.get(scope, {})
        train_layer.update(section.get("train", {}))
        model_layer.update(section.get(model, {}))
    return model_layer, train_layer


def train_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """The trainer's settings: ``TrainConfig`` defaults overridden by each layer in turn (preset, command line)."""
    from training.fit.trainer import TrainConfig

    return build_config(TrainConfig, *layers)
