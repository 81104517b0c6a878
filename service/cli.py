"""``mmrec-serve``: serve a bundle over HTTP.

    mmrec-serve --bundle var/bundles/current --port 8000 [--redis-url redis://127.0.0.1:6379/0] [--api-key KEY]

Every option can also come from an ``MMREC_*`` environment variable (see ``service/settings.py``); options given
on the command line win. At start-up it prints where it serves, an example request, and the chosen device.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.runtime import Runtime
from service.settings import ServiceSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrec-serve", description="Serve a model bundle over REST.")
    parser.add_argument("--bundle", dest="bundle_dir", help="bundle directory (env MMREC_BUNDLE_DIR)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", help="redis://host:port/db; omitted: embedded cache and SQLite state")
    parser.add_argument("--redis-prefix", help="prefix of every Redis key (default mmrec)")
    parser.add_argument("--state-dir", help="embedded mode: where ingested items and events are stored")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--api-key", help="required in X-API-Key on writes (env MMREC_API_KEY)")
    parser.add_argument("--max-k", type=int)
    parser.add_argument("--cache-ttl-s", type=float)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fields = ("bundle_dir", "redis_url", "redis_prefix", "state_dir", "device", "api_key", "max_k", "cache_ttl_s")
    overrides: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"mmrec-serve: {where}: {error['msg']}", file=sys.stderr)
        return 2
    if not (settings.bundle_dir / "manifest.json").is_file():
        print(f"mmrec-serve: {settings.bundle_dir} is not a bundle (no manifest.json); export one with `mmrec export`", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings, on_ready=lambda runtime: print(banner(runtime, host=args.host, port=args.port), flush=True))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def banner(runtime: Runtime, *, host: str, port: int) -> str:
    engine, plan, settings = runtime.engine, runtime.plan, runtime.settings
    bundle = engine.bundle
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    user = bundle.user_ids[0] if bundle.user_ids else "any-user-id"
    backend = (
        f"redis at {runtime.pool.url if runtime.pool else ''} (prefix {settings.redis_prefix!r})"
        if settings.redis_url
        else f"embedded (in-process cache, state in {settings.resolved_state_dir})"
    )
    return "\n".join(
        [
            f"mmrec-serve: bundle {bundle.version} (model {bundle.model_name}, dataset {bundle.dataset_name}, "
            f"{engine.catalogue.size} items, dim {bundle.dim}, index {bundle.index_type})",
            f"  device: {plan.device}; onnxruntime providers: {', '.join(plan.ort_providers)}; "
            f"faiss on GPU: {'yes' if bundle.index_on_gpu else 'no'}",
            f"  cache and state: {backend}",
            f"  writes: {'need the X-API-Key header' if settings.api_key else 'open (no api_key configured)'}",
            f"  listening on {url}  (API docs: {url}/docs)",
            f"  try: curl '{url}/v1/users/{user}/recommendations?k=10'",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
