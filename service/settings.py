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

    # --- catalogue changes across replicas, cache staleness, search batching and threads (service core) ---
    changes_stream_max_len: int = Field(
        default=100_000, ge=100, description="Redis mode: entries kept in the changes stream (approximate trim); a "
        "replica away for longer than that many changes reloads the whole store when it comes back.")  # fmt: skip
    follower_block_ms: int = Field(default=1000, ge=10, le=60_000, description="Redis mode: how long one blocking "
                                   "read of the changes stream waits (the stop signal is seen within this).")  # fmt: skip
    write_visibility_timeout_s: float = Field(
        default=2.0, gt=0, description="Redis mode: a write waits at most this long for this replica to apply its own "
        "change before answering (it is durable either way).")  # fmt: skip
    reload_timeout_s: float = Field(default=120.0, gt=0, description="Redis mode: how long POST /v1/admin/reload waits "
                                    "for this replica to load the new bundle.")  # fmt: skip
    cache_new_item_staleness_s: float = Field(
        default=10.0, ge=0, description="A cached list computed before the latest ingestion is still served for this "
        "many seconds (so steady ingestion does not empty the cache); new items reach cached lists within it. Deleted "
        "items are never served: a cached list naming one is recomputed.")  # fmt: skip
    batch_max_wait_ms: float = Field(
        default=2.0, ge=0, le=100, description="Micro-batching: concurrent searches gathered for at most this long "
        "are answered by one FAISS call; 0 turns batching off.")  # fmt: skip
    batch_max_size: int = Field(default=64, ge=1, le=4096, description="Micro-batching: most searches in one batch.")
    faiss_threads: int = Field(
        default=1, ge=1, description="OpenMP threads of a FAISS search. 1: the event loop needs the other core, and "
        "OpenMP threads that spin-wait collapse when the cores are oversubscribed (a 2-thread batch measured 10-20x "
        "slower than a 1-thread one on a loaded 2-core machine).")  # fmt: skip
    faiss_blas_threshold: int = Field(
        default=16, ge=1, description="Batches of at least this many queries are scored by one BLAS matrix product "
        "(FAISS's distance_compute_blas_threshold, whose default 128000 never lets a micro-batch use BLAS).")  # fmt: skip

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
