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
from service.exact_search import ONE_CALL_MAX_K, ONE_CALL_MAX_QUERIES, ExactInnerProductSearch


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order + start


@pytest.mark.parametrize("block", [1, 40, 1000, 10**6])
@pytest.mark.parametrize("k", [1, 5, 64, 300, 310])
@pytest.mark.parametrize(("whole", "group_rows"), [(False, 16), (True, 1), (True, 7), (True, 16)])
def test_search_equals_brute_force_for_every_block_size(block: int, k: int, whole: bool, group_rows: int) -> None:
    """300 rows, k from 1 to every row and beyond (padded), by the block loop (``search``, blocks of ``block``
    scores: 1 row to every row a run) and in one run (``search_whole``, blocks of ``block`` rows, the last one
    shorter than k or a single block, in groups of ``group_rows`` rows with a piece of the rest)."""
    rng = np.random.default_rng(block * 1000 + k)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(9, 16)).astype(np.float32)
    search = ExactInnerProductSearch(vectors, block_scores=block, one_call_block_rows=block,
                                     one_call_group_rows=group_rows)  # fmt: skip
    scores, rows = search.search_whole(queries, k) if whole else search.search(queries, k)
    found = min(k, 300)
    expected_scores, expected_rows = _brute_force(vectors, queries, found)
    assert scores.shape == rows.shape == (9, k) and scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows[:, :found], expected_rows)
    np.testing.assert_allclose(scores[:, :found], expected_scores, rtol=1e-5, atol=1e-5)
    assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


@pytest.mark.parametrize("group_rows", [4, 16, 64])
def test_one_run_finds_the_best_rows_when_they_crowd_into_few_groups(group_rows: int) -> None:
    """The one-run graph keeps a block's k best groups by their maxima, then the best k rows of those: exact even when
    the best rows are consecutive (all in one or two groups) and the other groups' maxima come next."""
    rng = np.random.default_rng(group_rows)
    vectors = rng.normal(scale=0.1, size=(512, 8)).astype(np.float32)
    query = np.zeros((1, 8), dtype=np.float32)
    query[0, 0] = 1.0
    vectors[100:140, 0] = np.linspace(5.0, 4.0, 40)  # the 40 best rows, consecutive
    vectors[::group_rows, 0] += 1.0  # every group's first row a runner-up maximum
    search = ExactInnerProductSearch(vectors, one_call_block_rows=256, one_call_group_rows=group_rows)
    for k in (10, 40, 60):
        scores, rows = search.search_whole(query, k)
        expected_scores, expected_rows = _brute_force(vectors, query, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


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
    """Without a pool (a batch under load): up to ONE_CALL_MAX_QUERIES queries asking up to ONE_CALL_MAX_K rows by
    ``search_whole``, more queries or rows by FAISS; both equal brute force."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 30)
    loaded = load_bundle(features_bundle.path, plan=plan_device("cpu"))
    assert loaded.exact_search is not None
    whole: list[int] = []
    original = ExactInnerProductSearch.search_whole

    def counted(self: ExactInnerProductSearch, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        whole.append(len(queries))
        return original(self, queries, k)

    monkeypatch.setattr(ExactInnerProductSearch, "search_whole", counted)
    dim = features_bundle.item_vectors.shape[1]
    users = np.random.default_rng(0).normal(size=(ONE_CALL_MAX_QUERIES + 5, dim)).astype(np.float32)
    k_above = min(ONE_CALL_MAX_K + 1, len(features_bundle.item_vectors))
    assert k_above > ONE_CALL_MAX_K  # the bundle holds enough rows to ask for more than the one run takes
    for batch, k in ((1, 20), (ONE_CALL_MAX_QUERIES, 20), (len(users), 20), (2, ONE_CALL_MAX_K), (2, k_above)):
        scores, rows = loaded.search_index(users[:batch], k)
        expected_scores, expected_rows = _brute_force(features_bundle.item_vectors, users[:batch], k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert whole == [1, ONE_CALL_MAX_QUERIES, 2]  # too many queries, or too many rows asked: FAISS


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
    nodes = [helper.make_node("Shape", ["queries_t"], ["query_shape"]),
             helper.make_node("Slice", ["query_shape", "one", "two"], ["batch"]),
             helper.make_node("Concat", ["minus_one", "batch"], ["candidates_shape"], axis=0)]  # fmt: skip
    inputs = []
    for b in range(2):
        groups, group_rows, k_groups, k = f"groups_{b}", f"group_rows_{b}", f"k_groups_{b}", f"k_{b}"
        inputs += [helper.make_tensor_value_info(f"block_{b}", TensorProto.FLOAT, [f"rows_{b}", "dim"])]
        inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, [1]) for name in (groups, group_rows, k_groups, k)]
        nodes += [helper.make_node("MatMul", [f"block_{b}", "queries_t"], [f"row_scores_{b}"]),
                  helper.make_node("Concat", [groups, group_rows, "batch"], [f"grouped_shape_{b}"], axis=0),
                  helper.make_node("Reshape", [f"row_scores_{b}", f"grouped_shape_{b}"], [f"grouped_{b}"]),
                  helper.make_node("ReduceMax", [f"grouped_{b}", "one"], [f"group_max_{b}"], keepdims=0),
                  helper.make_node("TopK", [f"group_max_{b}", k_groups], [f"best_group_max_{b}", f"best_groups_{b}"],
                                   axis=0),
                  helper.make_node("Unsqueeze", [f"best_groups_{b}", "one"], [f"best_groups_3d_{b}"]),
                  helper.make_node("Concat", [k_groups, group_rows, "batch"], [f"gather_shape_{b}"], axis=0),
                  helper.make_node("Expand", [f"best_groups_3d_{b}", f"gather_shape_{b}"], [f"gather_index_{b}"]),
                  helper.make_node("GatherElements", [f"grouped_{b}", f"gather_index_{b}"], [f"candidates_{b}"], axis=0),
                  helper.make_node("Reshape", [f"candidates_{b}", "candidates_shape"], [f"candidate_scores_{b}"]),
                  helper.make_node("TopK", [f"candidate_scores_{b}", k], [f"values_{b}", f"positions_{b}"], axis=0),
                  helper.make_node("Div", [f"positions_{b}", group_rows], [f"position_groups_{b}"]),
                  helper.make_node("Mod", [f"positions_{b}", group_rows], [f"position_offsets_{b}"]),
                  helper.make_node("GatherElements", [f"best_groups_{b}", f"position_groups_{b}"], [f"row_groups_{b}"],
                                   axis=0),
                  helper.make_node("Mul", [f"row_groups_{b}", group_rows], [f"group_starts_{b}"]),
                  helper.make_node("Add", [f"group_starts_{b}", f"position_offsets_{b}"], [f"rows_{b}"])]  # fmt: skip
    nodes += [helper.make_node("Concat", ["values_0", "values_1"], ["values"], axis=0),
              helper.make_node("Concat", ["rows_0", "rows_1"], ["rows"], axis=0)]  # fmt: skip
    inputs.append(helper.make_tensor_value_info("queries_t", TensorProto.FLOAT, ["dim", "batch"]))
    inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, [1]) for name in ("one", "two", "minus_one")]
    graph = helper.make_graph(nodes, "exact_inner_product_top_k", inputs,
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["found", "batch"]),
                               helper.make_tensor_value_info("rows", TensorProto.INT64, ["found", "batch"])])  # fmt: skip
    assert written == helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
