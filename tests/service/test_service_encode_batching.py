"""Cross-request micro-batching of the encoders (service/microbatching.py, ItemEncoder with batch_max_wait_ms > 0):
batched runs give the vectors of unbatched ones, and a bad item fails only its own request."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest
from bundle_factory import WORDS, SyntheticBundle
from fastapi.testclient import TestClient
from PIL import Image

from service.bundle import load_bundle, plan_device
from service.encoding import EncodingLimits, ItemContent, ItemEncoder
from service.errors import InvalidInput
from service.microbatching import MicroBatcher
from service.recommender import UserTower
from service.settings import ServiceSettings

TOLERANCE = 1e-5  # float32 graphs: a row's output does not depend on the other rows of its run, up to rounding
LIMITS = EncodingLimits.from_settings(ServiceSettings(bundle_dir="unused"))
Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def _png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _contents(n: int, seed: int = 3) -> list[ItemContent]:
    rng = np.random.default_rng(seed)
    return [
        ItemContent(
            text=" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))),  # lengths on both sides of max_length 16
            image_base64=_png_b64(rng.integers(0, 256, size=(10 + n, 14 + 2 * n, 3), dtype=np.uint8)),
        )
        for n in range(n)
    ]


def _concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every call on its own thread, all released at once; returns results (or the exception raised)."""
    start = threading.Barrier(len(calls), timeout=10)

    def call(fn: Callable[[], Any]) -> Any:
        start.wait()
        try:
            return fn()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(call, calls))


# --- MicroBatcher --------------------------------------------------------------------------------------------------


def _doubling(runs: list[list[int]]) -> Callable[[Sequence[int]], list[int]]:
    def run(rows: Sequence[int]) -> list[int]:
        if any(r < 0 for r in rows):
            raise ValueError(f"negative row in {list(rows)}")
        runs.append(list(rows))
        return [2 * r for r in rows]

    return run


def test_concurrent_jobs_share_one_run_and_each_gets_its_own_rows() -> None:
    runs: list[list[int]] = []
    batcher = MicroBatcher(_doubling(runs), name="t", max_wait_ms=200, max_rows=100)
    jobs = [[n, 10 * n] for n in range(6)]
    results = _concurrently([lambda rows=rows: batcher.run(rows) for rows in jobs])
    assert [list(r) for r in results] == [[2 * n, 20 * n] for n in range(6)]
    assert batcher.jobs == 6 and batcher.batches < 6 and len(runs) == batcher.batches
    assert sorted(r for run in runs for r in run) == sorted(r for rows in jobs for r in rows)


def test_a_batch_holds_at_most_max_rows_unless_one_job_is_larger() -> None:
    runs: list[list[int]] = []
    batcher = MicroBatcher(_doubling(runs), name="t", max_wait_ms=200, max_rows=4)
    _concurrently([lambda n=n: batcher.run([n, n]) for n in range(6)])  # 12 rows: at least 3 runs of 4
    assert all(len(run) <= 4 for run in runs) and len(runs) >= 3
    assert list(batcher.run(list(range(9)))) == [2 * r for r in range(9)]  # one job over max_rows runs whole
    assert runs[-1] == list(range(9))


def test_a_failing_job_fails_alone_and_the_others_of_its_batch_are_answered() -> None:
    runs: list[list[int]] = []
    batcher = MicroBatcher(_doubling(runs), name="t", max_wait_ms=200, max_rows=100)
    jobs = [[1], [2, -5], [3], [4]]
    results = _concurrently([lambda rows=rows: batcher.run(rows) for rows in jobs])
    assert isinstance(results[1], ValueError) and "negative row in [2, -5]" in str(results[1])
    assert [list(results[i]) for i in (0, 2, 3)] == [[2], [6], [8]]
    assert [2, -5] not in runs  # the bad job ran alone and raised; every good one ran


def test_batching_off_runs_on_the_callers_thread() -> None:
    threads: list[str] = []

    def run(rows: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return list(rows)

    batcher = MicroBatcher(run, name="t", max_wait_ms=0, max_rows=8)
    assert not batcher.enabled and list(batcher.run([1, 2])) == [1, 2]
    assert threads == [threading.current_thread().name] and batcher.batches == 0
    with pytest.raises(ValueError, match="negative"):
        MicroBatcher(_doubling([]), name="t", max_wait_ms=0, max_rows=8).run([-1])


def test_the_worker_leaves_when_idle_and_the_next_job_starts_another() -> None:
    batcher = MicroBatcher(_doubling([]), name="idle", max_wait_ms=1, max_rows=8, idle_s=0.05)
    assert list(batcher.run([1])) == [2]
    deadline = time.monotonic() + 5
    while batcher.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.alive == 0
    assert list(batcher.run([2])) == [4] and batcher.alive == 1  # a new worker takes it


# --- ItemEncoder ---------------------------------------------------------------------------------------------------


def _encoder(bundle: SyntheticBundle, *, wait_ms: float, chunk_size: int = 4) -> ItemEncoder:
    limits = EncodingLimits.from_settings(ServiceSettings(bundle_dir="unused", encode_chunk_size=chunk_size))
    return ItemEncoder(load_bundle(bundle.path, plan=plan_device("cpu")), limits=limits, batch_max_wait_ms=wait_ms)


def test_batched_encoding_gives_the_vectors_of_unbatched_encoding(content_bundle: SyntheticBundle) -> None:
    contents = _contents(12)
    alone = [_encoder(content_bundle, wait_ms=0).encode([c])[0] for c in contents]
    batched_encoder = _encoder(content_bundle, wait_ms=100, chunk_size=3)
    # 10 requests of one item and one of two, at once
    groups = [[c] for c in contents[:10]] + [contents[10:]]
    results = _concurrently([lambda g=g: batched_encoder.encode(g) for g in groups])
    batched = [item for result in results for item in result]
    for a, b, content in zip(alone, batched, contents, strict=True):
        assert sorted(b.features) == ["image", "text"]
        np.testing.assert_allclose(b.features["text"], a.features["text"], atol=TOLERANCE)
        np.testing.assert_allclose(b.features["text"], content_bundle.encode_text(content.text or ""), atol=TOLERANCE)
        np.testing.assert_allclose(b.features["image"], a.features["image"], atol=TOLERANCE)
        np.testing.assert_allclose(b.vector, a.vector, atol=TOLERANCE)
    for batcher in (batched_encoder.text_batcher, batched_encoder.image_batcher, batched_encoder.item_batcher):
        assert batcher is not None and batcher.jobs >= len(groups) and batcher.batches < batcher.jobs


def test_an_image_that_does_not_decode_fails_only_its_own_request(content_bundle: SyntheticBundle) -> None:
    encoder = _encoder(content_bundle, wait_ms=100)
    contents = _contents(5)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buffer, format="PNG")
    truncated = ItemContent(text="a dog", image_base64=base64.b64encode(buffer.getvalue()[:-40]).decode())
    results = _concurrently([lambda c=c: encoder.encode([c]) for c in [*contents, truncated]])
    assert isinstance(results[-1], InvalidInput) and results[-1].status_code == 422
    assert "image_base64: not a readable image" in results[-1].message
    expected = [_encoder(content_bundle, wait_ms=0).encode([c])[0].vector for c in contents]
    for result, vector in zip(results[:-1], expected, strict=True):
        np.testing.assert_allclose(result[0].vector, vector, atol=TOLERANCE)


def test_items_posted_at_once_are_encoded_in_shared_batches_and_a_bad_one_gets_its_own_422(
    make_settings: Callable[..., ServiceSettings], serve: Serve, features_bundle: SyntheticBundle
) -> None:
    settings = make_settings(encode_batch_max_wait_ms=100)
    good = [{"id": f"g{n}", "features": {"tags": np.linspace(-1, 1, 8).tolist(), "audio": [0.1 * n] * 12}} for n in range(5)]
    huge = {"id": "huge", "features": {"tags": [1e30] * 8}}  # a finite input whose vector is far over MAX_VECTOR_NORM
    with serve(settings) as client:
        responses = _concurrently([lambda body=body: client.post("/v1/items", json=body) for body in [*good, huge]])
        encoder = client.app.state.runtime.engine.encoder  # type: ignore[attr-defined]
        assert encoder.item_batcher.jobs == 6 and encoder.item_batcher.batches < 6  # the bad item shared a batch
        assert responses[-1].status_code == 422
        assert responses[-1].json()["detail"] == "features give a non-finite or huge item vector"
        assert client.get("/v1/items/huge").status_code == 404
        assert all(response.status_code == 201 for response in responses[: len(good)]), [r.text for r in responses]
        # each good item was encoded as on its own: its cosine neighbour (service/similarity.py) among the trained
        # items and the other good items is the one numpy finds from the reference encoder's vectors
        ids = [*features_bundle.item_ids, *(body["id"] for body in good)]
        vectors = np.vstack([features_bundle.item_vectors, *(
            features_bundle.encode({m: np.asarray(v) for m, v in body["features"].items()})  # type: ignore[attr-defined]
            for body in good)])  # fmt: skip
        units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for n, body in enumerate(good):
            row = len(features_bundle.item_ids) + n
            cosines = units @ units[row]
            cosines[row] = -np.inf
            similar = client.get(f"/v1/items/{body['id']}/similar", params={"k": 1}).json()["items"][0]
            assert similar["id"] == ids[int(np.argmax(cosines))]


def test_encode_batch_max_wait_ms_zero_turns_batching_off(
    make_settings: Callable[..., ServiceSettings], serve: Serve
) -> None:
    with serve(make_settings(encode_batch_max_wait_ms=0)) as client:
        responses = _concurrently([lambda n=n: client.post("/v1/items", json={"id": f"o{n}", "features": {"audio": [n] * 12}})
                                   for n in range(4)])  # fmt: skip
        assert [r.status_code for r in responses] == [201] * 4
        encoder = client.app.state.runtime.engine.encoder  # type: ignore[attr-defined]
        assert not encoder.batched and encoder.item_batcher.batches == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_at_most_workers_batches_run_at_once(workers: int) -> None:
    lock, inside, most = threading.Lock(), [0], [0]

    def run(rows: Sequence[int]) -> list[int]:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # long enough for other workers to start a batch, were they there
        with lock:
            inside[0] -= 1
        return list(rows)

    batcher = MicroBatcher(run, name="w", max_wait_ms=1, max_rows=1, workers=workers)
    results = _concurrently([lambda n=n: batcher.run([n]) for n in range(6)])
    assert [list(r) for r in results] == [[n] for n in range(6)]
    assert most[0] == workers and batcher.alive <= workers


def test_user_tower_batches_concurrent_histories_into_the_vectors_of_single_runs(sequence_bundle: SyntheticBundle) -> None:
    bundle = load_bundle(sequence_bundle.path, plan=plan_device("cpu"))
    assert bundle.user_tower is not None
    alone = UserTower(bundle.user_tower, bundle.dim)
    batched = UserTower(bundle.user_tower, bundle.dim, max_wait_ms=100)
    rng = np.random.default_rng(5)
    length = bundle.user_tower.max_length
    histories = [rng.choice(len(sequence_bundle.item_ids), size=n).tolist() for n in (1, 2, length - 1, length, 3, 1)]
    results = _concurrently([lambda h=h: batched.encode(sequence_bundle.item_vectors[h[-length:]]) for h in histories])
    for history, vector in zip(histories, results, strict=True):
        np.testing.assert_allclose(vector, alone.encode(sequence_bundle.item_vectors[history[-length:]]), atol=TOLERANCE)
        np.testing.assert_allclose(vector, sequence_bundle.tower(history), atol=TOLERANCE)
    assert batched.batcher.jobs == len(histories) and batched.batcher.batches < len(histories)
