"""Typed configs: layered overrides, string coercion from the command line, loud failures; per-dataset presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.bpr_mf import BPRMFConfig
from models.config import ConfigError, build_config, config_to_dict
from models.lightgcn import LightGCNConfig
from training.config import Overrides, TrainConfig, compose, preset


@dataclass(frozen=True)
class Example:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    label: str = "x"
    ks: tuple[int, ...] = (5, 10)
    limit: int | None = None
    scale: Optional[float] = None  # noqa: UP045 — typing.Optional must coerce like `float | None`
    mode: Literal["a", "b"] = "a"


def test_build_config_without_layers_gives_defaults() -> None:
    assert build_config(Example) == Example()


@pytest.mark.parametrize("position", [0, 1], ids=["first-layer", "last-layer"])
def test_build_config_unknown_key_names_it_and_lists_valid_ones(position: int) -> None:
    layers: list[dict[str, Any]] = [{"count": 2}, {"rate": 0.1}]
    layers[position]["cuont"] = 3
    with pytest.raises(ConfigError) as info:
        build_config(Example, *layers)
    message = str(info.value)
    assert "'cuont'" in message
    assert "Example" in message
    for valid in ("count", "rate", "flag", "label", "ks", "limit", "scale", "mode"):
        assert f"'{valid}'" in message


def test_build_config_unknown_key_on_a_model_config() -> None:
    with pytest.raises(ConfigError, match=r"LightGCNConfig has no setting 'n_layer'.*'n_layers'"):
        build_config(LightGCNConfig, {"n_layer": "3"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("count", "3", 3),
        ("count", 2.0, 2),  # TOML writes 2.0 for some users; a whole float is an int
        ("count", 4, 4),
        ("rate", "1e-3", 1e-3),
        ("rate", "2", 2.0),
        ("rate", 3, 3.0),
        ("flag", "true", True),
        ("flag", "TRUE", True),
        ("flag", "1", True),
        ("flag", "false", False),
        ("flag", "0", False),
        ("flag", True, True),
        ("flag", 0, False),
        ("label", "hello", "hello"),
        ("ks", "5,20", (5, 20)),
        ("ks", "50", (50,)),
        ("ks", [1, 2, 3], (1, 2, 3)),  # a TOML list
        ("limit", "7", 7),
        ("limit", "none", None),
        ("limit", "None", None),
        ("limit", "null", None),
        ("limit", None, None),
        ("scale", "0.25", 0.25),
        ("scale", "none", None),
        ("mode", "b", "b"),
    ],
)
def test_build_config_coerces_values(key: str, value: Any, expected: Any) -> None:
    config = build_config(Example, {key: value})
    assert getattr(config, key) == expected
    assert type(getattr(config, key)) is type(expected)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("count", "abc", "count='abc': expected int"),
        ("count", "2.5", "count='2.5': expected int"),
        ("count", 2.5, "count=2.5: expected an integer"),
        ("rate", "fast", "rate='fast': expected float"),
        ("flag", "yes", "flag='yes': expected true or false"),
        ("ks", "5,x", "ks='x': expected int"),
        ("limit", "many", "limit='many': expected int"),
        ("mode", "c", "mode='c': expected one of"),
        ("count", True, "count=True: expected int"),  # a TOML boolean is not a number
        ("rate", False, "rate=False: expected float"),
        ("flag", 2, "flag=2: expected true or false"),
        ("flag", 0.5, "flag=0.5: expected true or false"),
    ],
)
def test_build_config_rejects_bad_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(Example, {key: value})
    assert message in str(info.value)


def test_build_config_later_layer_wins() -> None:
    defaults = {"count": 2, "rate": 0.1, "flag": "true"}
    dataset = {"count": "3", "ks": "1,2"}
    command_line = {"count": "4"}
    config = build_config(Example, defaults, dataset, command_line)
    assert config == Example(count=4, rate=0.1, flag=True, ks=(1, 2))


@settings(max_examples=50, deadline=None, database=None)
@given(layers=st.lists(st.dictionaries(st.sampled_from(["count", "rate"]), st.integers(-100, 100)), max_size=5))
def test_build_config_layering_equals_dict_update(layers: list[dict[str, int]]) -> None:
    merged: dict[str, int] = {}
    for layer in layers:
        merged.update(layer)
    config = build_config(Example, *layers)
    assert config.count == merged.get("count", 1)
    assert config.rate == float(merged.get("rate", 0.5))


def test_build_config_on_train_config_from_command_line_strings() -> None:
    config = build_config(TrainConfig, {"epochs": 1000}, {"epochs": "5", "topk": "10,20", "progress": "false"})
    assert (config.epochs, config.topk, config.progress) == (5, (10, 20), False)


def test_config_to_dict_turns_tuples_into_lists() -> None:
    assert config_to_dict(Example(ks=(1, 2))) == {
        "count": 1, "rate": 0.5, "flag": False, "label": "x", "ks": [1, 2], "limit": None, "scale": None, "mode": "a",
    }  # fmt: skip


def test_config_to_dict_round_trips_through_build_config() -> None:
    config = build_config(BPRMFConfig, {"embedding_size": "16", "reg_weight": "0.01"})
    assert build_config(BPRMFConfig, config_to_dict(config)) == config


# ------------------------------------------------------------------------------------------------ presets
PRESETS_TOML = """
[defaults.train]
epochs = 1000
patience = 20

[defaults.bpr]
reg_weight = 0.001

[small.train]
epochs = 50

[small.bpr]
embedding_size = 32

[small.lightgcn]
n_layers = 3

[other.bpr]
embedding_size = 999
"""


@pytest.mark.parametrize(
    ("dataset", "model", "expected_model", "expected_train"),
    [
        ("small", "bpr", {"reg_weight": 0.001, "embedding_size": 32}, {"epochs": 50, "patience": 20}),
        ("small", "lightgcn", {"n_layers": 3}, {"epochs": 50, "patience": 20}),
        ("unknown", "bpr", {"reg_weight": 0.001}, {"epochs": 1000, "patience": 20}),  # defaults only
        ("small", "vbpr", {}, {"epochs": 50, "patience": 20}),
    ],
)
def test_preset_layers_defaults_then_dataset(
    tmp_path: Path, dataset: str, model: str, expected_model: dict[str, Any], expected_train: dict[str, Any]
) -> None:
    path = tmp_path / "presets.toml"
    path.write_text(PRESETS_TOML)
    assert preset(dataset, model, path=path) == (expected_model, expected_train)


def test_preset_feeds_build_config_and_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    path.write_text(PRESETS_TOML)
    model_layer, train_layer = preset("small", "bpr", path=path)
    assert build_config(BPRMFConfig, model_layer, {"embedding_size": "8"}) == BPRMFConfig(
        embedding_size=8, reg_weight=0.001
    )
    assert build_config(TrainConfig, train_layer).epochs == 50


def test_preset_missing_file_gives_empty_layers(tmp_path: Path) -> None:
    assert preset("small", "bpr", path=tmp_path / "absent.toml") == ({}, {})


# ------------------------------------------------------------------------------------------------ compose
COMPOSE_TOML = """
[defaults.train]
epochs = 1000

[defaults.lightgcn.train]
learning_rate = 0.01

[small.train]
epochs = 50

[small.lightgcn]
n_layers = 3

[small.lightgcn.train]
batch_size = 64
"""


def test_compose_layers_defaults_presets_then_overrides(tmp_path: Path) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text(COMPOSE_TOML)
    run = compose("small", "lightgcn", Overrides(model={"reg_weight": "1e-3"}, train={"epochs": "7"}), presets=presets)
    assert run.model_config == LightGCNConfig(n_layers=3, reg_weight=1e-3)
    assert run.train == TrainConfig(epochs=7, learning_rate=0.01, batch_size=64)
    assert compose("other", "lightgcn", presets=presets).train == TrainConfig(learning_rate=0.01)
    assert compose("small", "bpr", presets=presets).train == TrainConfig(epochs=50)  # lightgcn's tables stay out
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.epochs = 3  # type: ignore[misc]


def test_compose_the_shipped_presets_give_the_tuned_points() -> None:
    run = compose("ml100k-posters", "r2mr")
    assert (run.model_config.feature_dim, run.train.batch_size, run.train.learning_rate) == (128, 4096, 2e-3)
    assert compose("lfm2k", "r2mr").train.batch_size == 2048
    assert (compose("lfm2k", "lattice").train.lr_decay, compose("lfm2k", "lightgcn").train.lr_decay) == (0.96, 1.0)


def test_compose_overrides_from_command_line_assignments() -> None:
    overrides = Overrides.from_assignments(["n_layers=3"], ["epochs=5", "topk=10,20"])
    run = compose("lfm2k", "lightgcn", overrides)
    assert (run.model_config.n_layers, run.train.epochs, run.train.topk) == (3, 5, (10, 20))


@pytest.mark.parametrize(("model", "overrides", "message"), [
    ("nope", Overrides(), "unknown model 'nope'; valid models: bpr, freedom"),
    ("bpr", Overrides(model={"n_layers": 2}), "--set: bpr has no model setting 'n_layers'; valid: "),
    ("bpr", Overrides(train={"epochs": "many"}), "--train: bpr trainer setting epochs='many': expected int"),
])  # fmt: skip
def test_compose_refuses_with_one_clear_message(model: str, overrides: Overrides, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("lfm2k", model, overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
