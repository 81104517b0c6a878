"""The modality-quality report of a trained R2MR run: how many items fall in each state, the score distributions,
the review/rewrite rounds (kept rewrites under BOTH keep rules), and concrete examples with item titles.

    .venv/bin/python -m training.experiments.r2mr_report RUN_DIR [--out docs/r2mr]

writes ``<out>/<dataset>.md``, ``<out>/<dataset>-scores.png`` (histograms of s per modality, first review and final
model, with η) and, where the items have images, ``<out>/<dataset>-weak-images.png`` (posters judged weak beside
posters judged strong). Everything is read from the run's checkpoint: the model carries its review state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from models.r2mr import R2MR, ROUND_STAT_FIELDS, ROUND_STAT_PER_MODALITY, STATE_NAMES
from training.data.dataset import TRAIN
from training.runs import LoadedRun, load_run

N_EXAMPLES = 6


@dataclass(frozen=True)
class QualityTable:
    """Per-item review results of one run, rows = items."""

    modality_names: tuple[str, str]
    scores: np.ndarray  # (2, I) final model
    first: np.ndarray  # (2, I) first review round (-1 when no round ran)
    states: np.ndarray  # (I,)
    first_states: np.ndarray  # (I,) (-1 when no round ran)
    has: np.ndarray  # (2, I) bool, original presence
    rewritten: np.ndarray  # (2, I) bool
    n_users: np.ndarray  # (I,) training users
    rounds: np.ndarray  # (rounds, fields) round statistics
    threshold: float


def quality_table(run: LoadedRun) -> QualityTable:
    model = run.model
    if not isinstance(model, R2MR):
        raise TypeError(f"{run.directory} is a {run.model_name} run, not r2mr")
    with torch.no_grad():
        scores, states = model.quality()
    first = model.first_review.numpy()
    ran = bool((first >= 0).all())
    n_good = (first >= model.config.threshold).sum(axis=0)
    first_states = np.where(n_good == 2, 0, np.where(n_good == 1, 1, 2)) if ran else np.full(first.shape[1], -1)
    users, items = run.dataset.edges(TRAIN)
    n_users = np.bincount(np.unique(np.stack([users, items], 1), axis=0)[:, 1], minlength=run.dataset.n_items)
    rounds = model.round_stats[: int(model.rounds_done)].numpy()
    names = model.modality_names
    return QualityTable(modality_names=(names[0], names[1]), scores=scores.numpy(), first=first,
                        states=states.numpy(), first_states=first_states, has=model.has_modality.numpy(),
                        rewritten=model.rewritten.numpy(), n_users=n_users, rounds=rounds,
                        threshold=model.config.threshold)  # fmt: skip


def title_of(text: str | None, *, overview_words: int = 0) -> str:
    """'Kolya (1996)' from 'Kolya (1996). Comedy. After a fictitious…' (and the overview's first words)."""
    if not text:
        return "(no text)"
    parts = text.split(". ")
    title = parts[0]
    if overview_words and len(parts) > 2:
        words = ". ".join(parts[2:]).split()
        title += " — “" + " ".join(words[:overview_words]) + ("…”" if len(words) > overview_words else "”")
    return title.replace("|", "/")


def plot_histograms(table: QualityTable, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    bins = np.linspace(0, 1, 41)
    for k, axis in enumerate(axes):
        present = table.has[k] & (table.n_users > 0)
        if (table.first[k] >= 0).all():
            axis.hist(table.first[k][present], bins=bins, alpha=0.5, label="first review", color="tab:gray")
        axis.hist(table.scores[k][present], bins=bins, alpha=0.6, label="final model", color="tab:blue")
        axis.axvline(table.threshold, color="tab:red", linestyle="--", label=f"η = {table.threshold}")
        axis.set_title(f"{dataset}: s^{table.modality_names[k]} ({int(present.sum())} items)")
        axis.set_xlabel("reviewer score")
    axes[0].set_ylabel("items")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_image_examples(table: QualityTable, run: LoadedRun, path: Path, weak: list[int], strong: list[int]) -> bool:
    """Posters of the weakest- and strongest-judged images (first review) side by side, each titled with its
    first-review and final score; False when the images are not readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    k = table.modality_names.index("image")
    rows = [("judged weak", weak), ("judged strong", strong)]
    fig, axes = plt.subplots(2, N_EXAMPLES, figsize=(2.1 * N_EXAMPLES, 6.4))
    shown = 0
    for r, (label, items) in enumerate(rows):
        for c in range(N_EXAMPLES):
            axis = axes[r, c]
            axis.axis("off")
            if c >= len(items):
                continue
            item = items[c]
            image_path = run.dataset.item_image[item]
            try:
                with Image.open(image_path or "") as image:
                    axis.imshow(image.convert("RGB"))
                shown += 1
            except OSError:
                axis.text(0.5, 0.5, "(unreadable)", ha="center")
            reviewed = table.first if (table.first >= 0).all() else table.scores
            axis.set_title(f"{title_of(run.dataset.item_text[item])[:24]}\ns^image {reviewed[k, item]:.2f} "
                           f"(final {table.scores[k, item]:.2f})", fontsize=7)  # fmt: skip
        axes[r, 0].text(-0.1, 0.5, label, rotation=90, va="center", ha="right", transform=axes[r, 0].transAxes)
    fig.tight_layout()
    if shown:
        fig.savefig(path, dpi=55)
    plt.close(fig)
    return shown > 0


def examples(table: QualityTable, weak: int) -> list[int]:
    """Items whose modality ``weak`` was judged weak while the other was strong (disparity), best-known first:
    at the first review (what the rewriter acted on) when a round ran, else in the final model."""
    scores = table.first if (table.first >= 0).all() else table.scores
    strong = 1 - weak
    mask = table.has[weak] & (scores[weak] < table.threshold) & (scores[strong] >= table.threshold)
    candidates = np.flatnonzero(mask)
    order = np.lexsort((scores[weak][candidates], -table.n_users[candidates]))
    return [int(i) for i in candidates[order][:N_EXAMPLES]]


def render(table: QualityTable, run: LoadedRun, *, images_png: str | None, scores_png: str) -> str:
    names = table.modality_names
    metrics = run.metrics
    model = run.model
    assert isinstance(model, R2MR)
    config = model.config
    dataset = run.dataset
    lines = [
        f"# R2MR modality-quality report: {dataset.name}",
        "",
        f"Generated by `python -m training.experiments.r2mr_report {run.directory}`. Run: seed {metrics.get('seed')}, tag "
        f"`{metrics.get('tag') or '-'}`, best epoch {metrics.get('best_epoch')}, valid Recall@20 "
        f"{metrics.get('valid', {}).get('recall@20', float('nan')):.4f}, test Recall@20 "
        f"{metrics.get('test', {}).get('recall@20', float('nan')):.4f}. η = {table.threshold}, K = "
        f"{config.n_interests}, keep rule `{config.keep_rule}`, reviewer {config.reviewer}, rewriter {config.rewriter}.",
        "",
        "## Items per state",
        "",
        "s^m is the mean, over the item's training users and their K interests, of σ(ẽ^m · p); a missing modality "
        "scores 0. An item without training users has no evidence: both scores 0, low-quality.",
        "",
        "| state | first review | final model (best epoch) |",
        "|---|---|---|",
    ]
    for code, state in enumerate(STATE_NAMES):
        first = int((table.first_states == code).sum()) if (table.first_states >= 0).all() else "-"
        lines.append(f"| {state} | {first} | {int((table.states == code).sum())} |")
    lines += ["", "| modality | items without it | rewritten (kept) | mean s (final) | s ≥ η (final) |", "|---|---|---|---|---|"]
    for k, name in enumerate(names):
        with_users = table.has[k] & (table.n_users > 0)
        lines.append(f"| {name} | {int((~table.has[k]).sum())} | {int(table.rewritten[k].sum())} | "
                     f"{table.scores[k][with_users].mean():.3f} | {int((table.scores[k] >= table.threshold).sum())} |")  # fmt: skip
    lines += ["", f"![score histograms]({scores_png})", "", "## Review/rewrite rounds", ""]
    if table.rounds.size:
        header = ["round", "before epoch", "rewriter L1", "high", "disparity", "low"]
        for name in names:
            header += [f"{name}: candidates", "kept if s improves", "kept if s > η", "kept (rule)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r, row in enumerate(table.rounds):
            base = len(ROUND_STAT_FIELDS)
            cells = [str(r + 1), f"{row[0]:.0f}", f"{row[1]:.4f}" if np.isfinite(row[1]) else "-",
                     *(f"{v:.0f}" for v in row[2:base])]  # fmt: skip
            for k in range(2):
                block = row[base + k * len(ROUND_STAT_PER_MODALITY) : base + (k + 1) * len(ROUND_STAT_PER_MODALITY)]
                cells += ["-" if not np.isfinite(v) else f"{v:.0f}" for v in block]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "A candidate is a disparity item whose other modality is strong; its weak modality is rewritten "
                  "from the strong one and rescored. Both keep rules are counted; the run applies its own."]  # fmt: skip
    else:
        lines.append("No round ran (reviewer off, or training stopped before the first round).")
    overview = 10 if "ml100k" in dataset.name else 0
    for weak in range(2):
        strong = 1 - weak
        items = examples(table, weak)
        lines += ["", f"## Examples: {names[weak]} judged weak, {names[strong]} strong", "",
                  "Disparity items at the first review (the scores shown), best-known first; the last column says "
                  "whether a rewrite of the weak modality was kept in any round.", ""]  # fmt: skip
        if not items:
            lines.append("(none)")
            continue
        lines += [f"| item | title | s^{names[weak]} | s^{names[strong]} | training users | {names[weak]} rewritten |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        reviewed = table.first if (table.first >= 0).all() else table.scores
        for i in items:
            lines.append(f"| {dataset.item_ids[i]} | {title_of(dataset.item_text[i], overview_words=overview)} | "
                         f"{reviewed[weak, i]:.2f} | {reviewed[strong, i]:.2f} | {table.n_users[i]} | "
                         f"{'yes' if table.rewritten[weak, i] else 'no'} |")  # fmt: skip
    if images_png:
        lines += ["", f"![posters judged weak and strong]({images_png})"]
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: Path, out: Path) -> Path:
    run = load_run(run_dir)
    table = quality_table(run)
    out.mkdir(parents=True, exist_ok=True)
    name = run.dataset.name
    plot_histograms(table, out / f"{name}-scores.png", name)
    images_png = None
    if "image" in table.modality_names and any(run.dataset.item_image):
        k = table.modality_names.index("image")
        scores = table.first if (table.first >= 0).all() else table.scores
        known = np.flatnonzero(table.has[k] & (table.n_users >= 20))
        order = known[np.argsort(scores[k][known])]
        weak, strong = [int(i) for i in order[:N_EXAMPLES]], [int(i) for i in order[::-1][:N_EXAMPLES]]
        if plot_image_examples(table, run, out / f"{name}-weak-images.png", weak, strong):
            images_png = f"{name}-weak-images.png"
    path = out / f"{name}.md"
    path.write_text(render(table, run, images_png=images_png, scores_png=f"{name}-scores.png"))
    return path


def main(
    run_dir: Annotated[Path, typer.Argument(help="An r2mr training run directory.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default docs/r2mr).")] = None,
) -> None:
    from training.settings import PROJECT_ROOT

    path = write_report(run_dir, out or PROJECT_ROOT / "docs" / "r2mr")
    typer.echo(f"report: {path}")


if __name__ == "__main__":
    typer.run(main)
