"""service.bundle applies the manifest's index parameters: an IVF bundle searches with its ``params.nprobe``."""

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

from service.bundle import load_bundle, plan_device
from service.settings import ServiceSettings
from training.export.item_index import IndexConfig, build_index

NLIST = 32
Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


@pytest.fixture(scope="module")
def ivf_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """A synthetic bundle whose index is the exporter's IVF-Flat (32 lists) over its item vectors."""
    bundle = make_bundle(tmp_path_factory.mktemp("ivf") / "bundle", seed=5, n_items=3_000, n_users=60, dim=16,
                         feature_modalities={"tags": 4})  # fmt: skip
    config = IndexConfig(approximate_threshold=0, ivf_nlist=NLIST, recall_queries=60)
    index, info = build_index(bundle.item_vectors, config, user_vectors=bundle.user_vectors)
    faiss.write_index(index, str(bundle.path / "item_index.faiss"))
    bundle.manifest["index"] = info
    write_manifest(bundle.path, bundle.manifest)
    return bundle


def _with_nprobe(bundle: SyntheticBundle, target: Path, nprobe: int) -> Path:
    shutil.copytree(bundle.path, target)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["index"]["params"]["nprobe"] = nprobe
    write_manifest(target, manifest)
    return target


def _reference_search(bundle: SyntheticBundle, nprobe: int, k: int) -> np.ndarray:
    index = faiss.read_index(str(bundle.path / "item_index.faiss"))
    faiss.downcast_index(index.index).nprobe = nprobe
    return np.asarray(index.search(bundle.user_vectors, k)[1])


@pytest.mark.parametrize("nprobe", [1, 3, 9, NLIST])
def test_load_bundle_searches_an_ivf_index_with_the_manifest_nprobe(
    ivf_bundle: SyntheticBundle, tmp_path: Path, nprobe: int
) -> None:
    loaded = load_bundle(_with_nprobe(ivf_bundle, tmp_path / "b", nprobe), plan=plan_device("cpu"))
    assert loaded.index_type == "ivf_flat_ip"
    assert faiss.downcast_index(loaded.index.index).nprobe == nprobe
    _, found = loaded.index.search(ivf_bundle.user_vectors, 20)
    np.testing.assert_array_equal(found, _reference_search(ivf_bundle, nprobe, 20))
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
