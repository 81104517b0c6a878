"""bench/audit_listing.py on a small synthetic bundle: the profile bundle it derives loads in the service, every page
it times was first checked against the brute-force order (the script raises otherwise), and it writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bundle_format as bf
from bench import audit_listing


def test_the_benchmark_checks_and_times_every_page(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    argv = ["--items", "3000", "--users", "300", "--repeats", "2", "--deep", "400", "--root", str(tmp_path / "b"),
            "--out", str(out)]  # fmt: skip
    assert audit_listing.main(argv) == 0
    found = json.loads(out.read_text())
    assert found["items"] == 3000 and found["deep"] == 400 and found["first_request_page"] == audit_listing.LIMIT
    assert set(found["pages"]) == {"first_page", "deep_page", "second_modality"}
    assert set(found["after_deleting_the_deep_worst_images"]) == {
        "first_page_after_deletes", "deep_page_after_deletes", "second_modality_after_deletes"}
    assert 0 < found["listed"]["image"] < 3000 and found["meta"]["command"].startswith("python -m bench.audit_listing")


def test_the_derived_bundle_carries_the_cosines_as_the_exporter_writes_them(tmp_path: Path) -> None:
    from bench.synthetic_bundle import SyntheticSpec, ensure_bundle

    base, _ = ensure_bundle(SyntheticSpec(n_items=500, n_users=50, dim=8), tmp_path)
    base_files = {name: bf.file_sha256(base / name) for name in (bf.MANIFEST, bf.ITEM_METADATA)}
    path, cosines = audit_listing.profile_bundle(base, tmp_path / "profile", seed=1)
    manifest = json.loads((path / bf.MANIFEST).read_text())
    assert manifest[bf.PROFILE_COSINE]["modalities"] == ["image", "text"]
    assert manifest["files"][bf.ITEM_METADATA] == bf.file_sha256(path / bf.ITEM_METADATA)
    rows = [json.loads(line) for line in (path / bf.ITEM_METADATA).read_text().splitlines()]
    for m in ("image", "text"):
        written = np.array([np.nan if row[f"profile_{m}"] is None else row[f"profile_{m}"] for row in rows])
        np.testing.assert_array_equal(written, cosines[m])
    assert {name: bf.file_sha256(base / name) for name in base_files} == base_files  # the cached base is untouched
    assert (path / bf.ITEM_VECTORS).stat().st_ino == (base / bf.ITEM_VECTORS).stat().st_ino  # the rest: hard links
    values = [c for c in cosines["image"].tolist() if c == c]
    assert len(set(values)) < len(values)  # ties, for the id order among equal scores


def test_a_deep_page_beyond_the_listed_items_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        audit_listing.main(["--items", "1000", "--deep", "600"])
    with pytest.raises(SystemExit):  # under half the items, but more than the profile lists (items with interactions)
        audit_listing.main(["--items", "3000", "--users", "300", "--deep", "1400", "--root", str(tmp_path)])
    assert "the profile lists" in capsys.readouterr().err


def test_a_page_out_of_the_brute_force_order_stops_the_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    honest = audit_listing.expected_order
    monkeypatch.setattr(audit_listing, "expected_order", lambda *args: honest(*args)[::-1])
    with pytest.raises(AssertionError, match="differs from the brute-force order"):
        audit_listing.main(["--items", "3000", "--users", "300", "--repeats", "1", "--deep", "100",
                            "--root", str(tmp_path)])  # fmt: skip
