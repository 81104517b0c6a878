"""The HTTP floor: a FastAPI endpoint that does no work, on the service's path, async or sync.

    python -m bench.floor_server --mode async --port 8102

``GET /v1/users/{user_id}/recommendations?k=`` answers constant bytes: a JSON list of 20 scored items shaped like
the service's answer (about the same size), pre-serialised, so what is measured is uvicorn + FastAPI routing,
parameter parsing and sending a response of that size, nothing else. ``--mode sync`` makes the route a plain
``def`` (run on FastAPI's thread pool, as a sync route of the service would be). Same uvicorn defaults as
``mmrec-serve``.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, Response

PAYLOAD = json.dumps(
    {
        "user_id": "u12345",
        "strategy": "user_vector",
        "k": 20,
        "exclude_seen": True,
        "items": [{"id": f"i{100_000 + 37 * n}", "score": 9.87654321 - n / 7} for n in range(20)],
        "bundle_version": "synthetic-1000000x64-u100000-exact-s0-g1",
        "catalogue_version": "0",
        "cached": True,
    }
).encode()


def create_app(mode: str) -> FastAPI:
    app = FastAPI(title=f"HTTP floor ({mode})")

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    if mode == "async":

        @app.get("/v1/users/{user_id}/recommendations")
        async def recommend_async(user_id: str, k: int = 10) -> Response:
            return Response(PAYLOAD, media_type="application/json")

    else:

        @app.get("/v1/users/{user_id}/recommendations")
        def recommend_sync(user_id: str, k: int = 10) -> Response:
            return Response(PAYLOAD, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["async", "sync"], default="async")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    uvicorn.run(create_app(args.mode), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
