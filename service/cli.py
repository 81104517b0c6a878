"""``mmrec-serve``: serve a bundle over HTTP.

    mmrec-serve --bundle var/bundles/current --port 8000 [--redis-url redis://127.0.0.1:6379/0]

Every option can also come from an ``MMREC_*`` environment variable (see ``service/settings.py``); options given
on the command line win. Secrets (API keys, a Redis URL with a password) belong in the environment or in files
(``MMREC_API_KEY_FILE``, ``MMREC_API_KEYS_FILE``, ``MMREC_REDIS_URL_FILE``: Docker secrets), not on the command line,
where every user of the machine can read them (``ps``, ``/proc/<pid>/cmdline``): given there, they work but are
warned about. At start-up it prints where it serves, an example request, the chosen device and who may do what; it
refuses (exit 2) to listen on a non-loopback address without API keys unless ``--allow-open-writes`` is given.
Credentials are redacted from every log line (Redis passwords, ``?api_key=``-like query parameters).
``--workers N`` (Redis mode only) serves the port from N processes, each a replica of the catalogue (service/README.md,
"Several processes"); it exits 3, as one process does, when they cannot start.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

import bundle_format as bf
from service.app import create_app
from service.redaction import RedactSecrets, redact_url
from service.runtime import Runtime
from service.settings import MIN_KEY_LENGTH, SCOPES, ServiceSettings

EPILOG = f"""\
secrets: give API keys and a Redis URL holding a password through the environment or files, not options:
  MMREC_API_KEY / MMREC_API_KEY_FILE     one key with every scope (at least {MIN_KEY_LENGTH} characters)
  MMREC_API_KEYS / MMREC_API_KEYS_FILE   named keys with scopes, JSON:
                                         [{{"name": "ingest", "key": "...", "scopes": ["write"]}}, ...]
  MMREC_REDIS_URL / MMREC_REDIS_URL_FILE redis://:password@host:6379/0
A *_FILE variable names a file holding the value (e.g. a Docker secret in /run/secrets/). Options on the command
line are visible to every user of the machine in the process list; --api-key and a --redis-url with a password
still work there, with a warning. Every other setting but --host and --port is an MMREC_* variable too
(--log-level, --access-log: MMREC_SERVE_LOG_LEVEL, MMREC_SERVE_ACCESS_LOG; service/README.md).

access: once keys are configured, writes (items, events) need a key with the 'write' scope, deletes and reload
'admin', GET /v1/users/{{id}}/events 'read', and other reads 'read' when --read-access keyed (default: open).
Without keys, mmrec-serve only listens on a loopback address, unless --allow-open-writes.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrec-serve",
        description="Serve a model bundle over REST.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", dest="bundle_dir", help="bundle directory (env MMREC_BUNDLE_DIR)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", help="redis://host:port/db; omitted: embedded cache and SQLite state "
                        "(a password here is visible in the process list: prefer MMREC_REDIS_URL(_FILE))")  # fmt: skip
    parser.add_argument("--redis-url-file", help="a file holding the Redis URL (env MMREC_REDIS_URL_FILE)")
    parser.add_argument("--redis-prefix", help="prefix of every Redis key (default mmrec)")
    parser.add_argument("--state-dir", help="embedded mode: where ingested items and events are stored")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--api-key", help="one key with every scope (visible in the process list: prefer "
                        "MMREC_API_KEY or --api-key-file)")  # fmt: skip
    parser.add_argument("--api-key-file", help="a file holding the key (env MMREC_API_KEY_FILE)")
    parser.add_argument("--api-keys-file", help="a JSON file of named keys with scopes (env MMREC_API_KEYS_FILE)")
    parser.add_argument("--read-access", choices=["open", "keyed"], help="reads other than a user's events: open "
                        "(default) or keyed (need the read scope)")  # fmt: skip
    parser.add_argument("--allow-open-writes", action="store_const", const=True, default=None,
                        help="serve on a non-loopback address without API keys (anyone who reaches it may write)")  # fmt: skip
    parser.add_argument("--forwarded-allow-ips", help="proxies trusted to name the client in X-Forwarded-For "
                        "(default 127.0.0.1,::1)")  # fmt: skip
    parser.add_argument("--max-k", type=int)
    parser.add_argument("--cache-ttl-s", type=float)
    parser.add_argument("--workers", type=int, help="server processes on the port (env MMREC_WORKERS, default 1); "
                        "above 1 needs --redis-url: each process is a replica of the catalogue")  # fmt: skip
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS, help=f"default info (env {LOG_LEVEL_ENV})")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None,
                        help=f"uvicorn's line per request (default on; env {ACCESS_LOG_ENV}=false): behind a proxy "
                        "that logs requests, --no-access-log saves ~0.1 ms of CPU a request (service/README.md)")  # fmt: skip
    return parser


FIELDS = ("bundle_dir", "redis_url", "redis_url_file", "redis_prefix", "state_dir", "device", "api_key", "api_key_file",
          "api_keys_file", "read_access", "allow_open_writes", "forwarded_allow_ips", "max_k", "cache_ttl_s", "workers")  # fmt: skip
LOG_LEVEL_ENV = "MMREC_SERVE_LOG_LEVEL"  # the log level, read by each worker process (not a ServiceSettings field)
ACCESS_LOG_ENV = "MMREC_SERVE_ACCESS_LOG"  # true/false: uvicorn's access log (not a ServiceSettings field either)
HOST_ENV, PORT_ENV = "MMREC_SERVE_HOST", "MMREC_SERVE_PORT"  # where the workers listen, for their banners
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
WORKER_APP = "service.cli:worker_app"  # what uvicorn imports in each worker process when workers > 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    for warning in _secrets_on_the_command_line(args):
        print(f"mmrec-serve: warning: {warning}", file=sys.stderr)
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"mmrec-serve: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # an MMREC_* variable that is not valid JSON (MMREC_API_KEYS); names no value
        print(f"mmrec-serve: {exc} (expected JSON)", file=sys.stderr)
        return 2
    if not (settings.bundle_dir / bf.MANIFEST).is_file():
        print(f"mmrec-serve: {settings.bundle_dir} is not a bundle (no {bf.MANIFEST}); export one with `mmrec export`", file=sys.stderr)
        return 2
    if not settings.keys and not settings.allow_open_writes and not is_loopback(args.host):
        print(
            f"mmrec-serve: refusing to listen on {args.host} without API keys (anyone reaching it could write and "
            "delete): set MMREC_API_KEY or MMREC_API_KEY_FILE (or MMREC_API_KEYS), or pass --allow-open-writes",
            file=sys.stderr,
        )
        return 2
    log_level = (args.log_level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if log_level not in LOG_LEVELS:
        print(f"mmrec-serve: {LOG_LEVEL_ENV}: {log_level!r} is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    access_log = args.access_log
    if access_log is None:
        access_log = _boolean(os.environ.get(ACCESS_LOG_ENV, "true"))
        if access_log is None:
            print(f"mmrec-serve: {ACCESS_LOG_ENV}: {os.environ[ACCESS_LOG_ENV]!r} is not true or false", file=sys.stderr)
            return 2
    serving = {"host": args.host, "port": args.port, "log_level": log_level, "log_config": redacting_log_config(),
               "access_log": access_log, "proxy_headers": True,
               "forwarded_allow_ips": settings.forwarded_allow_ips}  # fmt: skip
    if settings.workers > 1:
        # Each worker is a fresh interpreter (spawned by uvicorn's supervisor) that builds its settings from the
        # environment, so the options given here travel there as the MMREC_* variables they stand for.
        os.environ.update(worker_environment(overrides, host=args.host, port=args.port, log_level=log_level))
        print(f"mmrec-serve: starting {settings.workers} worker processes on {args.host}:{args.port} (Redis mode: "
              "each one a replica of the catalogue); each prints its banner when ready", flush=True)  # fmt: skip
        return run_workers(uvicorn.Config(WORKER_APP, factory=True, workers=settings.workers, **serving))
    configure_logging(log_level)
    uvicorn.run(create_app(settings, on_ready=lambda runtime: print(banner(runtime, host=args.host, port=args.port), flush=True)),
                **serving)  # fmt: skip
    return 0


def _boolean(text: str) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case); None for anything else."""
    value = text.strip().lower()
    return True if value in ("true", "1", "yes", "on") else False if value in ("false", "0", "no", "off") else None


def run_workers(config: uvicorn.Config) -> int:
    """uvicorn's multi-process supervisor until it stops; 3 (uvicorn's start-up failure code, as the single-process
    path exits) when it stopped because a worker could not start (``uvicorn.run`` would exit 0 then)."""
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


def worker_environment(overrides: dict[str, Any], *, host: str, port: int, log_level: str) -> dict[str, str]:
    """The ``MMREC_*`` variables that give a worker process the settings of this command line."""
    env = {f"MMREC_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for name, value in overrides.items()}  # fmt: skip
    env.update({LOG_LEVEL_ENV: log_level, HOST_ENV: host, PORT_ENV: str(port)})
    return env


def worker_app() -> FastAPI:
    """The app of one worker process (``--workers`` above 1): settings from the environment the parent set."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    host, port = os.environ.get(HOST_ENV, "127.0.0.1"), int(os.environ.get(PORT_ENV, "8000"))
    settings = ServiceSettings()  # type: ignore[call-arg]  # bundle_dir comes from MMREC_BUNDLE_DIR
    label = f"mmrec-serve worker {os.getpid()}"
    return create_app(settings, on_ready=lambda runtime: print(banner(runtime, host=host, port=port, label=label), flush=True))


def configure_logging(log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())


def _secrets_on_the_command_line(args: argparse.Namespace) -> list[str]:
    warnings = []
    if args.api_key is not None:
        warnings.append("--api-key is visible to every user of this machine (ps, /proc/<pid>/cmdline); "
                        "prefer MMREC_API_KEY or --api-key-file")  # fmt: skip
    if args.redis_url is not None and redact_url(args.redis_url) != args.redis_url:
        warnings.append("the password in --redis-url is visible to every user of this machine (ps, "
                        "/proc/<pid>/cmdline); prefer MMREC_REDIS_URL or --redis-url-file")  # fmt: skip
    return warnings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def redacting_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactSecrets` on its handlers (access log included)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_secrets")
    return config


def banner(runtime: Runtime, *, host: str, port: int, label: str = "mmrec-serve") -> str:
    engine, plan, settings = runtime.engine, runtime.plan, runtime.settings
    bundle = engine.bundle
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    user = bundle.user_ids[0] if bundle.user_ids else "any-user-id"
    backend = (
        f"redis at {runtime.pool.safe_url if runtime.pool else ''} (prefix {settings.redis_prefix!r})"
        if settings.redis_url
        else f"embedded (in-process cache, state in {settings.resolved_state_dir})"
    )
    return "\n".join(
        [
            f"{label}: bundle {bundle.version} (model {bundle.model_name}, dataset {bundle.dataset_name}, "
            f"{engine.catalogue.size} items, dim {bundle.dim}, index {bundle.index_type})",
            f"  device: {plan.device}; onnxruntime providers: {', '.join(plan.ort_providers)}; "
            f"faiss on GPU: {'yes' if bundle.index_on_gpu else 'no'}",
            f"  cache and state: {backend}",
            f"  {access_line(settings)}",
            f"  rate limits: {rate_limit_line(settings)}",
            f"  listening on {url}  (API docs: {url}/docs)",
            f"  try: curl '{url}/v1/users/{user}/recommendations?k=10'",
        ]
    )


def access_line(settings: ServiceSettings) -> str:
    """Who may do what, naming the keys (never their secrets)."""
    if not settings.keys:
        return "writes: open (no api key configured)"
    keys = ", ".join(f"{k.name} [{' '.join(s for s in SCOPES if s in k.scopes)}]" for k in settings.keys)
    reads = "open" if settings.read_access == "open" else "need the read scope"
    return f"writes: need the X-API-Key header (keys: {keys}); reads: {reads}; a user's events: need the read scope"


def rate_limit_line(settings: ServiceSettings) -> str:
    if not settings.rate_limit_enabled:
        return "off"
    where = "shared through redis" if settings.redis_url else "in process memory"
    return (
        f"{settings.rate_limit_per_client} per client address without a key, {settings.rate_limit_per_key} per key, "
        f"{settings.rate_limit_auth_failures} failed authentications per client address ({settings.rate_limit_strategy}, {where})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
