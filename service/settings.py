"""Service configuration: one typed object, read from ``MMREC_*`` environment variables, validated at start-up.

Build it explicitly (``ServiceSettings(bundle_dir=...)``) in tests and the CLI; nothing reads it at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]


class ServiceSettings(BaseSettings):
    # env_ignore_empty: compose passes unset variables as "" (e.g. MMREC_API_KEY: ${MMREC_API_KEY:-}).
    model_config = SettingsConfigDict(env_prefix="MMREC_", frozen=True, extra="forbid", env_ignore_empty=True)

    bundle_dir: Path = Field(description="Directory holding manifest.json and the bundle files.")
    redis_url: str | None = Field(
        default=None,
        description="redis://host:port/db. None: embedded mode (in-process cache, SQLite state in state_dir).",
    )
    redis_prefix: str = Field(default="mmrec", min_length=1, max_length=64, description="Prefix of every Redis key.")
    state_dir: Path | None = Field(
        default=None,
        description="Embedded mode only: where ingested items and user events are stored "
        "(default: a 'state' directory next to bundle_dir, so it outlives bundle upgrades).",
    )
    device: Device = "auto"
    api_key: SecretStr | None = Field(default=None, description="Required in X-API-Key on writes; None: writes open.")
    cache_ttl_s: float = Field(default=300.0, gt=0)
    cache_max_entries: int = Field(default=50_000, ge=1, description="Embedded cache only: LRU bound.")
    default_k: int = Field(default=10, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(default=256, ge=1)
    history_length: int = Field(default=200, ge=1, description="Recent events kept per user (most recent last).")
    verify_hashes: bool = Field(default=True, description="Check every bundle file's sha256 against the manifest.")
    redis_timeout_s: float = Field(default=0.5, gt=0)
    redis_retry_after_s: float = Field(default=2.0, ge=0, description="After a Redis failure, skip Redis this long.")

    @field_validator("api_key")
    @classmethod
    def _refuse_placeholder_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Like full-stack-fastapi-template: a placeholder secret is worse than none, it looks protected.
        if value is not None and value.get_secret_value() in {"", "changethis", "changeme"}:
            raise ValueError("api_key is a placeholder; set a real secret or leave it unset")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_k(self) -> ServiceSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        return self

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.bundle_dir.resolve().parent / "state"

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    # --- limits: what one POST /v1/items may cost (service/encoding.py; the defaults and their measurements are in
    # service/README.md, "Limits"). Per-item limits answer 422, per-request totals 413; every message names its setting.
    max_text_chars: int = Field(
        default=20_000, ge=1, le=100_000,  # le: the request schema's own bound on a text
        description="Characters in one item's text (the text encoder reads its first max_length tokens only).",
    )
    max_request_text_chars: int = Field(
        default=500_000, ge=1, description="Characters of all texts of one request together (bounds tokenisation)."
    )
    max_request_tokens: int = Field(
        default=2048, ge=1,
        description="Tokens the text encoder runs on for one request, summed over its texts after truncation to the "
        "bundle's max_length (bounds the text encoder's time).",
    )
    max_image_side: int = Field(default=8192, ge=1, description="Longest side of an image, in pixels.")
    max_image_aspect_ratio: float = Field(
        default=20.0, ge=1.0, description="Longer side over shorter side of an image (a 1x10000 strip is refused)."
    )
    max_image_pixels: int = Field(
        default=25_000_000, ge=1, le=89_478_485,  # le: Pillow's Image.MAX_IMAGE_PIXELS, above which it warns or refuses
        description="Pixels of one image (width x height), checked from its header before decoding: bounds the "
        "decoded buffer (up to 4 bytes a pixel, plus an RGB copy).",
    )
    max_request_pixels: int = Field(
        default=50_000_000, ge=1, description="Pixels of all images of one request together (bounds decoding time)."
    )
    max_request_images: int = Field(
        default=16, ge=1, description="Images in one request (bounds the image encoder's time)."
    )
    encode_chunk_size: int = Field(
        default=4, ge=1,
        description="Images, or full-length texts, per onnxruntime run (shorter texts share a run up to the same "
        "number of tokens): a request is encoded chunk by chunk, so the encoders' working memory is bounded by this, "
        "not by the batch.",
    )
    max_concurrent_encodes: int = Field(
        default=1, ge=1,
        description="Requests encoding content at the same time; more wait their turn (each onnxruntime run already "
        "uses every core, so this bounds memory without costing throughput).",
    )
