"""Typed model and training configs: build a frozen dataclass from layered overrides, failing loudly on typos."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a config."""


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, options[0])
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: expected one of {allowed}")
        return value
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation)
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(name, v, item_type) for v in items)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"{name}={value!r}: expected true or false")
            return value.lower() in ("true", "1")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if annotation in (int, float) and isinstance(value, bool):
        # bool is an int subclass: without this, `epochs = true` in a TOML preset would silently become 1
        raise ConfigError(f"{name}={value!r}: expected {annotation.__name__}")
    if annotation in (int, float, str):
        try:
            coerced = annotation(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}={value!r}: expected {annotation.__name__}") from exc
        if annotation is int and isinstance(value, float) and coerced != value:
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return coerced
    return value


def build_config(cls: type[T], *layers: Mapping[str, Any]) -> T:
    """Defaults of ``cls`` overridden by each mapping in turn (defaults → dataset → command line)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise ConfigError(f"{cls.__name__} has no setting {key!r}; valid settings: {sorted(names)}")
            values[key] = _coerce(key, value, hints[key])
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
