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
- :meth:`ExactInnerProductSearch.search_whole`: every block's MatMul and best k in one onnxruntime run, merged
  after: one return to Python. A TopK over every score cost more than the heaps as the batch grew (16 queries: 45.5
  against 33.2 ms), so each block keeps its best groups of 16 rows by their maxima first and its best k rows of
  those (:func:`top_k_graph`). The service uses it under load for batches of up to :data:`ONE_CALL_MAX_QUERIES`
  queries asking up to :data:`ONE_CALL_MAX_K` rows (its TopKs cost more as k grows).

On one thread, 1M x 64 memory-mapped, k = 40, CPU ms a batch (bench/results/exact-kernel-grouped.json, an AMD EPYC host,
medians of 5), block by block / one run / FAISS's flat search at the service's BLAS threshold of 1: 1 query 16.8 /
19.4 / 35.3; 8 queries 38.0 / 37.9 / 46.4; 16 queries 42.8 / 45.0 / 60.3; 32 queries 98.1 / 88.2 / 120.0; 64
queries 192 / 193 / 208. (An earlier run on a host of the same kind measured FAISS 38.0 / 50.9 / 64.7 / 96.3 /
169 and the one run with a TopK over every score 12.2 / 32.6 / 45.5 / 101 / 239: compare within one run.)

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
ONE_CALL_GROUP_ROWS = 16  # rows a group of the one-call graph's first TopK (over group maxima): 8-64 within noise
ONE_CALL_MAX_QUERIES = 64  # the batcher's default batch_max_size: the one-call graph is about level with FAISS up to 64
# The one-call graph's two TopKs cost grows with k, FAISS's heaps' hardly: 16 queries at 1M x 64, one run / FAISS CPU ms,
# k = 40 45 / 61, k = 64 51 / 63, k = 80 68 / 65, k = 200 100 / 65, k = 400 161 / 64 (the service asks k + seen items)
ONE_CALL_MAX_K = 64
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
    (int64 [1], at most rows_b) kept, in one run: values (sum of k_b, batch) float32 and rows (sum of k_b, batch)
    int64, the rows numbered within their block, block after block, best first within each.

    A block's rows are taken in ``groups_b`` groups of ``group_rows_b`` consecutive rows (rows_b = groups_b x
    group_rows_b). TopK over every score costs more than the product at a batch of 16 (bench/exact_kernel.py), so it
    runs over the groups' maxima first: the ``k_groups_b = min(k, groups_b)`` groups with the highest maxima hold the
    best k rows (a row outside them is beaten by k groups' maxima, so by k rows), and a second TopK picks the best
    ``k_b`` of those groups' rows. Equal scores at the k-th place may be kept from another group than a full sort's.
    ``one``, ``two`` and ``minus_one`` are the int64 [1] constants 1, 2 and -1 (fed, so the graph needs no
    initializers)."""
    nodes = [_node("Shape", ["queries_t"], ["query_shape"]),
             _node("Slice", ["query_shape", "one", "two"], ["batch"]),
             _node("Concat", ["minus_one", "batch"], ["candidates_shape"], int_={"axis": 0})]  # fmt: skip
    inputs = []
    for b in range(n_blocks):
        groups, group_rows, k_groups, k = f"groups_{b}", f"group_rows_{b}", f"k_groups_{b}", f"k_{b}"
        inputs += [_value_info(f"block_{b}", _FLOAT, (f"rows_{b}", "dim"))]
        inputs += [_value_info(name, _INT64, (1,)) for name in (groups, group_rows, k_groups, k)]
        nodes += [_node("MatMul", [f"block_{b}", "queries_t"], [f"row_scores_{b}"]),  # (rows, batch)
                  _node("Concat", [groups, group_rows, "batch"], [f"grouped_shape_{b}"], int_={"axis": 0}),
                  _node("Reshape", [f"row_scores_{b}", f"grouped_shape_{b}"], [f"grouped_{b}"]),  # (groups, g, batch)
                  _node("ReduceMax", [f"grouped_{b}", "one"], [f"group_max_{b}"], int_={"keepdims": 0}),
                  _node("TopK", [f"group_max_{b}", k_groups], [f"best_group_max_{b}", f"best_groups_{b}"],
                        int_={"axis": 0}),  # (k_groups, batch)
                  _node("Unsqueeze", [f"best_groups_{b}", "one"], [f"best_groups_3d_{b}"]),
                  _node("Concat", [k_groups, group_rows, "batch"], [f"gather_shape_{b}"], int_={"axis": 0}),
                  _node("Expand", [f"best_groups_3d_{b}", f"gather_shape_{b}"], [f"gather_index_{b}"]),
                  _node("GatherElements", [f"grouped_{b}", f"gather_index_{b}"], [f"candidates_{b}"], int_={"axis": 0}),
                  _node("Reshape", [f"candidates_{b}", "candidates_shape"], [f"candidate_scores_{b}"]),
                  _node("TopK", [f"candidate_scores_{b}", k], [f"values_{b}", f"positions_{b}"], int_={"axis": 0}),
                  _node("Div", [f"positions_{b}", group_rows], [f"position_groups_{b}"]),
                  _node("Mod", [f"positions_{b}", group_rows], [f"position_offsets_{b}"]),
                  _node("GatherElements", [f"best_groups_{b}", f"position_groups_{b}"], [f"row_groups_{b}"],
                        int_={"axis": 0}),
                  _node("Mul", [f"row_groups_{b}", group_rows], [f"group_starts_{b}"]),
                  _node("Add", [f"group_starts_{b}", f"position_offsets_{b}"], [f"rows_{b}"])]  # fmt: skip
    nodes += [_node("Concat", [f"values_{b}" for b in range(n_blocks)], ["values"], int_={"axis": 0}),
              _node("Concat", [f"rows_{b}" for b in range(n_blocks)], ["rows"], int_={"axis": 0})]  # fmt: skip
    inputs += [_value_info("queries_t", _FLOAT, ("dim", "batch"))]
    inputs += [_value_info(name, _INT64, (1,)) for name in ("one", "two", "minus_one")]
    return _model("exact_inner_product_top_k", nodes, inputs,
                  [_value_info("values", _FLOAT, ("found", "batch")), _value_info("rows", _INT64, ("found", "batch"))])  # fmt: skip


def one_call_pieces(n_rows: int, block_rows: int, group_rows: int) -> list[tuple[int, int, int]]:
    """The one-call graph's blocks as (start, rows, group_rows): blocks of ``block_rows`` rows, each cut into a part of
    whole groups of ``group_rows`` rows and, where rows are left over, a last piece that is one group of its own."""
    pieces = []
    for start in range(0, n_rows, block_rows):
        rows = min(block_rows, n_rows - start)
        whole = rows - rows % group_rows
        if whole:
            pieces.append((start, whole, group_rows))
        if rows > whole:
            pieces.append((start + whole, rows - whole, rows - whole))
    return pieces


class ExactInnerProductSearch:
    """Exact top-``k`` of queries by inner product over ``vectors`` (n, dim) float32, or over a row range of them.

    Thread-safe: concurrent searches share one onnxruntime session (one intra-op thread a run: callers choose the
    parallelism, e.g. :func:`search_in_shards`). FAISS's heap operations are OpenMP loops: a calling thread whose
    OpenMP thread count is above 1 starts a team of threads for them (the service's search threads set theirs to
    ``faiss_threads``)."""

    def __init__(self, vectors: np.ndarray, *, block_scores: int = BLOCK_SCORES,
                 one_call_block_rows: int = ONE_CALL_BLOCK_ROWS, one_call_group_rows: int = ONE_CALL_GROUP_ROWS
                 ) -> None:  # fmt: skip
        if vectors.ndim != 2 or vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
            raise ValueError(f"vectors must be a C-contiguous float32 matrix, got {vectors.dtype} {vectors.shape}")
        if min(block_scores, one_call_block_rows, one_call_group_rows) < 1:
            raise ValueError(f"block_scores, one_call_block_rows and one_call_group_rows must be at least 1, got "
                             f"{block_scores}, {one_call_block_rows}, {one_call_group_rows}")  # fmt: skip
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
        self._pieces = one_call_pieces(len(vectors), one_call_block_rows, one_call_group_rows)
        self._block_feeds: dict[str, np.ndarray] = {
            f"block_{b}": vectors[start:start + rows] for b, (start, rows, _) in enumerate(self._pieces)}
        for name, value in (("one", 1), ("two", 2), ("minus_one", -1)):
            self._block_feeds[name] = np.array([value], dtype=np.int64)
        for b, (_, rows, group_rows) in enumerate(self._pieces):
            self._block_feeds[f"groups_{b}"] = np.array([rows // group_rows], dtype=np.int64)
            self._block_feeds[f"group_rows_{b}"] = np.array([group_rows], dtype=np.int64)
        self._one_call = None if not self._pieces else ort.InferenceSession(
            top_k_graph(len(self._pieces)), sess_options=options, providers=["CPUExecutionProvider"])
        self._feeds: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}  # by k: _feeds_for

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
        """:meth:`search` over every row in one onnxruntime run (each block's best ``k`` by :func:`top_k_graph`,
        merged here), so the search returns to Python once, not after every block: for a batch searched while other
        threads want the GIL. About level with FAISS's flat search or faster up to :data:`ONE_CALL_MAX_QUERIES`
        queries and ``k`` up to :data:`ONE_CALL_MAX_K`. The same best scores as :meth:`search`; where several rows
        tie at the ``k``-th place, which of them are kept may differ (a group's maximum decides first)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 0 or self._one_call is None:  # no queries or no rows
            nothing = np.empty((len(queries), 0))
            return _best_k(nothing.astype(np.float32), nothing.astype(np.int64), k)
        feeds, offsets = self._feeds_for(k)
        values, rows = self._one_call.run(None, {**feeds, "queries_t": np.ascontiguousarray(queries.T)})
        return _best_k(np.asarray(values, dtype=np.float32).T, (np.asarray(rows, dtype=np.int64) + offsets).T, k)

    def _feeds_for(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every input of the one-call graph but the queries: the blocks and constants, each block's
        ``k_b = min(k, rows_b)`` and ``k_groups_b = min(k, groups_b)``; and the row offset of each of the graph's
        output rows (a column)."""
        cached = self._feeds.get(k)
        if cached is None:
            per_block = [min(k, rows) for _, rows, _ in self._pieces]
            feeds = dict(self._block_feeds)
            feeds.update({f"k_{b}": np.array([kb], dtype=np.int64) for b, kb in enumerate(per_block)})
            feeds.update({f"k_groups_{b}": np.array([min(k, rows // group_rows)], dtype=np.int64)
                          for b, (_, rows, group_rows) in enumerate(self._pieces)})  # fmt: skip
            starts = np.array([start for start, _, _ in self._pieces], dtype=np.int64)
            cached = (feeds, np.repeat(starts, per_block)[:, None])
            if len(self._feeds) < 64:  # a few distinct k in practice (k + seen items, doubled when short)
                self._feeds[k] = cached
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
