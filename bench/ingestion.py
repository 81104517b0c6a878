"""Ingestion benchmark: ``POST /v1/items`` with raw text + image against a real bundle (text and image encoders).

Three phases against one running service:
- throughput at concurrency 1 and 8: items posted one per request, new ids, as fast as the answers come back
  (closed loop, httpx clients in this process's threads): items/s and request latency percentiles;
- POST → recommendable, one item at a time: its matching user is the trained user for whom the item's score
  (its vector computed beforehand with the checkout's ``service.encoding.ItemEncoder``) beats the k-th score of
  their current list by the widest margin; that user's list is requested once (so it is cached), then the item is
  posted and, after the 201, polled (5 ms apart, up to 5 s) until ``GET /v1/items/{id}/similar`` serves it
  ("visible", the brief's definition of recommendable) and until it is in the user's
  ``GET /v1/users/{user}/recommendations?k=100`` ("listed": indexed, found by a search, and the user's cached list
  invalidated); also how many items were so on the first GET after the POST's answer. The matching user's margin
  is computed against trained items: items ingested earlier in the run can take the slot of a tiny margin. Items
  no user would get in a top 100 (cold-start vectors are often short: a ridge map shrinks
  them) are counted, not timed.

Content: movies of ml100k-posters (text "title. genres. overview" and the poster JPEG, as training reads them) when
the shared data is there (``MMREC_DATA_ROOT``), else generated sentences and 92×138 noise JPEGs (stated in the
result).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RECOMMENDABLE_DEADLINE_S = 5.0
POLL_INTERVAL_S = 0.005


def ingestion_content(n: int, *, seed: int = 0) -> tuple[list[tuple[str, str]], str]:
    """``n`` (text, image base64) pairs and where they come from."""
    from training.settings import default_paths

    root = default_paths().data_root / "ml100k-posters"
    if root.is_dir():
        from training.data.sources import read_ml100k_posters

        raw = read_ml100k_posters(default_paths())
        pairs = [(t, p) for t, p in zip(raw.item_text, raw.item_image, strict=True) if t and p]
        images: dict[str, str] = {}
        content = []
        for k in range(n):
            text, poster = pairs[k % len(pairs)]
            if poster not in images:
                with open(poster, "rb") as fh:
                    images[poster] = base64.b64encode(fh.read()).decode("ascii")
            content.append((text, images[poster]))
        return content, f"ml100k-posters ({len(pairs)} movies with text and poster, reused in turn)"
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["a", "quiet", "storm", "lighthouse", "keeper", "dog", "city", "night", "love", "war", "family", "drama"]
    content = []
    for _ in range(n):
        pixels = rng.integers(0, 256, size=(138, 92, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        text = " ".join(rng.choice(words, size=40)).capitalize() + "."
        content.append((text, base64.b64encode(buffer.getvalue()).decode("ascii")))
    return content, "generated (no ml100k-posters under MMREC_DATA_ROOT): 40-word texts, 92x138 noise JPEGs"


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values)
    found: dict[str, float | None] = {f"p{q}": round(float(np.percentile(array, q)), 2) for q in (50, 90, 99)}
    return found | {"max": round(float(array.max()), 2)}


def run_ingestion(url: str, content: Sequence[tuple[str | None, str | None]], *, concurrency: int, id_prefix: str,
                  api_key: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Post every item of ``content`` (one per request) from ``concurrency`` threads; items/s and latency (ms)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    next_item = iter(range(len(content)))

    def worker() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
            while True:
                with lock:
                    n = next(next_item, None)
                if n is None:
                    return
                text, image = content[n]
                started = time.perf_counter()
                response = client.post("/v1/items", json={"id": f"{id_prefix}-{n}", "text": text, "image_base64": image})
                elapsed = 1000 * (time.perf_counter() - started)
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code != 201 and len(failures) < 5:
                        failures.append(response.text[:300])

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    created = statuses.get(201, 0)
    return {
        "concurrency": concurrency,
        "items": len(content),
        "created": created,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "seconds": round(seconds, 3),
        "items_per_s": round(created / seconds, 2),
        "latency_ms": _percentiles(latencies),
    }


def matching_users(bundle_dir: Path, content: list[tuple[str, str]], *, k: int) -> list[tuple[str | None, float]]:
    """For each item: the trained user most certain to get it in a top-``k`` list once it is indexed, and by how
    much (the item's score for that user minus the user's current k-th score, training items excluded as the
    service excludes them), or (None, best margin) when no user would.

    The item's vector comes from the checkout's own ``service.encoding.ItemEncoder`` on the bundle, so it is the
    vector the service will index.
    """
    from service.bundle import load_bundle, plan_device
    from service.encoding import EncodingLimits, ItemContent, ItemEncoder
    from service.settings import ServiceSettings

    bundle = load_bundle(bundle_dir, plan=plan_device("cpu"))
    if bundle.user_vectors is None:
        return [(None, float("nan")) for _ in content]
    encoder = ItemEncoder(bundle, limits=EncodingLimits.from_settings(ServiceSettings(bundle_dir=bundle_dir)))  # the defaults
    vectors = np.stack([encoder.encode([ItemContent(text=t, image_base64=i)])[0].vector for t, i in content])
    users = bundle.user_vectors  # (U, d)
    scores = users @ bundle.item_vectors.T  # (U, I)
    for row in range(len(users)):
        scores[row, bundle.training_history(row)] = -np.inf
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (U,) the k-th best score of each user's list
    margins = vectors @ users.T - kth[None, :]  # (N, U)
    best = margins.argmax(axis=1)
    return [(bundle.user_ids[u] if margins[n, u] > 0 else None, float(margins[n, u])) for n, u in enumerate(best)]


def run_recommendable(url: str, content: list[tuple[str, str]], users: list[tuple[str | None, float]], *,
                      id_prefix: str, k: int, api_key: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Per item: POST latency, and the time from the POST's start until the item is served by /similar
    ("visible") and until it is in its matching user's top-``k`` list ("listed"), in ms."""
    headers = {"X-API-Key": api_key} if api_key else {}
    post_ms: list[float] = []
    visible_ms: list[float] = []
    listed_ms: list[float] = []
    never_visible = never_listed = polls = first_visible = first_listed = 0
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
        for n, ((text, image), (user, _)) in enumerate(zip(content, users, strict=True)):
            item_id = f"{id_prefix}-{n}"
            if user is not None:
                client.get(f"/v1/users/{user}/recommendations", params={"k": k}).raise_for_status()  # cached now
            started = time.perf_counter()
            response = client.post("/v1/items", json={"id": item_id, "text": text, "image_base64": image})
            if response.status_code != 201:
                raise RuntimeError(f"POST /v1/items answered {response.status_code}: {response.text[:300]}")
            post_ms.append(1000 * (time.perf_counter() - started))
            visible = None
            listed = None if user is not None else float("nan")
            deadline = started + RECOMMENDABLE_DEADLINE_S
            attempt = 0
            while (visible is None or listed is None) and time.perf_counter() < deadline:
                polls += 1
                attempt += 1
                if visible is None and client.get(f"/v1/items/{item_id}/similar", params={"k": 1}).status_code == 200:
                    visible = 1000 * (time.perf_counter() - started)
                    first_visible += attempt == 1
                if listed is None:
                    body = client.get(f"/v1/users/{user}/recommendations", params={"k": k})
                    if body.status_code == 200 and any(i["id"] == item_id for i in body.json()["items"]):
                        listed = 1000 * (time.perf_counter() - started)
                        first_listed += attempt == 1
                if visible is None or listed is None:
                    time.sleep(POLL_INTERVAL_S)
            if visible is None:
                never_visible += 1
            else:
                visible_ms.append(visible)
            if listed is None:
                never_listed += 1
            elif not np.isnan(listed):
                listed_ms.append(listed)
    with_user = sum(1 for user, _ in users if user is not None)
    return {
        "items": len(content),
        "k": k,
        "deadline_s": RECOMMENDABLE_DEADLINE_S,
        "post_ms": _percentiles(post_ms),
        "visible_ms": _percentiles(visible_ms),
        "listed_ms": _percentiles(listed_ms),
        "items_with_a_matching_user": with_user,
        "margins": [round(margin, 5) for _, margin in users],
        "visible_on_the_first_get": first_visible,
        "listed_on_the_first_get": first_listed,
        "not_visible_within_deadline": never_visible,
        "not_listed_within_deadline": never_listed,
        "polls": polls,
    }
