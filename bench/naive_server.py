"""The naive reference: what research code's full-sort does per request, behind FastAPI.

    python -m bench.naive_server --bundle DIR --port 8101

Per request: ``scores = item_matrix @ user_vec`` (torch, default threads), ``torch.topk(scores, k + n_seen)``, drop
the user's training items, answer the first ``k``. A sync route (FastAPI's thread pool), no cache, no index, no
batching. Same path and query as the service: ``GET /v1/users/{user_id}/recommendations?k=``; ``/readyz`` answers
once the arrays are loaded. Reads ``item_vectors.npy``, ``user_vectors.npy``, ``user_history.npz`` and the id lists
of a bundle (docs/bundle-format.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException

import bundle_format as bf


def create_app(bundle: Path) -> FastAPI:
    items = torch.from_numpy(np.load(bundle / bf.ITEM_VECTORS))  # (I, d)
    users = torch.from_numpy(np.load(bundle / bf.USER_VECTORS))  # (U, d)
    item_ids: list[str] = json.loads((bundle / bf.ITEM_IDS).read_text())
    user_rows = {u: r for r, u in enumerate(json.loads((bundle / bf.USER_IDS).read_text()))}
    with np.load(bundle / bf.USER_HISTORY) as history:
        indptr, indices = history[bf.HISTORY_INDPTR], history[bf.HISTORY_INDICES]
    app = FastAPI(title="naive full-sort reference")

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/users/{user_id}/recommendations")
    def recommend(user_id: str, k: int = 10) -> dict[str, Any]:
        row = user_rows.get(user_id)
        if row is None:
            raise HTTPException(404, f"unknown user {user_id!r}")
        seen = indices[indptr[row] : indptr[row + 1]]
        with torch.no_grad():
            scores = items @ users[row]  # (I,)
            top = torch.topk(scores, min(k + len(seen), len(item_ids)))
        excluded = set(seen.tolist())
        ranked = [(i, s) for i, s in zip(top.indices.tolist(), top.values.tolist(), strict=True) if i not in excluded]
        return {"user_id": user_id, "k": k, "items": [{"id": item_ids[i], "score": s} for i, s in ranked[:k]]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    uvicorn.run(create_app(args.bundle), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
