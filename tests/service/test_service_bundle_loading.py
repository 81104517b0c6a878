"""service.bundle: a bundle is verified (format, version, hashes, shapes) before anything is served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, write_manifest

from service.bundle import CPU_PROVIDER, BundleError, load_bundle, plan_device

CPU = plan_device("cpu")


@pytest.fixture
def bundle_copy(tmp_path: Path, features_bundle: SyntheticBundle) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(features_bundle.path, target)
    return target


def _edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_load_bundle_reads_arrays_index_and_graphs(features_bundle: SyntheticBundle) -> None:
    bundle = load_bundle(features_bundle.path, plan=CPU)
    assert bundle.version == features_bundle.version
    assert list(bundle.item_ids) == features_bundle.item_ids and list(bundle.user_ids) == features_bundle.user_ids
    np.testing.assert_array_equal(bundle.item_vectors, features_bundle.item_vectors)
    assert bundle.index.ntotal == len(features_bundle.item_ids)
    assert sorted(bundle.modalities) == ["audio", "tags"]
    assert bundle.item_encoder is not None and bundle.item_encoder.extra_outputs == {"quality_logit": "quality"}
    for user_row, rows in enumerate(features_bundle.history):
        assert bundle.training_history(user_row).tolist() == rows


def test_load_bundle_refuses_a_modified_file_naming_it(bundle_copy: Path) -> None:
    vectors = np.load(bundle_copy / "item_vectors.npy")
    np.save(bundle_copy / "item_vectors.npy", vectors + 1.0)
    with pytest.raises(BundleError, match=r"item_vectors\.npy: sha256 differs"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_a_listed_file_that_is_missing(bundle_copy: Path) -> None:
    (bundle_copy / "popularity.npy").unlink()
    with pytest.raises(BundleError, match=r"popularity\.npy is listed in manifest\.json but missing"):
        load_bundle(bundle_copy, plan=CPU)


@pytest.mark.parametrize("version", [3, 0, "1"])
def test_load_bundle_refuses_an_unknown_format_version_naming_both(bundle_copy: Path, version: object) -> None:
    _edit_manifest(bundle_copy, format_version=version)
    with pytest.raises(BundleError, match=rf"format_version {version!r} is not supported .*supports 1, 2"):
        load_bundle(bundle_copy, plan=CPU)


def _without_encoder_kinds(path: Path, *, format_version: int) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["modalities"].values():
        entry.pop("encoder_kind", None)
    _edit_manifest(path, modalities=manifest["modalities"], format_version=format_version)


def test_load_bundle_reads_a_format_1_bundle_telling_encoders_apart_by_their_keys(
    tmp_path: Path, content_bundle: SyntheticBundle
) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, target)
    _without_encoder_kinds(target, format_version=1)
    bundle = load_bundle(target, plan=CPU)
    assert bundle.text_modality is not None and bundle.text_modality.name == "text"
    assert bundle.image_modality is not None and bundle.image_modality.name == "image"


def test_load_bundle_refuses_a_format_2_encoder_without_its_kind(tmp_path: Path, content_bundle: SyntheticBundle) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, target)
    _without_encoder_kinds(target, format_version=2)
    with pytest.raises(BundleError, match=r"modalities\.(image|text): encoder_kind must be one of text, image, got None"):
        load_bundle(target, plan=CPU)


def _with_text_precision(path: Path, precision: object, *, modality: str = "text") -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["modalities"][modality]["onnx_precision"] = precision
    _edit_manifest(path, modalities=manifest["modalities"])


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_load_bundle_reads_the_text_encoder_precision(tmp_path: Path, content_bundle: SyntheticBundle, precision: str) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, target)
    _with_text_precision(target, precision)
    bundle = load_bundle(target, plan=CPU)
    assert bundle.modalities["text"].encoder_precision == precision
    assert bundle.modalities["image"].encoder_precision == "fp32"  # no field: fp32


@pytest.mark.parametrize("precision", ["fp32", "int8-static"])
def test_load_bundle_reads_the_image_encoder_precision(tmp_path: Path, content_bundle: SyntheticBundle, precision: str) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, target)
    _with_text_precision(target, precision, modality="image")
    bundle = load_bundle(target, plan=CPU)
    assert bundle.modalities["image"].encoder_precision == precision
    assert bundle.modalities["text"].encoder_precision == "fp32"  # no field: fp32


def test_load_bundle_without_precision_fields_reads_fp32_encoders_and_none_for_feature_modalities(
    content_bundle: SyntheticBundle,
) -> None:
    manifest = json.loads((content_bundle.path / "manifest.json").read_text())
    assert all("onnx_precision" not in entry for entry in manifest["modalities"].values())  # as bundles before it
    bundle = load_bundle(content_bundle.path, plan=CPU)
    assert {name: m.encoder_precision for name, m in bundle.modalities.items()} == {
        name: ("fp32" if entry.get("encoder_onnx") else None) for name, entry in manifest["modalities"].items()
    }


@pytest.mark.parametrize("precision", ["fp16", "int8", None])
def test_load_bundle_refuses_an_unknown_text_encoder_precision(tmp_path: Path, content_bundle: SyntheticBundle,
                                                               precision: object) -> None:  # fmt: skip
    target = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, target)
    _with_text_precision(target, precision)
    with pytest.raises(BundleError, match=rf"modalities\.text: onnx_precision must be one of fp32, int8-dynamic, int8-static, got {precision!r}"):
        load_bundle(target, plan=CPU)


def test_load_bundle_reads_which_trained_items_have_each_modality(features_bundle: SyntheticBundle) -> None:
    bundle = load_bundle(features_bundle.path, plan=CPU)
    for name, modality in bundle.modalities.items():
        assert modality.present is not None
        np.testing.assert_array_equal(modality.present, np.load(features_bundle.path / f"item_features/{name}.mask.npy"))


def test_load_bundle_refuses_another_format(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, format="something-else")
    with pytest.raises(BundleError, match="format is 'something-else', expected 'mmrec-bundle'"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path, plan=CPU)


def test_load_bundle_refuses_vectors_of_the_wrong_shape(bundle_copy: Path) -> None:
    np.save(bundle_copy / "item_vectors.npy", np.zeros((3, 16), dtype=np.float32))
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))
    with pytest.raises(BundleError, match=r"item_vectors\.npy: shape \(3, 16\), expected \(120, 16\)"):
        load_bundle(bundle_copy, plan=CPU)


def _flip_bytes_in_the_index_vectors(bundle: Path, row: int) -> None:
    """Flip bytes inside the float32 payload of the FAISS index (row ``row``), then recompute every sha256: the
    index passes the hash check and FAISS reads it."""
    vectors = np.load(bundle / "item_vectors.npy")
    data = bytearray((bundle / "item_index.faiss").read_bytes())
    start = bytes(data).find(vectors.tobytes())
    assert start > 0, "the index stores the vectors verbatim"
    offset = start + vectors[:row].nbytes + 5
    data[offset : offset + 3] = bytes(b ^ 0x5A for b in data[offset : offset + 3])
    (bundle / "item_index.faiss").write_bytes(bytes(data))
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))


@pytest.mark.parametrize("row", [0, 77, 119])
def test_load_bundle_refuses_an_index_whose_vectors_were_flipped_under_a_recomputed_sha256(bundle_copy: Path, row: int) -> None:
    _flip_bytes_in_the_index_vectors(bundle_copy, row)
    import faiss

    assert faiss.read_index(str(bundle_copy / "item_index.faiss")).ntotal == 120  # FAISS itself sees nothing wrong
    with pytest.raises(BundleError, match=rf"item_index\.faiss: its vectors differ from item_vectors\.npy \(first at row {row}\)"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_a_flipped_hnsw_index(tmp_path: Path, sequence_bundle: SyntheticBundle) -> None:
    target = tmp_path / "hnsw"
    shutil.copytree(sequence_bundle.path, target)
    _flip_bytes_in_the_index_vectors(target, 3)
    with pytest.raises(BundleError, match=r"item_index\.faiss: its vectors differ from item_vectors\.npy \(first at row 3\)"):
        load_bundle(target, plan=CPU)


def test_load_bundle_refuses_an_index_built_from_other_vectors(bundle_copy: Path) -> None:
    import faiss

    vectors = np.load(bundle_copy / "item_vectors.npy")
    other = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    other.add_with_ids(vectors[::-1].copy(), np.arange(len(vectors), dtype=np.int64))  # same rows, other order
    faiss.write_index(other, str(bundle_copy / "item_index.faiss"))
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))
    with pytest.raises(BundleError, match=r"item_index\.faiss: its vectors differ from item_vectors\.npy \(first at row 0\)"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_an_index_type_it_cannot_check(bundle_copy: Path) -> None:
    import faiss

    vectors = np.load(bundle_copy / "item_vectors.npy")
    quantised = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT))
    quantised.train(vectors)
    quantised.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.write_index(quantised, str(bundle_copy / "item_index.faiss"))
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))
    with pytest.raises(BundleError, match=r"item_index\.faiss: an index of type IndexScalarQuantizer cannot be checked against item_vectors\.npy"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_a_file_outside_the_bundle(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["../elsewhere.npy"] = "0" * 64
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle directory"):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_refuses_an_item_encoder_without_a_declared_input(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["item_encoder"]["inputs"][0]["name"] = "not_in_graph"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="item_encoder.onnx: the graph has no input named not_in_graph"):
        load_bundle(bundle_copy, plan=CPU)


@pytest.mark.parametrize(("labels", "message"), [
    ({"not_an_output": ["a"]}, "extra_output_labels names 'not_an_output', which is not in extra_outputs"),
    ({"quality_logit": []}, r"extra_output_labels\['quality_logit'\] must be a non-empty list of strings"),
    ({"quality_logit": "high"}, r"extra_output_labels\['quality_logit'\] must be a non-empty list of strings"),
])
def test_load_bundle_refuses_malformed_extra_output_labels(bundle_copy: Path, labels: object, message: str) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["item_encoder"]["extra_outputs"] = {"quality_logit": "quality"}
    manifest["item_encoder"]["extra_output_labels"] = labels
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy, plan=CPU)


def test_load_bundle_accepts_a_bundle_without_item_encoder(tmp_path: Path) -> None:
    built = make_bundle(tmp_path / "b", seed=5, n_items=30, n_users=5, feature_modalities={})
    assert built.manifest["item_encoder"] is None and built.manifest["modalities"] == {}
    bundle = load_bundle(built.path, plan=CPU)
    assert bundle.item_encoder is None and bundle.modalities == {}


def test_plan_device_cpu_uses_only_the_cpu_provider() -> None:
    plan = plan_device("cpu")
    assert plan.device == "cpu" and plan.ort_providers == (CPU_PROVIDER,) and plan.faiss_gpu is False


def test_plan_device_cuda_without_cuda_provider_names_the_problem() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(BundleError, match="device=cuda but onnxruntime offers no CUDAExecutionProvider"):
        plan_device("cuda")


# --- one read per file: vectors held once, hashes checked alongside loading ------------------------------------------


def test_item_vectors_are_the_flat_index_own_storage(features_bundle: SyntheticBundle) -> None:
    import faiss

    bundle = load_bundle(features_bundle.path, plan=CPU)
    storage = faiss.rev_swig_ptr(faiss.downcast_index(bundle.index.index).get_xb(), 1)
    assert bundle.item_vectors.__array_interface__["data"][0] == storage.__array_interface__["data"][0]  # no copy
    assert not bundle.item_vectors.flags.writeable
    np.testing.assert_array_equal(bundle.item_vectors, features_bundle.item_vectors)


@pytest.mark.parametrize("name", ["item_vectors.npy", "item_metadata.jsonl", "item_index.faiss", "item_ids.json"])
def test_a_file_changed_under_the_manifest_is_named_whichever_reader_sees_it(bundle_copy: Path, name: str) -> None:
    data = bytearray((bundle_copy / name).read_bytes())
    data[-3] ^= 0x01  # one bit near the end: a float, a character, an index byte, a digit of an id
    (bundle_copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"bundle file {name}: sha256 differs from manifest\.json"):
        load_bundle(bundle_copy, plan=CPU)


def test_item_vectors_that_differ_from_the_index_are_found_without_hashes(bundle_copy: Path) -> None:
    vectors = np.load(bundle_copy / "item_vectors.npy")
    vectors[41, 3] = np.nextafter(vectors[41, 3], np.float32(np.inf))  # one ulp
    np.save(bundle_copy / "item_vectors.npy", vectors)
    with pytest.raises(BundleError, match=r"its vectors differ from item_vectors\.npy \(first at row 41\)"):
        load_bundle(bundle_copy, plan=CPU, verify_hashes=False)


def test_a_truncated_item_vectors_file_is_refused(bundle_copy: Path) -> None:
    data = (bundle_copy / "item_vectors.npy").read_bytes()
    (bundle_copy / "item_vectors.npy").write_bytes(data[:-100])
    with pytest.raises(BundleError, match=r"item_vectors\.npy: the file ends before row 120 \(truncated\)"):
        load_bundle(bundle_copy, plan=CPU, verify_hashes=False)
    with pytest.raises(BundleError, match=r"bundle file item_vectors\.npy: sha256 differs"):
        load_bundle(bundle_copy, plan=CPU)


def test_float64_item_vectors_are_converted_and_checked(bundle_copy: Path) -> None:
    vectors = np.load(bundle_copy / "item_vectors.npy")
    np.save(bundle_copy / "item_vectors.npy", vectors.astype(np.float64))
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))
    bundle = load_bundle(bundle_copy, plan=CPU)
    assert bundle.item_vectors.dtype == np.float32
    np.testing.assert_array_equal(bundle.item_vectors, vectors)
