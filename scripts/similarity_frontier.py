"""Every similar-items list measured for issue 14 on one chart: co-like rate against neighbour popularity.

Reads the test figures already written by ``training.experiments.item_similarity`` (LightGCN's and R2MR's item
vectors: inner product, cosine, content, blends, norm exponents, popularity shrinkage) and by
``scripts/similarity_item_knn.py`` (item-kNN, EASE, EASE with a popularity tilt, RP³β, per-popularity RP³β), for
trained items and for items held out of training and ingested from content only, each distinct list once (several
names give the same list). For each part it prints:
- the lists that beat the issue's list (LightGCN's inner product) on both genre agreement@10 and co-like rate@10;
- the highest co-like rate among lists whose neighbours are at most 2x the catalogue's popularity (the declared
  rule's cap) and whose genre agreement is at least the inner product's;
- the upper frontier (no other list has both a higher co-like rate and less popular neighbours).

Writes docs/similarity-and-blending/frontier.png (one panel per part) and frontier.json. Nothing is trained.

    python scripts/similarity_frontier.py [--dir docs/similarity-and-blending]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "docs" / "similarity-and-blending"
SOURCES = {  # file → label of its lists
    "similarity-ml100k-posters.json": "LightGCN vectors",
    "similarity-ml100k-posters-r2mr.json": "R2MR vectors",
    "item-knn-ml100k-posters.json": "interactions (item-kNN, EASE, RP3beta)",
}
REFERENCE = ("LightGCN vectors", "inner_product")  # the list
CAP = 2.0  # neighbour popularity at most this many times the catalogue's


@dataclass(frozen=True)
class Point:
    source: str
    name: str
    genre: float
    co_like: float
    popularity: float


def points(directory: Path) -> tuple[dict[str, list[Point]], float]:
    """Test figures of every distinct list, by part ("trained", "ingested"), and the catalogue's mean popularity."""
    parts: dict[str, list[Point]] = {"trained": [], "ingested": []}
    catalogue = None
    for file, source in SOURCES.items():
        report = json.loads((directory / file).read_text())
        catalogue = float(report["catalogue_popularity"])
        trained = report["trained"].get("figures", report["trained"])
        ingested = report["ingested"]["figures"]
        extra = report.get("per_popularity_exponents", {})
        if "trained" in extra:
            trained = {**trained, f"rp3β α={extra['alpha']}, per-popularity β {extra['exponents']}": extra["trained"]}
        for part, rows in (("trained", trained), ("ingested", ingested)):
            for name, f in rows.items():
                if "co_like_rate@10" not in f:
                    continue
                parts[part].append(
                    Point(source, name, f["genre_agreement@10"], f["co_like_rate@10"], f["neighbour_popularity"])
                )
    assert catalogue is not None
    return {part: distinct(pts) for part, pts in parts.items()}, catalogue


def distinct(candidates: Sequence[Point]) -> list[Point]:
    """The lists with distinct figures (to 4 decimals, as the item-kNN report rounds them), the first name of each:
    several names give the same list (the cosine is norm exponent 1 and the content blend at α = 1; item-kNN β and
    RP³β α = 0 with the same β rank alike)."""
    seen: dict[tuple[float, float, float], Point] = {}
    for p in candidates:
        seen.setdefault((round(p.genre, 4), round(p.co_like, 4), round(p.popularity, 4)), p)
    return list(seen.values())


def beats(candidates: Sequence[Point], reference: Point) -> list[Point]:
    """Lists above the reference on both genre agreement and co-like rate."""
    return [p for p in candidates if p.genre > reference.genre and p.co_like > reference.co_like]


def best_within(candidates: Sequence[Point], popularity_cap: float, genre_floor: float) -> Point | None:
    """The highest co-like rate among lists with neighbour popularity ≤ the cap and genre agreement ≥ the floor."""
    admissible = [p for p in candidates if p.popularity <= popularity_cap and p.genre >= genre_floor]
    return max(admissible, key=lambda p: p.co_like, default=None)


def upper_frontier(candidates: Sequence[Point]) -> list[Point]:
    """Lists that no other list dominates (higher co-like rate with neighbours no more popular, or as high a rate
    with less popular neighbours), by increasing popularity."""
    out: list[Point] = []
    for p in sorted(candidates, key=lambda p: (p.popularity, -p.co_like)):
        if not out or p.co_like > out[-1].co_like:
            out.append(p)
    return out


def plot(parts: dict[str, list[Point]], catalogue: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(SOURCES.values(), ("o", "s", "^"), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (part, pts) in zip(axes, parts.items(), strict=True):
        reference = next(p for p in pts if (p.source, p.name) == REFERENCE)
        for source, marker in markers.items():
            mine = [p for p in pts if p.source == source]
            ax.scatter([p.popularity for p in mine], [p.co_like for p in mine], marker=marker, s=22, alpha=0.7,
                       label=source)  # fmt: skip
        front = upper_frontier(pts)
        ax.plot([p.popularity for p in front], [p.co_like for p in front], color="grey", lw=1, label="upper frontier")
        ax.scatter([reference.popularity], [reference.co_like], marker="*", s=220, color="red", zorder=5,
                   label="the issue's list (LightGCN inner product)")  # fmt: skip
        ax.axvline(CAP * catalogue, color="red", ls="--", lw=1, label=f"{CAP:g}x catalogue popularity")
        ax.axhline(reference.co_like, color="red", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("mean neighbour popularity (interactions; log scale)")
        ax.set_ylabel("co-like rate@10 (test)")
        ax.set_title(f"{part} items: the goal is the upper-left of the red lines")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the JSON reports are (and the outputs go)")
    args = parser.parse_args(argv)
    parts, catalogue = points(args.dir)
    summary: dict[str, object] = {"catalogue_popularity": catalogue, "popularity_cap": CAP * catalogue}
    for part, pts in parts.items():
        reference = next(p for p in pts if (p.source, p.name) == REFERENCE)
        better = beats(pts, reference)
        best = best_within(pts, CAP * catalogue, reference.genre)
        front = upper_frontier(pts)
        print(f"{part}: {len(pts)} lists; the issue's list: genre {reference.genre:.3f}, co-like {reference.co_like:.3f}, "
              f"popularity {reference.popularity:.1f}")  # fmt: skip
        print(f"  beat it on both figures: {len(better)}; their least popular neighbours: "
              + (f"{min(p.popularity for p in better):.1f}" if better else "none"))
        if best is not None:
            print(f"  best co-like within {CAP:g}x catalogue popularity ({CAP * catalogue:.1f}): {best.co_like:.3f} "
                  f"({best.source}: {best.name}, popularity {best.popularity:.1f})")  # fmt: skip
        for p in front:
            print(f"  frontier: popularity {p.popularity:7.1f}  co-like {p.co_like:.3f}  genre {p.genre:.3f}  "
                  f"{p.source}: {p.name}")  # fmt: skip
        summary[part] = {
            "lists": len(pts),
            "reference": asdict(reference),
            "beat_on_both": [asdict(p) for p in sorted(better, key=lambda p: p.popularity)],
            "best_within_cap": asdict(best) if best else None,
            "upper_frontier": [asdict(p) for p in front],
        }
    (args.dir / "frontier.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot(parts, catalogue, args.dir / "frontier.png")
    print(f"wrote {args.dir / 'frontier.json'} and {args.dir / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
