"""docs/modality-quality.md from the corruption benchmark's ledgers (``docs/modality-quality/<dataset>.json``):
test Recall@20 / NDCG@20 per model, kind and fraction (mean ± std over seeds, with the number of seeds), the
relative drop from p = 0, the issue's goals checked, the detectors' AUROC, a plot of Recall@20 against p per
dataset, and every run with its wall time. A cell without runs is shown as "not run"; nothing is computed here
that the ledgers do not hold."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.experiments.corruption_benchmark import (
    DATASETS,
    FRACTIONS,
    KINDS,
    MODELS,
    SEEDS,
    Cell,
    cell_key,
    detector_key,
    ledger_path,
    read_ledger,
)
from training.experiments.damage_detectors import (
    CROSS_MODAL_KNN,
    REVIEWER_FINAL,
    REVIEWER_FIRST,
    USER_PROFILE,
)

LABELS = {"r2mr": "R2MR", "r2mr-no-reviewer": "R2MR without reviewer", "r2mr-no-rewriter": "R2MR without rewriter",
          "freedom": "FREEDOM", "lattice": "LATTICE", "vbpr": "VBPR", "lightgcn": "LightGCN (reads no content)"}  # fmt: skip
NOT_RUN = "not run"
GOAL_AUROC = 0.85
COMPLETE_COMMAND = "OMP_NUM_THREADS=1 MMREC_HOME=/work/var-shared nice -n 5 .venv/bin/mmrec corrupt --jobs 2"


@dataclass(frozen=True)
class Grid:
    """One dataset's ledger, read by cell: (model label, kind, fraction) → the runs of the seeds found."""

    dataset: str
    ledger: dict[str, Any]
    cells: dict[tuple[str, str, float], list[dict[str, Any]]]
    seeds: tuple[int, ...]

    def runs(self, label: str, kind: str, fraction: float) -> list[dict[str, Any]]:
        return self.cells.get((label, kind, fraction), [])


def read_grid(docs_dir: Path, dataset: str, train_overrides: Mapping[str, Any] = {}) -> Grid:  # noqa: B006 (read only)
    ledger = read_ledger(ledger_path(docs_dir, dataset), dataset)
    by_key = {entry["key"]: entry for entry in ledger["runs"].values()}
    seeds = tuple(dict.fromkeys([*SEEDS, *sorted({int(e["seed"]) for e in by_key.values()})]))
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for model in MODELS:
        for kind in KINDS:
            for fraction in FRACTIONS:
                found = [by_key.get(cell_key(Cell(dataset, model, kind, fraction, seed), train_overrides))
                         for seed in seeds]  # fmt: skip
                cells[(model.label, kind, fraction)] = [entry for entry in found if entry is not None]
    return Grid(dataset, ledger, cells, seeds)


# ----------------------------------------------------------------------------------------------- numbers
def metric(runs: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    return [float(r["test"][name]) for r in runs]


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return NOT_RUN
    if len(values) == 1:
        return f"{values[0]:.4f} (1)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def relative_drop(grid: Grid, label: str, kind: str, fraction: float) -> tuple[float, int] | None:
    """(1 − mean Recall@20 at p / mean at 0, over the seeds both have; that number of seeds), or None."""
    clean = {r["seed"]: r["test"]["recall@20"] for r in grid.runs(label, kind, 0.0)}
    damaged = {r["seed"]: r["test"]["recall@20"] for r in grid.runs(label, kind, fraction)}
    common = sorted(set(clean) & set(damaged))
    if not common:
        return None
    return 1.0 - statistics.mean(damaged[s] for s in common) / statistics.mean(clean[s] for s in common), len(common)


def drop_cell(drop: tuple[float, int] | None) -> str:
    return NOT_RUN if drop is None else f"{100 * drop[0]:+.1f} % ({drop[1]})"


def metric_table(grid: Grid, kind: str) -> list[str]:
    head = ["model", *(f"Recall@20 p={p:g}" for p in FRACTIONS), *(f"drop p={p:g}" for p in FRACTIONS if p),
            *(f"NDCG@20 p={p:g}" for p in FRACTIONS)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in MODELS:
        runs = [grid.runs(model.label, kind, p) for p in FRACTIONS]
        cells = [LABELS[model.label], *(mean_std(metric(r, "recall@20")) for r in runs),
                 *(drop_cell(relative_drop(grid, model.label, kind, p)) for p in FRACTIONS if p),
                 *(mean_std(metric(r, "ndcg@20")) for r in runs)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -------------------------------------------------------------------------------------------------- detectors
def detector_runs(grid: Grid, kind: str, fraction: float) -> dict[str, list[dict[str, Any]]]:
    """detector row → its detection results (one per seed): the reviewer of each R2MR variant that has one, then
    the simple detectors of the same (kind, fraction, seed) corruptions."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for label in ("r2mr", "r2mr-no-rewriter"):
        for run in grid.runs(label, kind, fraction):
            for detector, by_modality in (run.get("detection") or {}).get("auroc", {}).items():
                rows.setdefault(f"{LABELS[label]}: {detector}", []).append({"seed": run["seed"], **by_modality})
    for seed in grid.seeds:
        found = grid.ledger["detectors"].get(detector_key(kind, fraction, seed))
        for detector in (USER_PROFILE, CROSS_MODAL_KNN):
            if found is not None:
                rows.setdefault(detector, []).append({"seed": seed, **found["auroc"][detector]})
    return rows


def detector_table(grid: Grid, kind: str, modalities: Sequence[str]) -> list[str]:
    head = ["p", "detector", *modalities, "pooled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fraction in (p for p in FRACTIONS if p):
        rows = detector_runs(grid, kind, fraction)
        if not rows:
            lines.append(f"| {fraction:g} | {NOT_RUN} |" + " |" * (len(head) - 2))
        for name, results in rows.items():
            cells = [mean_std([r[m] for r in results]) for m in [*modalities, "pooled"]]
            lines.append(f"| {fraction:g} | {name} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_table(grid: Grid, kind: str) -> list[str]:
    """R2MR's reviewer on the damaged vs the clean items (means over the scored items, then over seeds)."""
    lines = []
    for fraction in (p for p in FRACTIONS if p):
        runs = [r["detection"]["diagnostics"] for r in grid.runs("r2mr", kind, fraction)
                if (r.get("detection") or {}).get("diagnostics")]  # fmt: skip
        for name in dict.fromkeys(n for run in runs for n in run):
            for m in dict.fromkeys(m for run in runs if name in run for m in run[name]):
                cells = [mean_std([run[name][m][group] for run in runs if name in run and run[name][m][group] is not None])
                         for group in ("damaged", "clean")]  # fmt: skip
                lines.append(f"| {fraction:g} | {name} | {m} | {cells[0]} | {cells[1]} |")
    if not lines:
        return []
    return ["| p | R2MR (full model) | modality | damaged items | clean items |", "|---|---|---|---|---|", *lines]


def mean_auroc(results: Sequence[Mapping[str, Any]], modality: str, seeds: set[int]) -> float | None:
    values = [float(r[modality]) for r in results if r["seed"] in seeds]
    return statistics.mean(values) if values else None


# ------------------------------------------------------------------------------------------------------ goals
@dataclass(frozen=True)
class Goal:
    goal: str
    status: str  # "met" | "not met" | "not yet measured"
    evidence: str


def judged(goal: str, ok: bool, evidence: str, n_seeds: int) -> Goal:
    """met / not met once every seed of the grid is in; before that "not yet measured", with the verdict so far."""
    verdict = "met" if ok else "not met"
    if n_seeds < len(SEEDS):
        return Goal(goal, "not yet measured", f"so far ({n_seeds} of {len(SEEDS)} seeds) {verdict}: {evidence}")
    return Goal(goal, verdict, evidence)


def drop_goal(grid: Grid) -> Goal:
    goal = "p=0.4 swapped: R2MR's relative Recall@20 drop ≤ ½ of FREEDOM's and ≤ ½ of LATTICE's"
    drops = {label: relative_drop(grid, label, "swapped", 0.4) for label in ("r2mr", "freedom", "lattice")}
    missing = [LABELS[label] for label, drop in drops.items() if drop is None]
    if missing:
        return Goal(goal, "not yet measured", f"no runs for {', '.join(missing)}")
    r2mr, freedom, lattice = (drops[label][0] for label in ("r2mr", "freedom", "lattice"))  # type: ignore[index]
    evidence = f"drops: R2MR {100 * r2mr:+.1f} %, FREEDOM {100 * freedom:+.1f} %, LATTICE {100 * lattice:+.1f} %"
    n_seeds = min(drop[1] for drop in drops.values() if drop is not None)
    return judged(goal, r2mr <= 0.5 * freedom and r2mr <= 0.5 * lattice, evidence, n_seeds)


def floor_goal(grid: Grid) -> Goal:
    goal = "p=0.4 swapped: R2MR's Recall@20 above LightGCN's"
    r2mr, floor = metric(grid.runs("r2mr", "swapped", 0.4), "recall@20"), metric(grid.runs("lightgcn", "swapped", 0.4), "recall@20")
    if not r2mr or not floor:
        return Goal(goal, "not yet measured", "no runs for " + " and ".join(
            name for name, values in (("R2MR", r2mr), ("LightGCN", floor)) if not values))  # fmt: skip
    evidence = f"R2MR {mean_std(r2mr)} vs LightGCN {mean_std(floor)}"
    return judged(goal, statistics.mean(r2mr) > statistics.mean(floor), evidence, min(len(r2mr), len(floor)))


def ablation_goal(grid: Grid, ablation: str, kind: str) -> Goal:
    goal = f"p=0.4 {kind}: R2MR above {LABELS[ablation]} by more than two seed standard deviations"
    full, other = metric(grid.runs("r2mr", kind, 0.4), "recall@20"), metric(grid.runs(ablation, kind, 0.4), "recall@20")
    if len(full) < 2 or len(other) < 2:
        so_far = f"; Recall@20 so far {mean_std(full)} vs {mean_std(other)}" if full and other else ""
        return Goal(goal, "not yet measured", f"seeds run: R2MR {len(full)}, {LABELS[ablation]} {len(other)} (a "
                                              f"standard deviation needs ≥ 2, the grid has {len(SEEDS)}){so_far}")  # fmt: skip
    gap = statistics.mean(full) - statistics.mean(other)
    spread = max(statistics.stdev(full), statistics.stdev(other))
    evidence = f"Recall@20 {mean_std(full)} vs {mean_std(other)}: gap {gap:+.4f}, 2 × larger std {2 * spread:.4f}"
    return judged(goal, gap > 2 * spread, evidence, min(len(full), len(other)))


def detector_goal(grid: Grid, detector: str, modalities: Sequence[str]) -> Goal:
    goal = f"p=0.4 swapped: {detector} AUROC ≥ {GOAL_AUROC} and above both simple detectors (each modality)"
    rows = detector_runs(grid, "swapped", 0.4)
    reviewer = rows.get(f"{LABELS['r2mr']}: {detector}", [])
    seeds = {r["seed"] for r in reviewer} & {r["seed"] for r in rows.get(USER_PROFILE, [])} & {
        r["seed"] for r in rows.get(CROSS_MODAL_KNN, [])}  # fmt: skip
    if not seeds:
        return Goal(goal, "not yet measured", "no R2MR run at p=0.4 swapped")
    ok, evidence = True, []
    for m in modalities:
        mine = mean_auroc(reviewer, m, seeds)
        user_profile, knn = (mean_auroc(rows[d], m, seeds) for d in (USER_PROFILE, CROSS_MODAL_KNN))
        assert mine is not None and user_profile is not None and knn is not None  # every seed has all three
        ok = ok and mine >= GOAL_AUROC and mine > max(user_profile, knn)
        evidence.append(f"{m}: {mine:.3f} vs (a) {user_profile:.3f}, (b) {knn:.3f}")
    return judged(goal, ok, "; ".join(evidence), len(seeds))


def goals(grid: Grid, modalities: Sequence[str]) -> list[Goal]:
    return [drop_goal(grid), floor_goal(grid),
            *(ablation_goal(grid, ablation, kind) for ablation in ("r2mr-no-reviewer", "r2mr-no-rewriter")
              for kind in KINDS),
            *(detector_goal(grid, detector, modalities) for detector in (REVIEWER_FIRST, REVIEWER_FINAL))]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the page
def plot_recall(grid: Grid, path: Path) -> None:
    """Recall@20 (mean ± std over seeds) against p, one line per model, one panel per kind; cells not run are
    left out of their line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(5 * len(KINDS), 4), sharey=True)
    for axis, kind in zip(axes, KINDS, strict=True):
        for colour, model in enumerate(MODELS):  # one colour per model in every panel
            points = [(p, metric(grid.runs(model.label, kind, p), "recall@20")) for p in FRACTIONS]
            points = [(p, values) for p, values in points if values]
            if points:
                axis.errorbar([p for p, _ in points], [statistics.mean(v) for _, v in points],
                              yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points],
                              marker="o", capsize=3, label=LABELS[model.label], color=f"C{colour}",
                              linestyle="--" if model.label == "lightgcn" else "-")  # fmt: skip
        axis.set_title(f"{grid.dataset}: {kind}")
        axis.set_xlabel("fraction p of items with one modality damaged")
        axis.set_xticks(list(FRACTIONS))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test Recall@20")
    handles, labels = max((axis.get_legend_handles_labels() for axis in axes), key=lambda found: len(found[1]))
    if labels:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def runs_table(grid: Grid) -> list[str]:
    lines = ["| model | corruption | seed | test Recall@20 | test NDCG@20 | best epoch / run | stopped by | epoch loop s "
             "| whole run s | run |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in sorted(grid.ledger["runs"].values(), key=lambda e: (e["seed"] != 2024, e["seed"], e["run"])):
        damage = entry["corruption"]
        what = "clean" if damage["kind"] == "none" else f"{damage['kind']} p={damage['fraction']:g}"
        lines.append(f"| {LABELS.get(entry['label'], entry['label'])} | {what} | {entry['seed']} | "
                     f"{entry['test']['recall@20']:.4f} | {entry['test']['ndcg@20']:.4f} | "
                     f"{entry['best_epoch']} / {entry['epochs_run']} | {entry['stopped_by']} | "
                     f"{entry['wall_seconds']:.0f} | {whole_run(entry)} | `{entry['run']}` |")  # fmt: skip
    return lines


INTRO = """# Modality quality: the corruption benchmark

Generated by `mmrec corrupt` (training/experiments/corruption_benchmark.py) from the ledgers in
[modality-quality/](modality-quality/); do not edit by hand. Issue 15: where R2MR's review-and-rewrite mechanism
pays, on item content damaged on purpose.

**The damage** (training/data/corruption.py). A seeded fraction p of the items that have content gets ONE of its
present modalities damaged (a seeded uniform choice per item), in three kinds: **missing** (mask off), **swapped**
(the original feature of another random item that has that modality and a different feature: plausible but wrong),
**noise** (a draw from N(μ, Σ) with the modality's mean and full empirical covariance over the items that have it).
Interactions and splits are untouched; every corrupted run records its damaged (item, modality) pairs in
`corruption.json` and its corruption in `config.json`, from which it is reproducible. The corruption seed of a
cell is its training seed, so one seed damages the same items for every model. p = 0 is the clean run, shared by
the three kinds; LightGCN reads no content, so its one run per seed is its row everywhere (the floor).

**The protocol** is the clean rows' of [results.md](results.md): each model's preset (`training/presets.toml`),
selection on validation Recall@20, test metrics at the best validation epoch; R2MR with the epoch caps of
`scripts/run-r2mr.sh` (ml100k-posters 80, lfm2k 200). Cells read "mean ± std (number of seeds)"; "drop" is the
relative Recall@20 drop from p = 0 over the seeds both cells have (positive: worse). A cell without runs reads
"not run": nothing here is estimated.

**Detectors** (training/experiments/damage_detectors.py): AUROC of flagging the damaged modality. R2MR's reviewer
scores 1 − s^m at its first review round and for the final model; (a) 1 − cosine between the item's feature and
the sum of its training users' other items' features; (b) the mean cosine distance to the item's 10 nearest items
found in the other modality's space. Features centred and L2-normalised. Scored: items with training users and both
modalities in the original content. For **missing**, a removed modality is flagged from the mask alone by the first
review, the reviewer on the content as given, R2MR without rewriter and both simple detectors (the reviewer scores
it 0; the simple detectors have no feature and give it the top score): those AUROCs measure the mask, not a
detector. Only the full R2MR's final reviewer is below 1 there: it scores the feature the rewriter wrote in the
missing one's place.
"""


def grid_progress(grids: Sequence[Grid], train_overrides: Mapping[str, Any]) -> tuple[int, int]:
    """(runs done, runs in the full grid) over the datasets, each shared run counted once."""
    done = total = 0
    for grid in grids:
        keys = {cell_key(Cell(grid.dataset, model, kind, p, seed), train_overrides) for model in MODELS
                for kind in KINDS for p in FRACTIONS for seed in SEEDS}  # fmt: skip
        recorded = {entry["key"] for entry in grid.ledger["runs"].values()}
        total += len(keys)
        done += len(keys & recorded)
    return done, total


def dataset_section(grid: Grid, docs_dir: Path) -> list[str]:
    modalities = grid.ledger.get("modalities") or []
    lines = [f"## {grid.dataset}", ""]
    if not grid.ledger["runs"]:
        return [*lines, f"{NOT_RUN}: no run of this dataset is recorded yet.", ""]
    lines += ["### Goals of the issue", "", "| goal | status | evidence |", "|---|---|---|"]
    lines += [f"| {g.goal} | {g.status} | {g.evidence} |" for g in goals(grid, modalities)]
    plot = docs_dir / "modality-quality" / f"{grid.dataset}-recall.png"
    plot_recall(grid, plot)
    lines += ["", "### Test Recall@20 and NDCG@20", "", f"![Recall@20 vs p]({plot.relative_to(docs_dir).as_posix()})", ""]
    for kind in KINDS:
        lines += [f"**{kind}**", "", *metric_table(grid, kind), ""]
    lines += ["### Detecting the damaged modality (AUROC)", ""]
    for kind in KINDS:
        lines += [f"**{kind}**", "", *detector_table(grid, kind, modalities), ""]
        why = diagnostics_table(grid, kind)
        if why:
            lines += [f"What R2MR's reviewer saw ({kind}): means over the scored items, then over seeds.", "", *why, ""]
    lines += ["### Runs", "", "Epoch loop: metrics.json's wall time (epochs and evaluations); whole run: the benchmark's "
              "call of the trainer (model build and run directory included; – for a run found on disk). Measured on a "
              "shared CPU while other jobs ran: compare orders of magnitude. On a shared CPU run one thread per process "
              "(OMP_NUM_THREADS=1): with more threads than free cores, torch's threads wait on each other.",
              "", *runs_table(grid), ""]  # fmt: skip
    return lines


def grid_status(done: int, total: int, datasets: Sequence[str]) -> str:
    """The page's line on how much of the grid has run, ending in a colon before the command that completes (or,
    when complete, reproduces) it."""
    grid_text = (f"({', '.join(datasets)} × {', '.join(KINDS)} × p ∈ {{{', '.join(f'{p:g}' for p in FRACTIONS)}}} × "
                 f"{len(MODELS)} models × seeds {', '.join(map(str, SEEDS))})")  # fmt: skip
    jobs = ("`--jobs N`: N cells at once, a process each; disjoint slices, e.g. one `--dataset` each, can also run "
            "as separate commands side by side: each merges its runs into the ledgers")  # fmt: skip
    if done == total:
        return (f"**The full grid is complete: {done} of {total} runs** {grid_text}. The command below reuses every "
                f"run and rewrites this page; with the ledgers (docs/modality-quality/*.json) moved aside and no earlier runs "
                f"under MMREC_HOME it trains the grid again ({jobs}):")  # fmt: skip
    return (f"**Progress: {done} of the {total} runs of the full grid** {grid_text}. Resumable: runs that exist are "
            f"reused. To complete it ({jobs}):")  # fmt: skip


def render_page(docs_dir: Path, *, datasets: Sequence[str] = DATASETS,
                train_overrides: Mapping[str, Any] = {}) -> str:  # noqa: B006 (read only)  # fmt: skip
    """The page; ``train_overrides`` (tests only) must be those the runs were trained with."""
    grids = [read_grid(docs_dir, dataset, train_overrides) for dataset in datasets]
    done, total = grid_progress(grids, train_overrides)
    lines = [INTRO, grid_status(done, total, datasets), "", "```bash", COMPLETE_COMMAND, "```", ""]
    for grid in grids:
        lines += dataset_section(grid, docs_dir)
    return "\n".join(lines)


def write_page(docs_dir: Path, out: Path, *, datasets: Sequence[str] = DATASETS,
               train_overrides: Mapping[str, Any] = {}) -> Path:  # noqa: B006 (read only)  # fmt: skip
    out.write_text(render_page(docs_dir, datasets=datasets, train_overrides=train_overrides))
    return out


def whole_run(entry: Mapping[str, Any]) -> str:
    """Seconds from the benchmark's call of the trainer to its return (model build, epochs, evaluations, writing the
    run); "–" for a run found on disk rather than trained by the benchmark."""
    seconds = entry.get("train_seconds")
    return "–" if seconds is None else f"{seconds:.0f}"
