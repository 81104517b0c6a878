"""Service configuration: one typed object, read from ``MMREC_*`` environment variables, validated at start-up.

Build it explicitly (``ServiceSettings(bundle_dir=...)``) in tests and the CLI; nothing reads it at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import limits
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.redaction import redact_url

Device = Literal["auto", "cpu", "cuda"]
Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
MIN_KEY_LENGTH = 16  # 16 random characters; `secrets.token_urlsafe(32)` gives 43
KEY_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
RateLimitStrategy = Literal["sliding-window-counter", "moving-window", "fixed-window"]
# Settings that can be read from a file instead (Docker secrets): the file's text, surrounding whitespace stripped.
RECENT_EVENTS_WEIGHT = 0.2  # chosen on validation by replay on ml100k-posters and lfm2k (docs/similarity-and-blending.md)
SECRET_FILES = {"api_key_file": "api_key", "api_keys_file": "api_keys", "redis_url_file": "redis_url"}


class ApiKey(BaseModel):
    """One named key: what a client sends in X-API-Key, and what it may do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="Names the key in 403 messages and rate limits (never the secret itself).")  # fmt: skip
    key: SecretStr = Field(description=f"The secret, at least {MIN_KEY_LENGTH} characters.")
    scopes: frozenset[Scope] = Field(min_length=1, description="read, write and/or admin.")

    @field_validator("key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        _check_key_length("key", value)
        return value


def _check_key_length(what: str, value: SecretStr) -> None:
    length = len(value.get_secret_value())
    if length < MIN_KEY_LENGTH:
        raise ValueError(f"{what} is too short ({length} characters): keys need at least {MIN_KEY_LENGTH}; {KEY_HINT}")


class ServiceSettings(BaseSettings):
    # env_ignore_empty: compose passes unset variables as "" (e.g. MMREC_API_KEY: ${MMREC_API_KEY:-}).
    model_config = SettingsConfigDict(env_prefix="MMREC_", frozen=True, extra="forbid", env_ignore_empty=True)

    bundle_dir: Path = Field(description="Directory holding manifest.json and the bundle files.")
    redis_url: str | None = Field(
        default=None,
        repr=False,  # may hold a password
        description="redis://host:port/db. None: embedded mode (in-process cache, SQLite state in state_dir).",
    )
    redis_prefix: str = Field(default="mmrec", min_length=1, max_length=64, description="Prefix of every Redis key.")
    state_dir: Path | None = Field(
        default=None,
        description="Embedded mode only: where ingested items and user events are stored "
        "(default: a 'state' directory next to bundle_dir, so it outlives bundle upgrades).",
    )
    device: Device = "auto"
    api_key: SecretStr | None = Field(
        default=None,
        description=f"One key with every scope (read, write, admin), at least {MIN_KEY_LENGTH} characters; "
        "None and no api_keys: everything open.",
    )
    cache_ttl_s: float = Field(default=300.0, gt=0)
    cache_max_entries: int = Field(default=50_000, ge=1, description="Embedded cache only: LRU bound.")
    default_k: int = Field(default=10, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(default=256, ge=1)
    history_length: int = Field(default=200, ge=1, description="Recent events kept per user (most recent last).")
    audit_max_limit: int = Field(default=500, ge=1, le=10_000, description="GET /v1/audit: most items one page may "
                                 "ask for (limit); a page without limit has min(50, audit_max_limit).")  # fmt: skip
    recent_events_weight: float = Field(
        default=RECENT_EVENTS_WEIGHT, ge=0, le=100, description="Known users of a bundle with user vectors: items are "
        "scored v_j . u/|u| + w * mean over their recorded events e of cos(v_e, v_j) (strategy user_vector_recent; "
        "service/blending.py); 0: events only filter seen items. The default was chosen on validation by replay on "
        "ml100k-posters and lfm2k (docs/similarity-and-blending.md).")  # fmt: skip
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
        "are answered by one FAISS call (the window closes early once every request in progress has joined); 0 turns "
        "batching off.")  # fmt: skip
    batch_max_size: int = Field(default=64, ge=1, le=4096, description="Micro-batching: most searches in one batch.")
    batch_granule: int = Field(
        default=16, ge=1, le=4096, description="Micro-batching: a batch of at least this many searches is cut to a "
        "multiple of it and the searches left over start the next batch (so batches are at most batch_max_size rounded "
        "down to a multiple of it; a granule above batch_max_size cuts nothing); 1: no cut. 16: onnxruntime's matrix product, "
        "which scans an exact index, packs the queries in panels of 16 columns, so at 1M x 64 a batch of 17 cost 59 ms "
        "against 43 for 16 (service/README.md).")  # fmt: skip
    batch_workers: int = Field(
        default=2, ge=1, le=64, description="Micro-batching: threads that gather and run batches; with 2, one "
        "gathers the next batch while the other searches, so searches can use two cores without OpenMP threads "
        "(+45% uncached at 1M on an otherwise idle 2-core host; 1 is better on a host whose cores other work takes). "
        "With micro-batching on and 2 or more workers, a batch over an exact index of at least 131,072 rows that is "
        "searched while no other batch is, is split by rows over a pool of this many further threads (a lone query "
        "at 1M answers in about half the time).")  # fmt: skip
    request_threads: int = Field(
        default=128, ge=1, le=4096, description="Threads for the request work that runs off the event loop (anyio's "
        "thread limiter; its default is 40): writes, scans of every item, encoder runs, and searches that wait on a "
        "thread (micro-batching off, diversified lists, POST /v1/recommendations with a history). A GET "
        "recommendations miss waits for its search batch on the event loop without one. When every miss held a "
        "thread, 128 served 356-381 against 286-287 req/s with 40 (1M items exact, c = 64; service/README.md).")  # fmt: skip
    faiss_threads: int = Field(
        default=1, ge=1, description="OpenMP threads of a FAISS search. 1: the event loop needs the other core, and "
        "OpenMP threads that spin-wait collapse when the cores are oversubscribed (a 2-thread batch measured 10-20x "
        "slower than a 1-thread one on a loaded 2-core machine).")  # fmt: skip
    workers: int = Field(
        default=1, ge=1, le=64, description="Server processes on the one port (uvicorn workers). Above 1 needs Redis "
        "mode: each process is a replica that follows the changes stream and shares the cache and rate limits through "
        "Redis, and the bundle's memory-mapped files through the page cache. Embedded mode keeps its catalogue, cache "
        "and SQLite writer in one process, so it serves with 1.")  # fmt: skip
    faiss_blas_threshold: int = Field(
        default=16, ge=1, description="Batches of at least this many queries are scored by one BLAS matrix product "
        "(FAISS's distance_compute_blas_threshold, whose default 128000 never lets a micro-batch use BLAS).")  # fmt: skip

    @field_validator("api_key")
    @classmethod
    def _refuse_placeholder_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Like full-stack-fastapi-template: a placeholder secret is worse than none, it looks protected.
        if value is not None and value.get_secret_value() in {"", "changethis", "changeme"}:
            raise ValueError("api_key is a placeholder; set a real secret or leave it unset")
        if value is not None:
            _check_key_length("api_key", value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {redact_url(value)!r}")
        return value

    @model_validator(mode="after")
    def _check_k(self) -> ServiceSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> ServiceSettings:
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(f"workers = {self.workers} needs redis_url: embedded mode keeps its catalogue, cache and "
                             "SQLite state in one process (serve with 1 worker, or give a Redis URL)")  # fmt: skip
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """``*_file`` settings (Docker secrets): the value of their twin setting, read from the file."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for file_field, field in SECRET_FILES.items():
            path = data.get(file_field)
            if path is None:
                continue
            if data.get(field) not in (None, (), []):
                raise ValueError(f"set {field} or {file_field}, not both")
            try:
                text = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{file_field}: cannot read {path} ({type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else exc})") from exc
            if not text:
                raise ValueError(f"{file_field}: {path} is empty")
            if field == "api_keys":
                try:
                    data[field] = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{file_field}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
            else:
                data[field] = text
        return data

    @model_validator(mode="after")
    def _check_keys(self) -> ServiceSettings:
        keys = self.keys
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"api key names must be unique, got {sorted(names)} (api_key is named 'api_key')")
        secrets_ = [k.key.get_secret_value() for k in keys]
        if len(set(secrets_)) != len(secrets_):
            raise ValueError("two api keys have the same secret: give every key its own")
        return self

    @field_validator("rate_limit_per_client", "rate_limit_per_key", "rate_limit_auth_failures")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        try:
            limits.parse_many(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate limit: write e.g. '600/minute' or '20/second; 600/minute'") from exc
        return value

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """Every configured key: ``api_key`` (named 'api_key', all scopes) and the named ``api_keys``."""
        legacy = () if self.api_key is None else (ApiKey(name="api_key", key=self.api_key, scopes=frozenset(SCOPES)),)
        return legacy + self.api_keys

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.bundle_dir.resolve().parent / "state"

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    # --- access: keys, scopes, secrets from files, rate limits (access helper) ---
    api_key_file: Path | None = Field(
        default=None,
        description="A file holding api_key (e.g. a Docker secret in /run/secrets/); instead of api_key.",
    )
    api_keys: tuple[ApiKey, ...] = Field(
        default=(),
        description='Named keys with scopes, as JSON: [{"name": "ingest", "key": "...", "scopes": ["write"]}]. '
        "Several keys with the same scopes allow rotation: add the new one, move clients, remove the old one.",
    )
    api_keys_file: Path | None = Field(default=None, description="A file holding api_keys (JSON); instead of api_keys.")
    redis_url_file: Path | None = Field(
        default=None, description="A file holding redis_url (it may carry the Redis password); instead of redis_url."
    )
    read_access: Literal["open", "keyed"] = Field(
        default="open",
        description="open: reads need no key; keyed: reads need a key with the read scope (once keys are configured). "
        "GET /v1/users/{id}/events (per-user data) needs the read scope whenever keys are configured.",
    )
    allow_open_writes: bool = Field(
        default=False,
        description="mmrec-serve refuses to listen on a non-loopback address without keys unless this is set.",
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1,::1",
        description="Proxies whose X-Forwarded-For names the client (uvicorn's forwarded_allow_ips): the per-client "
        "rate limits count that address. '*' trusts every peer: only where clients cannot reach the service directly.",
    )
    rate_limit_enabled: bool = Field(default=True, description="Apply the rate limits below.")
    rate_limit_strategy: RateLimitStrategy = Field(
        default="sliding-window-counter",
        description="The `limits` library's strategy for rate_limit_per_client and rate_limit_per_key: "
        "sliding-window-counter (two counters per client, smooth), moving-window (exact, one entry per request), "
        "fixed-window (one counter, bursts at window edges). rate_limit_auth_failures is always a moving window.",
    )
    rate_limit_per_client: str = Field(
        default="3000/minute",
        description="Requests without a valid key, per client address (limits notation: '50/second; 3000/minute').",
    )
    rate_limit_per_key: str = Field(default="30000/minute", description="Requests with a valid key, per key name.")
    rate_limit_auth_failures: str = Field(
        default="30/minute",
        description="Failed authentications (missing or unknown key where one is needed) per client address; past "
        "it, every request of that client that presents or needs a key answers 429 until the window frees up.",
    )
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
        description="Requests tokenising and decoding content at the same time (and, with encode_batch_max_wait_ms=0, "
        "encoding it); more wait their turn. Bounds the memory of decoded images.",
    )
    encode_batch_max_wait_ms: float = Field(
        default=2.0, ge=0, le=100,
        description="Micro-batching of ingestion: the text, image and item encoder runs of concurrent requests "
        "gathered for at most this long are one onnxruntime run per model (and the user tower's, at reads); 0 turns "
        "it off (every request runs its own).",
    )
    onnx_threads: int = Field(
        default=1, ge=0, le=256,
        description="Intra-op threads of each onnxruntime session (text, image, item encoders, user tower); 0: "
        "onnxruntime's default, one per physical core. 1: on 2 cores the text and image encoders run side by side "
        "on their own batcher threads, and a run's own threads would only compete with them.",
    )
    encode_batch_workers: int = Field(
        default=2, ge=1, le=64,
        description="Micro-batching of ingestion: batches of one model (text, image, item encoder) that run at once, "
        "each on onnx_threads threads; set to the cores the encoders may use.",
    )
    encode_batch_max_items: int = Field(
        default=32, ge=1, le=1024,
        description="Micro-batching of ingestion: most rows (texts, images, items) gathered into one batch; a batch "
        "still runs in chunks of encode_chunk_size.",
    )
