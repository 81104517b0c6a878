"""A bundle's staging directory and its publication: the manifest's ``files`` and the atomic move into place.

No torch here: the benchmarks' synthetic bundles (``bench/synthetic_bundle.py``) are published the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import bundle_format as bf


def staged_file_hashes(staging: Path) -> dict[str, str]:
    """The manifest's ``files``: every file of a bundle being written, by relative path, to its sha256."""
    return {p.relative_to(staging).as_posix(): bf.file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}


def publish_bundle(staging: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last and move the finished bundle to ``out`` (replacing one there): a reader never
    sees a half-written bundle at ``out``."""
    (staging / bf.MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
