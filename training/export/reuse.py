"""Whether an existing bundle can be served again instead of training a new one (`mmrec demo` re-runs).

Standard library and :mod:`bundle_format` only (no torch), so a re-run that serves an existing bundle starts fast.
The service checks the bundle again, fully, when it loads it; this check is what decides to skip training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bundle_format as bf


def bundle_problem(bundle: Path, *, model: str, dataset: str, prepared_dir: Path | None = None) -> str | None:
    """Why ``bundle`` cannot be served as the ``model`` trained on ``dataset``; None when it can.

    It can when its manifest is a readable bundle manifest of that model and dataset, every file it lists exists
    with the listed sha256, and, when ``prepared_dir`` holds a prepared dataset, that dataset has the bundle's split
    and sizes (a dataset prepared again since the export makes the bundle stale).
    """
    manifest_path = bundle / bf.MANIFEST
    if not manifest_path.is_file():
        return f"no bundle at {bundle}"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{manifest_path} is not readable JSON ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != bf.FORMAT:
        return f"{manifest_path} is not an {bf.FORMAT} manifest"
    if manifest.get("format_version") not in bf.READABLE_FORMAT_VERSIONS:
        return f"{manifest_path}: format_version {manifest.get('format_version')!r} is not readable"
    if (found_model := _name(manifest.get("model"))) != model:
        return f"the bundle at {bundle} is a {found_model} bundle, not {model}"
    if (found_dataset := _name(manifest.get("dataset"))) != dataset:
        return f"the bundle at {bundle} was trained on {found_dataset}, not {dataset}"
    if problem := _files_problem(bundle, manifest.get("files")):
        return problem
    if prepared_dir is not None and (prepared_dir / "dataset.json").is_file():
        prepared = json.loads((prepared_dir / "dataset.json").read_text(encoding="utf-8"))
        exported = manifest["dataset"]
        for key in ("split", "n_users", "n_items"):
            if key in exported and prepared.get(key) != exported[key]:
                return (f"the bundle at {bundle} was trained on {dataset} with {key} {exported[key]!r}, the prepared "
                        f"dataset has {prepared.get(key)!r}")  # fmt: skip
    return None


def _name(entry: Any) -> str | None:
    if isinstance(entry, dict):
        name = entry.get("name")
        return name if isinstance(name, str) else None
    return entry if isinstance(entry, str) else None


def _files_problem(bundle: Path, files: Any) -> str | None:
    if not isinstance(files, dict):
        return f"{bundle / bf.MANIFEST}: 'files' is not a map of file names to sha256 digests"
    for required in bf.REQUIRED_FILES:
        if required not in files:
            return f"{bundle / bf.MANIFEST}: required file {required} is not listed"
    for name, digest in files.items():
        path = bundle / name
        if not path.is_file():
            return f"bundle file {path} is missing"
        if bf.file_sha256(path) != digest:
            return f"bundle file {path} does not match its sha256 in the manifest"
    return None
