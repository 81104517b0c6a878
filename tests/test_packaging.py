"""Packaging: the wheel carries what an installed (non-editable) package needs, presets.toml included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bundle_format", "models", "training", "service")


def test_pyproject_declares_python_3_11_for_tomllib() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_wheel_contains_every_package_and_the_presets(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("mmrec_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "training/presets.toml" in names
    assert {f"{package}/py.typed" for package in PACKAGES} <= names
    for module in ("bundle_format/__init__.py", "training/cli.py", "training/config.py", "training/runs.py",
                   "training/data/dataset.py", "training/fit/trainer.py", "training/export/bundle.py",
                   "training/experiments/results.py", "service/bundle.py"):  # fmt: skip
        assert module in names
