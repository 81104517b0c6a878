"""Exact search over item vectors (service/exact_search.py): onnxruntime's MatMul in row blocks into FAISS's heaps,
against brute-force numpy in float64 and against FAISS's own flat search; a bundle scans its flat index's row ranges with it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
from bundle_factory import SyntheticBundle

import service.bundle as service_bundle
from service.bundle import load_bundle, plan_device
from service.exact_search import ONE_CALL_MAX_QUERIES, ExactInnerProductSearch


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order + start


@pytest.mark.parametrize("block", [1, 40, 1000, 10**6])
@pytest.mark.parametrize("k", [1, 5, 64, 300, 310])
@pytest.mark.parametrize("whole", [False, True])
def test_search_equals_brute_force_for_every_block_size(block: int, k: int, whole: bool) -> None:
    """300 rows, k from 1 to every row and beyond (padded), by the block loop (``search``, blocks of ``block``
    scores: 1 row to every row a run) and in one run (``search_whole``, blocks of ``block`` rows, the last one
    shorter than k or a single block)."""
    rng = np.random.default_rng(block * 1000 + k)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(9, 16)).astype(np.float32)
    search = ExactInnerProductSearch(vectors, block_scores=block, one_call_block_rows=block)
    scores, rows = search.search_whole(queries, k) if whole else search.search(queries, k)
    found = min(k, 300)
    expected_scores, expected_rows = _brute_force(vectors, queries, found)
    assert scores.shape == rows.shape == (9, k) and scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows[:, :found], expected_rows)
    np.testing.assert_allclose(scores[:, :found], expected_scores, rtol=1e-5, atol=1e-5)
    assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


@pytest.mark.parametrize(("start", "stop", "k"), [(37, 81, 10), (2, 9, 20), (4, 4, 3)])
def test_a_row_range_is_searched_alone_and_padded_where_it_holds_fewer_than_k_rows(start: int, stop: int, k: int) -> None:
    """Rows are numbered in the whole matrix; a range of fewer than k rows (7 rows for k = 20, an empty one) is
    padded with rows -1 and scores -inf."""
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(100, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    scores, rows = ExactInnerProductSearch(vectors, block_scores=6).search(queries, k, start=start, stop=stop)
    found = min(k, stop - start)
    expected_scores, expected_rows = _brute_force(vectors[start:stop], queries, found, start=start)
    np.testing.assert_array_equal(rows[:, :found], expected_rows)
    np.testing.assert_allclose(scores[:, :found], expected_scores, rtol=1e-5, atol=1e-5)
    assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


def test_duplicate_vectors_are_each_found_once_equal_scores_lowest_row_first() -> None:
    """Rows with the same vector: the k best scores are brute force's, every row once, each with its own product;
    equal returned scores come lowest row first. (Which of several tied rows fill the last places is not fixed: the
    matrix kernel may round the same product differently by a row's place in a block.)"""
    rng = np.random.default_rng(3)
    distinct = rng.normal(size=(2, 4)).astype(np.float32)
    vectors = distinct[rng.integers(0, 2, size=30)]
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    for block, whole in ((1, False), (4, False), (30, False), (4, True), (7, True), (30, True)):
        search = ExactInnerProductSearch(vectors, block_scores=block, one_call_block_rows=block)
        for k in (1, 5, 17, 30):
            scores, rows = search.search_whole(queries, k) if whole else search.search(queries, k)
            expected_scores, _ = _brute_force(vectors, queries, k)
            np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
            for q in range(len(queries)):
                assert len(set(rows[q].tolist())) == k
                np.testing.assert_allclose(scores[q], vectors[rows[q]] @ queries[q], rtol=1e-5, atol=1e-5)
                for a in range(k - 1):
                    assert scores[q, a] > scores[q, a + 1] or rows[q, a] < rows[q, a + 1]


def test_search_equals_faiss_flat_search() -> None:
    """FAISS's IndexFlatIP's answer on clustered vectors: the same scores within float32 rounding, the same rows
    but where two neighbours score within that rounding."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(20, 32)).astype(np.float32)
    vectors = (centres[rng.integers(0, 20, size=5000)] + 0.3 * rng.normal(size=(5000, 32))).astype(np.float32)
    queries = rng.normal(size=(17, 32)).astype(np.float32)
    index = faiss.IndexFlatIP(32)
    index.add(vectors)
    expected_scores, expected_rows = index.search(queries, 40)
    scores, rows = ExactInnerProductSearch(vectors, block_scores=1024).search(queries, 40)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)
    assert (rows == expected_rows).mean() > 0.99  # the rest: neighbours within float32 rounding, swapped
    for q in range(len(queries)):
        np.testing.assert_allclose(scores[q], vectors[rows[q]] @ queries[q], rtol=1e-5, atol=1e-4)


def test_vectors_are_not_copied_and_bad_arguments_are_refused() -> None:
    vectors = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)
    search = ExactInnerProductSearch(vectors)
    assert search.vectors is vectors
    assert search.search(np.zeros((0, 4), dtype=np.float32), 3)[1].shape == (0, 3)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ExactInnerProductSearch(vectors.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ExactInnerProductSearch(np.asfortranarray(vectors))
    assert search.search_whole(np.zeros((0, 4), dtype=np.float32), 3)[1].shape == (0, 3)
    nan_query = np.full((1, 4), np.nan, dtype=np.float32)
    for found in (search.search(nan_query, 3), search.search_whole(nan_query, 3)):  # nothing found, as FAISS finds
        assert (found[1] == -1).all() and np.isneginf(found[0]).all()
    with pytest.raises(ValueError, match="block_scores"):
        ExactInnerProductSearch(vectors, block_scores=0)
    with pytest.raises(ValueError, match="one_call_block_rows"):
        ExactInnerProductSearch(vectors, one_call_block_rows=0)
    with pytest.raises(ValueError, match="k must be"):
        search.search_whole(vectors[:1], 0)
    with pytest.raises(ValueError, match="row range"):
        search.search(vectors[:1], 3, start=5, stop=11)
    with pytest.raises(ValueError, match="k must be"):
        search.search(vectors[:1], 0)


def test_a_flat_bundle_scans_row_ranges_with_it_over_the_index_storage(features_bundle: SyntheticBundle,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Through the bundle: its row-range scan is this search over the item vectors the index holds (not a copy),
    called for every shard, and equals brute force, k above the catalogue (120 rows) included."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 30)
    loaded = load_bundle(features_bundle.path, plan=plan_device("cpu"))
    assert loaded.exact_search is not None and loaded.exact_search.vectors is loaded.item_vectors
    calls: list[tuple[int, int]] = []
    original = ExactInnerProductSearch.search

    def counted(self: ExactInnerProductSearch, queries: np.ndarray, k: int, *, start: int = 0, stop: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        calls.append((start, self.n_rows if stop is None else stop))
        return original(self, queries, k, start=start, stop=stop)

    monkeypatch.setattr(ExactInnerProductSearch, "search", counted)
    users = features_bundle.user_vectors
    assert users is not None
    with ThreadPoolExecutor(2) as pool:
        for k in (1, 20, 120, 130):
            calls.clear()
            scores, rows = loaded.search_index(users, k, pool=pool, shards=2)
            assert sorted(calls) == [(0, 60), (60, 120)]
            found = min(k, 120)
            expected_scores, expected_rows = _brute_force(features_bundle.item_vectors, users, found)
            np.testing.assert_array_equal(rows[:, :found], expected_rows)
            np.testing.assert_allclose(scores[:, :found], expected_scores, rtol=1e-5, atol=1e-5)
            assert rows.shape == (len(users), k) and (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


def test_a_flat_bundle_searches_small_batches_in_one_run_and_larger_ones_with_faiss(features_bundle: SyntheticBundle,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Without a pool (a batch under load): up to ONE_CALL_MAX_QUERIES queries by ``search_whole``, more by FAISS;
    both equal brute force."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 30)
    loaded = load_bundle(features_bundle.path, plan=plan_device("cpu"))
    assert loaded.exact_search is not None
    whole: list[int] = []
    original = ExactInnerProductSearch.search_whole

    def counted(self: ExactInnerProductSearch, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        whole.append(len(queries))
        return original(self, queries, k)

    monkeypatch.setattr(ExactInnerProductSearch, "search_whole", counted)
    users = features_bundle.user_vectors
    assert users is not None and len(users) > ONE_CALL_MAX_QUERIES
    for batch in (1, ONE_CALL_MAX_QUERIES, len(users)):
        scores, rows = loaded.search_index(users[:batch], 20)
        expected_scores, expected_rows = _brute_force(features_bundle.item_vectors, users[:batch], 20)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert whole == [1, ONE_CALL_MAX_QUERIES]


def test_the_hand_written_scores_graph_is_the_one_onnx_helper_builds() -> None:
    """service/exact_search.py writes its ONNX model as protobuf bytes (the service does not import onnx): the bytes
    pass onnx's full check and equal, message for message, the model onnx.helper makes of the same graph."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from service.exact_search import scores_graph

    written = onnx.load_from_string(scores_graph())
    onnx.checker.check_model(written, full_check=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["vectors", "queries_t"], ["row_scores"]),
         helper.make_node("Transpose", ["row_scores"], ["scores"], perm=[1, 0])],
        "exact_inner_product_scores",
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["rows", "dim"]),
         helper.make_tensor_value_info("queries_t", TensorProto.FLOAT, ["dim", "batch"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "rows"])],
    )  # fmt: skip
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert written == built


def test_the_hand_written_top_k_graph_is_the_one_onnx_helper_builds() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from service.exact_search import top_k_graph

    written = onnx.load_from_string(top_k_graph(2))
    onnx.checker.check_model(written, full_check=True)
    nodes, inputs = [], []
    for b in range(2):
        inputs += [helper.make_tensor_value_info(f"block_{b}", TensorProto.FLOAT, [f"rows_{b}", "dim"]),
                   helper.make_tensor_value_info(f"k_{b}", TensorProto.INT64, [1])]
        nodes += [helper.make_node("MatMul", [f"block_{b}", "queries_t"], [f"row_scores_{b}"]),
                  helper.make_node("Transpose", [f"row_scores_{b}"], [f"scores_{b}"], perm=[1, 0]),
                  helper.make_node("TopK", [f"scores_{b}", f"k_{b}"], [f"values_{b}", f"rows_{b}"], axis=1)]  # fmt: skip
    nodes += [helper.make_node("Concat", ["values_0", "values_1"], ["values"], axis=1),
              helper.make_node("Concat", ["rows_0", "rows_1"], ["rows"], axis=1)]  # fmt: skip
    inputs.append(helper.make_tensor_value_info("queries_t", TensorProto.FLOAT, ["dim", "batch"]))
    graph = helper.make_graph(nodes, "exact_inner_product_top_k", inputs,
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", "found"]),
                               helper.make_tensor_value_info("rows", TensorProto.INT64, ["batch", "found"])])  # fmt: skip
    assert written == helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
