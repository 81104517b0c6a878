"""service.settings.ServiceSettings: MMREC_* environment, validation at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import ServiceSettings


def test_settings_read_mmrec_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMREC_BUNDLE_DIR", str(tmp_path / "bundle"))
    monkeypatch.setenv("MMREC_REDIS_URL", "redis://example:6379/2")
    monkeypatch.setenv("MMREC_MAX_K", "50")
    monkeypatch.setenv("MMREC_API_KEY", "s3cret-of-16-chars")
    settings = ServiceSettings()
    assert settings.bundle_dir == tmp_path / "bundle" and settings.redis_url == "redis://example:6379/2"
    assert settings.max_k == 50 and settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-of-16-chars"
    assert "s3cret" not in repr(settings)


def test_settings_treat_empty_variables_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMREC_API_KEY", "")  # what compose passes for ${MMREC_API_KEY:-}
    monkeypatch.setenv("MMREC_REDIS_URL", "")
    settings = ServiceSettings(bundle_dir=tmp_path)
    assert settings.api_key is None and settings.redis_url is None and settings.embedded


def test_settings_default_state_dir_sits_next_to_the_bundle(tmp_path: Path) -> None:
    assert ServiceSettings(bundle_dir=tmp_path / "bundles" / "current").resolved_state_dir == tmp_path / "bundles" / "state"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_url": "localhost:6379"}, "redis_url must start with redis://, rediss:// or unix://"),
        ({"default_k": 20, "max_k": 10}, "default_k (20) exceeds max_k (10)"),
        ({"api_key": "changeme"}, "api_key is a placeholder"),
        ({"device": "tpu"}, "Input should be 'auto', 'cpu' or 'cuda'"),
        ({"max_k": 0}, "greater than or equal to 1"),
        ({"unknown_option": 1}, "Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_invalid_values(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServiceSettings(bundle_dir=tmp_path, **overrides)
