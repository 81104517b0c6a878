"""Exact top-k by inner product over item vectors on the CPU, without a BLAS packing copy of the items.

A batch of queries against an exact (flat) index costs about one pass over the item vectors. FAISS's flat search
computes each block of scores with BLAS sgemm, and OpenBLAS copies ("packs") the item block into its own layout on
every call: on the 1M x 64 bundle that copy was 37-47% of the search's time under load (py-spy, bench/results).
Here the scores of a block of rows, ``vectors[start:stop] @ queries.T``, come from onnxruntime's MatMul (MLAS),
whose kernel reads the rows where they are (only the small query matrix is packed). Two ways to keep the best k:

- :meth:`ExactInnerProductSearch.search`: block by block, each block's scores into FAISS's result heaps (a threshold
  test per score, no sort). Fastest, but every block's run and heap update return to Python, and with request
  threads busy in Python each return waits its turn for the GIL (py-spy under load: a third of a search thread's
  time). The service uses it for the row ranges of a lone batch (service/batching.py), when the GIL is free.
- :meth:`ExactInnerProductSearch.search_whole`: every block's MatMul and TopK in one onnxruntime run, merged after:
  one return to Python. TopK costs more than the heaps as the batch grows, so the service uses it for batches of up
  to :data:`ONE_CALL_MAX_QUERIES` queries under load and FAISS's one call above.

On one thread, 1M x 64 memory-mapped, k = 40, CPU ms a batch (bench/results/exact-kernel.json, an AMD EPYC host),
block by block / one run / FAISS's flat search at the service's BLAS threshold of 1: 1 query 11.4 / 12.2 / 38.0;
8 queries 30.0 / 32.6 / 50.9; 16 queries 33.2 / 45.5 / 64.7; 32 queries 74.2 / 101.2 / 96.3; 64 queries 173 / 239
/ 169.

The vectors are never copied: each block is a view of the memory-mapped array, handed to onnxruntime as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, wait

import faiss
import numpy as np
import onnxruntime as ort

BLOCK_SCORES = 1 << 20  # scores per run (rows x queries: 4 MB, cache-sized): 16,384 rows for 64 queries, 1M for 1
ONE_CALL_BLOCK_ROWS = 32_768  # rows a block of the one-call graph: 16k-32k measured best for its TopK
ONE_CALL_MAX_QUERIES = 16  # the one-call graph's TopK costs more than FAISS's heaps above this (bench/exact_kernel.py)
_FLOAT, _INT64 = 1, 7  # onnx.proto TensorProto.DataType


# ONNX models written as protobuf bytes (ModelProto, with onnx.proto's field numbers) because the service does not import
# the ``onnx`` package (tests/service/test_service_boundaries.py); tests/service/test_exact_search.py checks each with
# ``onnx.checker`` and against the same graph built by ``onnx.helper``.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _number(field: int, value: int) -> bytes:  # wire type 0
    return _varint(field << 3) + _varint(value)


def _nested(field: int, payload: bytes | str) -> bytes:  # wire type 2: bytes, strings, messages
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: Sequence[str | int]) -> bytes:
    """ValueInfoProto: a tensor of ``elem_type`` whose dimensions are named (str) or fixed (int)."""
    shape = b"".join(_nested(1, _nested(2, d) if isinstance(d, str) else _number(1, d)) for d in dims)
    return _nested(1, name) + _nested(2, _nested(1, _number(1, elem_type) + _nested(2, shape)))


def _node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], *, ints: dict[str, Sequence[int]] | None = None,
          int_: dict[str, int] | None = None) -> bytes:  # fmt: skip
    """NodeProto; attributes of type INTS (``ints``) or INT (``int_``)."""
    attributes = [_nested(1, name) + b"".join(_number(8, v) for v in values) + _number(20, 7)
                  for name, values in (ints or {}).items()]  # fmt: skip
    attributes += [_nested(1, name) + _number(3, value) + _number(20, 2) for name, value in (int_ or {}).items()]
    return (b"".join(_nested(1, i) for i in inputs) + b"".join(_nested(2, o) for o in outputs) + _nested(4, op_type)
            + b"".join(_nested(5, a) for a in attributes))  # fmt: skip


def _model(name: str, nodes: Sequence[bytes], inputs: Sequence[bytes], outputs: Sequence[bytes]) -> bytes:
    """ModelProto, IR version 8, the default opset 18."""
    graph = (b"".join(_nested(1, n) for n in nodes) + _nested(2, name) + b"".join(_nested(11, i) for i in inputs)
             + b"".join(_nested(12, o) for o in outputs))  # fmt: skip
    return _number(1, 8) + _nested(7, graph) + _nested(8, _nested(1, "") + _number(2, 18))


def scores_graph() -> bytes:
    """``scores = Transpose(MatMul(vectors, queries_t))``: vectors (rows, dim), queries_t (dim, batch) -> scores
    (batch, rows), float32."""
    return _model(
        "exact_inner_product_scores",
        [_node("MatMul", ["vectors", "queries_t"], ["row_scores"]),
         _node("Transpose", ["row_scores"], ["scores"], ints={"perm": [1, 0]})],
        [_value_info("vectors", _FLOAT, ("rows", "dim")), _value_info("queries_t", _FLOAT, ("dim", "batch"))],
        [_value_info("scores", _FLOAT, ("batch", "rows"))],
    )  # fmt: skip


def top_k_graph(n_blocks: int) -> bytes:
    """Each block b of rows (``block_b``: rows_b x dim) scored against queries_t (dim, batch) and its best ``k_b``
    (int64 [1], at most rows_b) kept by TopK, in one run: values (batch, sum of k_b) float32 and rows (batch, sum of
    k_b) int64, the rows numbered within their block, block after block, best first within each."""
    nodes, inputs = [], []
    for b in range(n_blocks):
        inputs += [_value_info(f"block_{b}", _FLOAT, (f"rows_{b}", "dim")), _value_info(f"k_{b}", _INT64, (1,))]
        nodes += [_node("MatMul", [f"block_{b}", "queries_t"], [f"row_scores_{b}"]),
                  _node("Transpose", [f"row_scores_{b}"], [f"scores_{b}"], ints={"perm": [1, 0]}),
                  _node("TopK", [f"scores_{b}", f"k_{b}"], [f"values_{b}", f"rows_{b}"], int_={"axis": 1})]  # fmt: skip
    nodes += [_node("Concat", [f"values_{b}" for b in range(n_blocks)], ["values"], int_={"axis": 1}),
              _node("Concat", [f"rows_{b}" for b in range(n_blocks)], ["rows"], int_={"axis": 1})]  # fmt: skip
    inputs.append(_value_info("queries_t", _FLOAT, ("dim", "batch")))
    return _model("exact_inner_product_top_k", nodes, inputs,
                  [_value_info("values", _FLOAT, ("batch", "found")), _value_info("rows", _INT64, ("batch", "found"))])  # fmt: skip


class ExactInnerProductSearch:
    """Exact top-``k`` of queries by inner product over ``vectors`` (n, dim) float32, or over a row range of them.

    Thread-safe: concurrent searches share one onnxruntime session (one intra-op thread a run: callers choose the
    parallelism, e.g. :func:`search_in_shards`). FAISS's heap operations are OpenMP loops: a calling thread whose
    OpenMP thread count is above 1 starts a team of threads for them (the service's search threads set theirs to
    ``faiss_threads``)."""

    def __init__(self, vectors: np.ndarray, *, block_scores: int = BLOCK_SCORES,
                 one_call_block_rows: int = ONE_CALL_BLOCK_ROWS) -> None:  # fmt: skip
        if vectors.ndim != 2 or vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
            raise ValueError(f"vectors must be a C-contiguous float32 matrix, got {vectors.dtype} {vectors.shape}")
        if block_scores < 1 or one_call_block_rows < 1:
            raise ValueError(f"block_scores and one_call_block_rows must be at least 1, got {block_scores}, "
                             f"{one_call_block_rows}")  # fmt: skip
        self.vectors = vectors
        self.block_scores = block_scores
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(scores_graph(), sess_options=options,
                                             providers=["CPUExecutionProvider"])  # fmt: skip
        # The one-call graph: every block of rows is an input of its own (a view, not a copy).
        starts = range(0, max(1, len(vectors)), one_call_block_rows)
        self._blocks = [vectors[start:start + one_call_block_rows] for start in starts]
        self._block_starts = np.array(list(starts), dtype=np.int64)
        self._block_feeds = {f"block_{b}": block for b, block in enumerate(self._blocks)}
        self._one_call = ort.InferenceSession(top_k_graph(len(self._blocks)), sess_options=options,
                                              providers=["CPUExecutionProvider"])  # fmt: skip
        self._k_feeds: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    @property
    def n_rows(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int, *, start: int = 0, stop: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Best ``k`` rows of ``[start, stop)`` for each query (B, dim): (scores, rows), both (B, k), best first,
        equal scores lowest row first; rows -1 and scores -inf where the range holds fewer than ``k`` rows. Scores
        are float32 products from the matrix kernel, whose rounding can depend on a row's place in its block: rows
        with the same vector may score an ulp apart, so which of several tied rows fill the last places is not
        fixed."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"row range [{start}, {stop}) is not within the {self.n_rows} rows")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries = len(queries)
        scores = np.empty((n_queries, k), dtype=np.float32)
        rows = np.empty((n_queries, k), dtype=np.int64)
        if n_queries == 0:
            return scores, rows
        heaps = faiss.float_minheap_array_t()  # a min-heap of the best k per query: keeps the largest scores
        heaps.nh, heaps.k = n_queries, k
        heaps.val, heaps.ids = faiss.swig_ptr(scores), faiss.swig_ptr(rows)
        heaps.heapify()
        queries_t = np.ascontiguousarray(queries.T)
        # Rows a run: as many as keep its scores within block_scores (few runs for few queries: each run and heap
        # update returns to Python, which under load waits for the GIL).
        block_rows = max(1, self.block_scores // n_queries)
        for block_start in range(start, stop, block_rows):
            block = self.vectors[block_start:min(block_start + block_rows, stop)]
            block_scores = self._session.run(None, {"vectors": block, "queries_t": queries_t})[0]  # (B, rows)
            block_scores = np.ascontiguousarray(block_scores, dtype=np.float32)
            # The block's rows are ids block_start, block_start + 1, ...; a score enters a heap only if it beats the
            # heap's worst.
            # (nj, vin, j0, i0, ni): faiss's .pyi lists only the first two of the SWIG method's arguments
            heaps.addn(len(block), faiss.swig_ptr(block_scores), block_start, 0, n_queries)  # type: ignore[call-arg]
        heaps.reorder()  # best first
        return _order_ties_by_row(scores, rows)

    def search_whole(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` over every row in one onnxruntime run (each block's best ``k`` by TopK, merged here), so the
        search returns to Python once, not after every block: for a batch searched while other threads want the GIL.
        Faster than FAISS's flat search up to :data:`ONE_CALL_MAX_QUERIES` queries (TopK's cost grows faster with
        the batch than FAISS's heaps)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 0 or self.n_rows == 0:
            nothing = np.empty((len(queries), 0))
            return _best_k(nothing.astype(np.float32), nothing.astype(np.int64), k)
        k_feeds, offsets = self._k_feeds_for(k)
        values, rows = self._one_call.run(None, {**self._block_feeds, **k_feeds, "queries_t": np.ascontiguousarray(queries.T)})
        return _best_k(np.asarray(values, dtype=np.float32), np.asarray(rows, dtype=np.int64) + offsets, k)

    def _k_feeds_for(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each block's ``k_b = min(k, rows_b)`` and the row offset of each of the graph's output columns."""
        cached = self._k_feeds.get(k)
        if cached is None:
            per_block = [min(k, len(block)) for block in self._blocks]
            feeds = {f"k_{b}": np.array([kb], dtype=np.int64) for b, kb in enumerate(per_block)}
            cached = (feeds, np.repeat(self._block_starts, per_block)[None, :])
            if len(self._k_feeds) < 64:  # a few distinct k in practice (k + seen items, doubled when short)
                self._k_feeds[k] = cached
        return cached


def _order_ties_by_row(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's results by (score descending, row ascending); missing rows (-1) last with score -inf, and
    rows scored NaN (a NaN query: FAISS's heaps never keep them, TopK would) missing too."""
    missing = (rows < 0) | np.isnan(scores)
    scores = np.where(missing, np.float32(-np.inf), scores)
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, rows), -scores))
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(np.where(missing, -1, rows), order, axis=1)


def _best_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (B, m) -> the best ``k`` of each query, ordered by :func:`_order_ties_by_row`, padded with rows -1
    and scores -inf where fewer than ``k`` were found."""
    scores, rows = _order_ties_by_row(scores, rows)
    if scores.shape[1] < k:
        pad = ((0, 0), (0, k - scores.shape[1]))
        scores, rows = np.pad(scores, pad, constant_values=-np.inf), np.pad(rows, pad, constant_values=-1)
    return scores[:, :k], rows[:, :k]


def search_in_shards(search: ExactInnerProductSearch, queries: np.ndarray, k: int, *, pool: Executor,
                     bounds: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """:meth:`ExactInnerProductSearch.search` over each row range of ``bounds`` at once on ``pool``'s threads (each
    for at most its own row count), the ranges' best ``k`` merged: (scores, rows), (B, k), best first, equal scores
    lowest row first, rows -1 and scores -inf where the ranges hold fewer than ``k`` rows. The scores are those of one
    search over the union, but for the kernel's rounding (which of several tied rows fill the last places may
    differ: :meth:`ExactInnerProductSearch.search`)."""
    ranges = [(start, stop) for start, stop in bounds if stop > start]
    futures = [pool.submit(search.search, queries, min(k, stop - start), start=start, stop=stop) for start, stop in ranges]
    wait(futures)  # every shard has ended before this batch answers (or raises)
    parts = [future.result() for future in futures]
    n_queries = len(queries)
    scores = np.concatenate([np.empty((n_queries, 0), dtype=np.float32), *(part[0] for part in parts)], axis=1)
    rows = np.concatenate([np.empty((n_queries, 0), dtype=np.int64), *(part[1] for part in parts)], axis=1)
    return _best_k(scores, rows, k)
