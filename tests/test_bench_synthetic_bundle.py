"""bench/synthetic_bundle.py writes bundles the service loads as any exported bundle (docs/bundle-format.md), with
the exporter's index: exact, or approximate with its recall recorded; and reuses a bundle it already wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bundle_format as bf
from bench.synthetic_bundle import GENERATOR_VERSION, SyntheticSpec, ensure_bundle
from service.bundle import load_bundle, plan_device


@pytest.mark.parametrize(("index", "expected_type"),
                         [("exact", "flat_ip"), ("approximate", "ivf_flat_mips"), ("approximate-ip", "ivf_flat_ip")])  # fmt: skip
def test_synthetic_bundle_loads_in_the_service_with_the_exporters_index(tmp_path: Path, index: str, expected_type: str) -> None:
    spec = SyntheticSpec(n_items=8_000, n_users=600, dim=16, index=index)  # type: ignore[arg-type]
    path, report = ensure_bundle(spec, tmp_path)
    assert report["reused"] is False
    bundle = load_bundle(path, plan=plan_device("cpu"))
    assert len(bundle.item_ids) == 8_000 and len(bundle.user_ids) == 600 and bundle.dim == 16
    assert bundle.index_type == expected_type and bundle.item_encoder is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["config"]["generator_version"] == GENERATOR_VERSION
    assert all(bf.file_sha256(path / name) == digest for name, digest in manifest["files"].items())
    if index != "exact":
        assert manifest["index"]["recall_at_20"] >= 0.95
        assert manifest["index"]["recall_queries"] == {"from": "user_vectors", "count": 600}
    lengths = np.diff(bundle.history_indptr)
    assert lengths.min() >= 1 and lengths.max() <= 50
    assert bundle.popularity.sum() == len(bundle.history_indices)  # training interaction counts
    norms = np.linalg.norm(bundle.item_vectors, axis=1)
    assert np.corrcoef(norms, np.log1p(bundle.popularity))[0, 1] > 0.3  # popular items have longer vectors


def test_ensure_bundle_reuses_a_bundle_of_the_same_spec(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_items=2_000, n_users=100, dim=8)
    first, _ = ensure_bundle(spec, tmp_path)
    again, report = ensure_bundle(spec, tmp_path)
    assert again == first and report["reused"] is True and report["build_s"] == 0.0
