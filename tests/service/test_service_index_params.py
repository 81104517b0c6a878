"""service.bundle applies the manifest's index parameters: an IVF bundle (``ivf_flat_mips``, the default, and
``ivf_flat_ip``) searches with its ``params.nprobe``; an ``ivf_flat_mips`` index is checked against the item vectors
(its appended coordinate included) and its results are scored by exact inner products."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import faiss
import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, write_manifest
from fastapi.testclient import TestClient

from service.bundle import BundleError, load_bundle, plan_device
from service.settings import ServiceSettings
from training.export.item_index import IndexConfig, build_index, mips_queries

NLIST = 32
Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def _build_ivf_bundle(tmp_path_factory: pytest.TempPathFactory, kind: str) -> SyntheticBundle:
    """A synthetic bundle whose index is the exporter's IVF-Flat (32 lists) of that kind over its item vectors."""
    bundle = make_bundle(tmp_path_factory.mktemp(kind) / "bundle", seed=5, n_items=3_000, n_users=60, dim=16,
                         feature_modalities={"tags": 4})  # fmt: skip
    config = IndexConfig(approximate_threshold=0, approximate=kind, ivf_nlist=NLIST, recall_queries=60)  # type: ignore[arg-type]
    index, info = build_index(bundle.item_vectors, config, user_vectors=bundle.user_vectors)
    faiss.write_index(index, str(bundle.path / "item_index.faiss"))
    bundle.manifest["index"] = info
    write_manifest(bundle.path, bundle.manifest)
    return bundle


@pytest.fixture(scope="module")
def mips_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return _build_ivf_bundle(tmp_path_factory, "ivf")


@pytest.fixture(scope="module")
def ip_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return _build_ivf_bundle(tmp_path_factory, "ivf-ip")


@pytest.fixture(params=["ivf_flat_mips", "ivf_flat_ip"])
def ivf_bundle(request: pytest.FixtureRequest) -> SyntheticBundle:
    """Either kind of IVF bundle."""
    fixture = "mips_bundle" if request.param == "ivf_flat_mips" else "ip_bundle"
    bundle: SyntheticBundle = request.getfixturevalue(fixture)
    return bundle


def _with_nprobe(bundle: SyntheticBundle, target: Path, nprobe: int) -> Path:
    shutil.copytree(bundle.path, target)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["index"]["params"]["nprobe"] = nprobe
    write_manifest(target, manifest)
    return target


def _reference_search(bundle: SyntheticBundle, nprobe: int, k: int) -> np.ndarray:
    """FAISS directly on the file, then (as the service does) the candidates ordered by exact inner product."""
    assert bundle.user_vectors is not None
    index = faiss.read_index(str(bundle.path / "item_index.faiss"))
    faiss.downcast_index(index.index).nprobe = nprobe
    mips = bundle.manifest["index"]["type"] == "ivf_flat_mips"
    found = np.asarray(index.search(mips_queries(bundle.user_vectors) if mips else bundle.user_vectors, k)[1])
    if not mips:
        return found
    scores = np.where(found >= 0, np.einsum("qkd,qd->qk", bundle.item_vectors[found], bundle.user_vectors), -np.inf)
    return np.take_along_axis(found, np.argsort(-scores, axis=1, kind="stable"), axis=1)


@pytest.mark.parametrize("nprobe", [1, 3, 9, NLIST])
def test_load_bundle_searches_an_ivf_index_with_the_manifest_nprobe(
    ivf_bundle: SyntheticBundle, tmp_path: Path, nprobe: int
) -> None:
    loaded = load_bundle(_with_nprobe(ivf_bundle, tmp_path / "b", nprobe), plan=plan_device("cpu"))
    assert loaded.index_type == ivf_bundle.manifest["index"]["type"]
    assert faiss.downcast_index(loaded.index.index).nprobe == nprobe
    assert ivf_bundle.user_vectors is not None
    scores, found = loaded.search_index(ivf_bundle.user_vectors, 20)
    reference = _reference_search(ivf_bundle, nprobe, 20)
    full = (reference >= 0).all(axis=1)  # queries whose nprobe lists held 20 rows (the others: next test)
    assert full.mean() > 0.5
    np.testing.assert_array_equal(found[full], reference[full])
    assert (found >= 0).all()
    exact = np.einsum("qkd,qd->qk", ivf_bundle.item_vectors[found], ivf_bundle.user_vectors)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)  # inner products, best first
    assert (np.diff(scores, axis=1) <= 0).all()
    if nprobe == NLIST:  # every list probed: exact search
        assert ivf_bundle.user_vectors is not None
        expected = np.argsort(-(ivf_bundle.user_vectors @ ivf_bundle.item_vectors.T), axis=1, kind="stable")[:, :20]
        assert (found == expected).mean() > 0.99  # equal up to float ties
    elif nprobe > 1:  # the setting matters on this data: one probe finds other items
        assert not np.array_equal(found, _reference_search(ivf_bundle, 1, 20))


def test_ivf_bundle_filters_deleted_items_it_cannot_remove(
    make_settings: Callable[..., ServiceSettings], serve: Serve, ivf_bundle: SyntheticBundle
) -> None:
    with serve(make_settings(bundle_dir=ivf_bundle.path)) as client:
        top = [i["id"] for i in client.get("/v1/users/u3/recommendations", params={"k": 5}).json()["items"]]
        assert client.delete(f"/v1/items/{top[0]}").status_code == 200
        after = [i["id"] for i in client.get("/v1/users/u3/recommendations", params={"k": 5}).json()["items"]]
        assert top[0] not in after and after[:4] == top[1:] and len(after) == 5


def test_item_vectors_of_an_ivf_bundle_are_the_mapped_file(ivf_bundle: SyntheticBundle) -> None:
    """IVF lists hold the vectors in list order: the service serves the mapped item_vectors.npy (checked against
    the lists) and keeps no copy."""
    import mmap

    bundle = load_bundle(ivf_bundle.path, plan=plan_device("cpu"))
    base = bundle.item_vectors
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, mmap.mmap)  # a view of the mapped file, not a copy
    np.testing.assert_array_equal(bundle.item_vectors, ivf_bundle.item_vectors)


def _rewritten(bundle: SyntheticBundle, target: Path, *, manifest_index: dict | None = None,
               extra_column: Callable[[np.ndarray], np.ndarray] | None = None) -> Path:  # fmt: skip
    """A copy of the bundle with its manifest's index entry replaced, or its index's appended coordinate changed (and
    the sha256 of every file recomputed, so only the content checks can catch it)."""
    shutil.copytree(bundle.path, target)
    manifest = json.loads(json.dumps(bundle.manifest))
    if manifest_index is not None:
        manifest["index"] = manifest_index
    if extra_column is not None:
        index = faiss.read_index(str(target / "item_index.faiss"))
        inner = faiss.downcast_index(index.index)
        inner.make_direct_map()
        stored = inner.reconstruct_n(0, inner.ntotal)
        stored[:, -1] = extra_column(stored[:, -1])
        # the trained quantiser, its lists refilled with the changed rows
        rebuilt = faiss.IndexIVFFlat(faiss.downcast_index(inner.quantizer), inner.d, inner.nlist, faiss.METRIC_L2)
        rebuilt.make_direct_map()
        wrapped = faiss.IndexIDMap2(rebuilt)
        wrapped.add_with_ids(stored, np.arange(len(stored), dtype=np.int64))
        faiss.write_index(wrapped, str(target / "item_index.faiss"))
    write_manifest(target, manifest)
    return target


def test_mips_index_with_a_changed_appended_coordinate_is_refused(mips_bundle: SyntheticBundle, tmp_path: Path) -> None:
    bundle = mips_bundle
    intact = _rewritten(bundle, tmp_path / "intact", extra_column=lambda extra: extra)
    assert load_bundle(intact, plan=plan_device("cpu")).index_type == "ivf_flat_mips"  # the rewrite alone passes

    def damage(extra: np.ndarray) -> np.ndarray:
        changed = extra.copy()
        changed[7] += 0.5
        return changed

    with pytest.raises(BundleError, match=r"row 7's appended coordinate is not sqrt"):
        load_bundle(_rewritten(bundle, tmp_path / "damaged", extra_column=damage), plan=plan_device("cpu"))


@pytest.mark.parametrize("max_norm", [None, -1.0, "12", True, float("inf")])
def test_mips_index_needs_a_valid_max_norm(mips_bundle: SyntheticBundle, tmp_path: Path, max_norm: object) -> None:
    bundle = mips_bundle
    entry = json.loads(json.dumps(bundle.manifest["index"]))
    entry["params"].pop("max_norm")
    if max_norm is not None:
        entry["params"]["max_norm"] = max_norm
    with pytest.raises(BundleError, match=r"index.params.max_norm must be a finite number >= 0"):
        load_bundle(_rewritten(bundle, tmp_path / "b", manifest_index=entry), plan=plan_device("cpu"))


def test_mips_index_with_a_wrong_max_norm_is_refused(mips_bundle: SyntheticBundle, tmp_path: Path) -> None:
    bundle = mips_bundle
    entry = json.loads(json.dumps(bundle.manifest["index"]))
    entry["params"]["max_norm"] *= 1.01
    with pytest.raises(BundleError, match=r"row 0's appended coordinate"):
        load_bundle(_rewritten(bundle, tmp_path / "b", manifest_index=entry), plan=plan_device("cpu"))


def test_an_index_entry_of_another_kind_is_refused_by_name(ivf_bundle: SyntheticBundle, tmp_path: Path) -> None:
    entry = {**ivf_bundle.manifest["index"], "type": "ivf_pq"}
    with pytest.raises(BundleError, match=r"index.type 'ivf_pq' is not supported \(one of flat_ip, ivf_flat_mips"):
        load_bundle(_rewritten(ivf_bundle, tmp_path / "b", manifest_index=entry), plan=plan_device("cpu"))


def test_an_index_declared_as_the_other_ivf_kind_is_refused(mips_bundle: SyntheticBundle, ip_bundle: SyntheticBundle,
                                                            tmp_path: Path) -> None:  # fmt: skip
    entry = {**ip_bundle.manifest["index"], "type": "ivf_flat_mips"}  # no appended coordinate in its lists
    entry["params"] = {**entry["params"], "max_norm": 1.0}
    with pytest.raises(BundleError, match=r"holds 3000 vectors of dim 16, expected 3000 of 17 \(index type ivf_flat_mips"):
        load_bundle(_rewritten(ip_bundle, tmp_path / "a", manifest_index=entry), plan=plan_device("cpu"))
    entry = {**mips_bundle.manifest["index"], "type": "ivf_flat_ip"}  # its lists hold one coordinate more
    with pytest.raises(BundleError, match=r"holds 3000 vectors of dim 17, expected 3000 of 16"):
        load_bundle(_rewritten(mips_bundle, tmp_path / "b", manifest_index=entry), plan=plan_device("cpu"))


def test_an_inner_product_kind_holding_an_l2_index_is_refused(ip_bundle: SyntheticBundle, tmp_path: Path) -> None:
    target = _rewritten(ip_bundle, tmp_path / "b")
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(16))  # the right vectors and ids, ranked by distance
    l2.add_with_ids(ip_bundle.item_vectors, np.arange(len(ip_bundle.item_vectors), dtype=np.int64))
    faiss.write_index(l2, str(target / "item_index.faiss"))
    write_manifest(target, {**json.loads(json.dumps(ip_bundle.manifest)), "index": {"type": "flat_ip"}})
    with pytest.raises(BundleError, match=r"index type flat_ip ranks by inner product, but the index's metric is L2"):
        load_bundle(target, plan=plan_device("cpu"))


def test_a_flat_kind_holding_another_index_is_refused(ip_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """flat_ip is searched exactly (and split by rows): an approximate index under that name is refused."""
    target = _rewritten(ip_bundle, tmp_path / "b")
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(ip_bundle.item_vectors, np.arange(len(ip_bundle.item_vectors), dtype=np.int64))
    faiss.write_index(hnsw, str(target / "item_index.faiss"))
    write_manifest(target, {**json.loads(json.dumps(ip_bundle.manifest)), "index": {"type": "flat_ip"}})
    with pytest.raises(BundleError, match=r"index type flat_ip must be a flat index, got IndexHNSWFlat"):
        load_bundle(target, plan=plan_device("cpu"))


@pytest.mark.parametrize("k", [20, 200, 3_000])
def test_ivf_search_returns_k_rows_when_the_probed_lists_hold_fewer(ivf_bundle: SyntheticBundle, tmp_path: Path,
                                                                   k: int) -> None:  # fmt: skip
    """One list probed holds ~94 of the 3,000 rows: the short queries are searched again with more lists, so every
    query gets k rows (all of them when k is the catalogue), the best ones by inner product among those found."""
    assert ivf_bundle.user_vectors is not None
    loaded = load_bundle(_with_nprobe(ivf_bundle, tmp_path / "b", 1), plan=plan_device("cpu"))
    raw = faiss.read_index(str(ivf_bundle.path / "item_index.faiss"))
    faiss.downcast_index(raw.index).nprobe = 1
    mips = ivf_bundle.manifest["index"]["type"] == "ivf_flat_mips"
    first = np.asarray(raw.search(mips_queries(ivf_bundle.user_vectors) if mips else ivf_bundle.user_vectors, k)[1])
    if k > 20:
        assert ((first >= 0).sum(axis=1) < k).any()  # one probe alone leaves queries short
    scores, rows = loaded.search_index(ivf_bundle.user_vectors, k)
    assert (rows >= 0).all() and all(len(set(r.tolist())) == k for r in rows)
    exact = np.einsum("qkd,qd->qk", ivf_bundle.item_vectors[rows], ivf_bundle.user_vectors)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
    if k == 3_000:  # every row: the exact order
        expected = np.sort(ivf_bundle.user_vectors @ ivf_bundle.item_vectors.T, axis=1)[:, ::-1]
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_ivf_recommendations_have_k_items_when_the_probed_lists_hold_fewer(
    make_settings: Callable[..., ServiceSettings], serve: Serve, ivf_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    bundle = _with_nprobe(ivf_bundle, tmp_path / "b", 1)
    with serve(make_settings(bundle_dir=bundle)) as client:
        for user in ("u0", "u7", "u31"):
            answer = client.get(f"/v1/users/{user}/recommendations", params={"k": 100})
            assert answer.status_code == 200 and len(answer.json()["items"]) == 100


def test_an_ivf_index_without_search_parameters_scores_its_short_queries_exactly(
    ivf_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU index takes no per-search nprobe: the short queries are then scored against every item (faiss.knn)."""
    assert ivf_bundle.user_vectors is not None
    loaded = load_bundle(_with_nprobe(ivf_bundle, tmp_path / "b", 1), plan=plan_device("cpu"))

    def no_parameters() -> None:
        raise TypeError("this index takes no search parameters")

    monkeypatch.setattr(faiss, "SearchParametersIVF", no_parameters)
    scores, rows = loaded.search_index(ivf_bundle.user_vectors, 200)
    assert (rows >= 0).all()
    exact = ivf_bundle.user_vectors @ ivf_bundle.item_vectors.T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
