"""The default dataset on a machine without the shared data: MovieLens-100k read from the recbole 1.2.1 wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.data.prepare import prepare_dataset
from training.data.sources import RECBOLE_WHEEL, read_ml100k_recbole
from training.settings import Paths


@pytest.fixture(scope="module")
def offline_paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """Paths whose data root does not exist; the wheel is fetched into the project's own download folder."""
    home = tmp_path_factory.mktemp("home")
    paths = Paths(data_root=home / "no-shared-data", home=home)
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "recbole==1.2.1",
                            "-d", str(paths.downloads)], capture_output=True, text=True, timeout=300)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"PyPI is not reachable to fetch recbole==1.2.1: {probe.stderr.strip()[-300:]}")
    return paths


def test_read_ml100k_recbole_reads_the_wheel(offline_paths: Paths) -> None:
    assert (offline_paths.downloads / RECBOLE_WHEEL).exists()
    raw = read_ml100k_recbole(offline_paths)
    assert (len(raw.user_ids), len(raw.item_ids), raw.user.size) == (943, 1682, 100_000)
    toy_story = raw.item_ids.index("1")
    assert raw.item_text[toy_story] == "Toy Story (1995). Animation, Children's, Comedy."
    assert all(image is None for image in raw.item_image)


def test_ml100k_recbole_prepares_with_random_split(offline_paths: Paths, tmp_path: Path) -> None:
    dataset = prepare_dataset(read_ml100k_recbole(offline_paths), encoders=None)
    assert dataset.name == "ml100k" and dataset.split_name == "random-811-seed2024"
    dataset.save(tmp_path / "ml100k")
    assert (tmp_path / "ml100k" / "dataset.json").exists()
