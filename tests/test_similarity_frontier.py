"""scripts/similarity_frontier.py: the upper frontier, the lists that beat a reference and the best list under a
popularity cap, against brute force over random points; and the script on the committed reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from project_scripts import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("similarity_frontier")


def random_points(script: ModuleType, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [script.Point("s", f"p{k}", float(rng.random()), float(rng.integers(0, 8)) / 8, float(rng.integers(1, 12)))
            for k in range(60)]  # fmt: skip  (coarse values: ties in both figures)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upper_frontier_is_the_undominated_lists(script: ModuleType, seed: int) -> None:
    pts = random_points(script, seed)
    front = script.upper_frontier(pts)

    def dominated(p) -> bool:  # another list as good on both figures and better on one
        return any((q.co_like >= p.co_like and q.popularity <= p.popularity)
                   and (q.co_like > p.co_like or q.popularity < p.popularity) for q in pts)  # fmt: skip

    undominated = {(p.co_like, p.popularity) for p in pts if not dominated(p)}
    assert {(p.co_like, p.popularity) for p in front} == undominated
    assert [p.popularity for p in front] == sorted(p.popularity for p in front)


def test_beats_and_best_within_on_hand_made_lists(script: ModuleType) -> None:
    point = script.Point
    reference = point("s", "reference", genre=0.5, co_like=0.30, popularity=160.0)
    lists = [
        reference,
        point("s", "both above", 0.6, 0.31, 200.0),
        point("s", "genre only", 0.6, 0.29, 90.0),
        point("s", "co-like only", 0.4, 0.35, 100.0),
        point("s", "equal co-like", 0.7, 0.30, 125.0),
        point("s", "admissible", 0.55, 0.28, 110.0),
        point("s", "admissible worse", 0.65, 0.25, 60.0),
        point("s", "over the cap", 0.9, 0.33, 130.0),
    ]
    assert [p.name for p in script.beats(lists, reference)] == ["both above", "over the cap"]  # "equal co-like": not above
    best = script.best_within(lists, popularity_cap=120.0, genre_floor=0.5)
    assert best is not None and best.name == "genre only"  # "co-like only" has too little genre agreement
    best = script.best_within(lists, popularity_cap=90.0, genre_floor=0.5)
    assert best is not None and best.name == "genre only"  # its popularity is the cap itself
    best = script.best_within(lists, popularity_cap=89.0, genre_floor=0.5)
    assert best is not None and best.name == "admissible worse"
    assert script.best_within(lists, popularity_cap=50.0, genre_floor=0.0) is None


def test_distinct_keeps_the_first_name_of_lists_with_the_same_figures(script: ModuleType) -> None:
    point = script.Point
    lists = [point("a", "cosine", 0.615, 0.2431, 83.7), point("a", "norm exponent 1", 0.615, 0.2431, 83.7),
             point("b", "other", 0.615, 0.2431, 83.8)]  # fmt: skip
    assert [p.name for p in script.distinct(lists)] == ["cosine", "other"]


def test_script_on_the_committed_reports(script: ModuleType, tmp_path: Path) -> None:
    for name in script.SOURCES:
        shutil.copy(REPO / "docs" / "similarity-and-blending" / name, tmp_path / name)
    assert script.main(["--dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    committed = json.loads((REPO / "docs" / "similarity-and-blending" / "frontier.json").read_text())
    assert summary == committed  # the committed summary is what the committed reports give
    reference = summary["trained"]["reference"]
    assert (reference["source"], reference["name"]) == script.REFERENCE
    for part in ("trained", "ingested"):
        for p in summary[part]["beat_on_both"]:
            assert p["genre"] > summary[part]["reference"]["genre"]
            assert p["co_like"] > summary[part]["reference"]["co_like"]
