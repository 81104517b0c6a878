"""The modality-quality audit of an R2MR model: which items' text or image its reviewer judges out of line with the
interests of the users who chose them, ranked worst first, for a catalogue owner to act on.

    mmrec audit RUN_OR_BUNDLE [--out DIR] [--top N]

reads the scores of an R2MR training run (the model rebuilt from its checkpoint: ``R2MR.quality()``) or of an
exported R2MR bundle (``quality_<m>`` and ``quality_state`` in ``item_metadata.jsonl``, no torch), and writes

- ``<stem>.md``: items per state, and per modality the ``--top`` worst-judged items with score, state and evidence;
- ``<stem>.csv``: every item: id, title, per modality its score, rank (1 = worst) and presence, state, training users;
- ``<stem>-contact-sheet.png``: the images judged worst and best, titled (datasets with images only).

What a score is: s^m = mean over the item's training users and their interests of σ(ẽ^m · p), learned by the
reviewer as agreement between the item's content and what its users like (docs/r2mr.md, "What the quality scores
mean"). An item without training users scores 0 on every modality: no evidence, not a verdict, so the ranking lists
only items with at least one training user (the same rule as ``GET /v1/audit``).

A second, training-free judgement sits beside the reviewer's: the **user-profile cosine** c^m = cos(x̂_i, p_i) between the item's
feature and the sum of its training users' other items' features (``training.data.user_profile``, detector (a) of
docs/modality-quality.md). On the corruption benchmark it found damaged content better than the
reviewer in every swapped and noise cell, so the report lists its worst items too, and the CSV carries it. It needs
the training interactions, so the exporter writes it into every bundle (``profile_<m>`` in item_metadata.jsonl, what
``GET /v1/audit?by=profile`` serves) and a bundle's audit reads it there; for a bundle exported before that, the audit
computes it from the prepared dataset of the run it was exported from when that is on this machine with the same
items, and says why not otherwise.

On a corrupted run (``corruption.json``, see ``training/runs.py``) the report also says how well each ranking finds
the damaged (item, modality) pairs: precision@N of the N worst and the AUROC of (1 − s) and of the profile's flag
(1 − c; a missing modality above all, an undefined c at the median: :func:`profile_flags`). Both put a missing
modality first from the mask alone (the reviewer scores it 0 unless a kept rewrite filled it): on a ``missing``
corruption their figures measure mostly the mask. A bundle is matched with its record through the run directory its
manifest names (``metrics.run_dir``), when that run is on this machine.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import rankdata

from training.data.user_profile import user_profile_cosine
from training.runs import CorruptionRecord, read_corruption

if TYPE_CHECKING:
    from training.data.dataset import InteractionDataset

SHEET_COLUMNS = 8  # images per row of the contact sheet (worst row, best row), at most --top
PRECISION_AT = (10, 50, 100)  # plus the number of damaged items ranked
MISSING_FLAG = np.inf  # the profile flag of a modality the item lacks: above every 1 − c, so it ranks first
TITLE_WITH_YEAR = re.compile(r"^(.+?\(\d{4}\))(?:\.|$)")  # "U.S. Marshals (1998). Action. ..." -> "U.S. Marshals (1998)"


class AuditError(ValueError):
    """The path is not something the audit can read (not an R2MR run or bundle); one line for the CLI."""


@dataclass(frozen=True)
class AuditTable:
    """Per-item modality quality of one R2MR model; columns are items (row r of the dataset or bundle)."""

    source: str  # what was read, for the report: "run <dir>" or "bundle <dir> (<version>)"
    dataset: str
    item_ids: list[str]
    titles: list[str]
    modality_names: tuple[str, ...]
    scores: np.ndarray  # (M, I) float64, the reviewer's s^m (0 where the item lacks m and no rewrite filled it)
    states: list[str]  # (I,) high-quality | disparity | low-quality
    present: np.ndarray  # (M, I) bool: the item has content of this modality
    training_users: np.ndarray  # (I,) int: evidence behind the scores (0: none)
    threshold: float  # η
    images: list[str | None] | None  # image file per item; None when unavailable (see images_note)
    images_note: str
    corruption: CorruptionRecord | None
    run_summary: str  # seed / epochs / metrics line of the model
    # (M, I) float64 user-profile cosine c^m (nan where the item lacks m or none of its training users has another
    # item with m); None where the training interactions are not at hand (a bundle whose run is not on this machine)
    profile: np.ndarray | None = None
    profile_note: str = ""  # why profile is None

    @property
    def judged(self) -> np.ndarray:
        """(I,) bool: items the reviewer had evidence for (at least one training user)."""
        return self.training_users > 0

    def damaged(self, modality: str) -> np.ndarray:
        """(I,) bool: the corruption record damaged this modality of the item (all False without a record)."""
        hit = np.zeros(len(self.item_ids), dtype=bool)
        if self.corruption is None:
            return hit
        ids = self.corruption.damaged_by_modality().get(modality, set())
        for row, item_id in enumerate(self.item_ids):
            hit[row] = item_id in ids
        return hit


# ----------------------------------------------------------------------------------------------- reading
def item_title(text: str | None) -> str:
    """The title an item's text starts with: up to its "(year)" when it has one (MovieLens: "Title (1995). Genres.
    Overview"), else its first sentence (``r2mr_report.title_of``)."""
    from training.experiments.r2mr_report import title_of

    match = TITLE_WITH_YEAR.match(text or "")
    return match.group(1).replace("|", "/") if match else title_of(text)


def is_bundle(path: Path) -> bool:
    import bundle_format as bf

    return (path / bf.MANIFEST).is_file()


def audit_table(path: Path) -> AuditTable:
    """The audit table of an R2MR run directory or an R2MR bundle directory; :class:`AuditError` otherwise."""
    from training.runs import has_checkpoint, has_results, read_config

    if not path.is_dir():
        raise AuditError(f"{path}: no such directory (expected an R2MR run directory or bundle)")
    if is_bundle(path):
        return bundle_table(path)
    if has_checkpoint(path) and has_results(path):
        model = read_config(path).get("model")
        if model != "r2mr":
            raise AuditError(f"{path} is a {model} run, not r2mr: only R2MR's reviewer judges modality quality")
        return run_table(path)
    raise AuditError(f"{path} is neither a training run directory (config.json, metrics.json, checkpoint.pt) nor a "
                     "bundle (manifest.json)")  # fmt: skip


def run_table(run_dir: Path) -> AuditTable:
    """Scores of the run's best model (its review state is in the checkpoint), in eval mode."""
    import torch

    from models.r2mr import R2MR, STATE_NAMES
    from training.data.dataset import TRAIN
    from training.runs import load_run

    run = load_run(run_dir)
    model = run.model
    assert isinstance(model, R2MR)  # audit_table checked the run's model name
    with torch.no_grad():
        scores, states = model.quality()
    dataset = run.dataset  # the content the model was trained on (damaged again, for a corrupted run)
    profile = profile_cosines(dataset, tuple(model.modality_names))
    users, items = dataset.edges(TRAIN)
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    training_users = np.bincount(pairs[:, 1], minlength=dataset.n_items)
    has_images = "image" in model.modality_names and any(dataset.item_image)
    metrics = run.metrics
    return AuditTable(
        source=f"run {run_dir}", dataset=dataset.name, item_ids=list(dataset.item_ids),
        titles=[item_title(text) for text in dataset.item_text], modality_names=tuple(model.modality_names),
        scores=scores.double().numpy(), states=[STATE_NAMES[int(code)] for code in states],
        present=model.has_modality.numpy().astype(bool), training_users=training_users,
        threshold=model.config.threshold, images=list(dataset.item_image) if has_images else None,
        images_note="" if has_images else no_images_note(dataset.name, model.modality_names),
        corruption=read_corruption(run_dir), run_summary=run_summary(metrics), profile=profile,
    )  # fmt: skip


def bundle_table(bundle_dir: Path) -> AuditTable:
    """Scores of an exported bundle's trained items, from ``item_metadata.jsonl`` (what the service serves)."""
    import bundle_format as bf

    manifest = json.loads((bundle_dir / bf.MANIFEST).read_text())
    item_ids = [str(i) for i in json.loads((bundle_dir / bf.ITEM_IDS).read_text())]
    names = tuple(sorted(manifest.get("modalities") or {}))
    fields = set(((manifest.get("item_encoder") or {}).get("extra_outputs") or {}).values())
    judged_names = tuple(m for m in names if f"quality_{m}" in fields)
    model = str((manifest.get("model") or {}).get("name", "unknown"))
    if not judged_names or "quality_state" not in fields:
        served = (" (its user-profile cosines are served by GET /v1/audit?by=profile)"
                  if bf.profile_modalities(manifest) else "")  # fmt: skip
        raise AuditError(f"bundle {bundle_dir} (model {model}) has no modality quality scores (quality_<modality> and "
                         f"quality_state in its item metadata): export an R2MR run{served}")  # fmt: skip
    rows = [json.loads(line) for line in (bundle_dir / bf.ITEM_METADATA).read_text().splitlines() if line.strip()]
    scores = np.array([[float(row[f"quality_{m}"]) for row in rows] for m in judged_names], dtype=np.float64)
    present = np.stack([np.load(bundle_dir / bf.item_features_mask_file(m)) for m in judged_names]).astype(bool)
    popularity = np.load(bundle_dir / bf.POPULARITY)  # training interactions per item
    run_dir = run_of_bundle(manifest)
    images, note = bundle_images(run_dir, item_ids, judged_names)
    profile = metadata_profile(manifest, rows, judged_names)
    profile_note = ""
    if profile is None:  # a bundle exported before it carried the cosines
        profile, profile_note = bundle_profile(run_dir, item_ids, judged_names)
    dataset = str((manifest.get("dataset") or {}).get("name", "unknown"))
    return AuditTable(
        source=f"bundle {bundle_dir} ({manifest.get('bundle_version')})", dataset=dataset, item_ids=item_ids,
        titles=[item_title(row.get("text")) for row in rows], modality_names=judged_names, scores=scores,
        states=[str(row["quality_state"]) for row in rows], present=present,
        training_users=np.rint(popularity).astype(np.int64),
        threshold=float(((manifest.get("model") or {}).get("config") or {}).get("threshold", 0.5)),
        images=images, images_note=note,
        corruption=read_corruption(run_dir) if run_dir is not None else None,
        run_summary=run_summary(manifest.get("metrics") or {}), profile=profile, profile_note=profile_note,
    )  # fmt: skip


def run_of_bundle(manifest: dict[str, object]) -> Path | None:
    """The training run a bundle was exported from, when its manifest names one and it is on this machine."""
    metrics = manifest.get("metrics")
    named = metrics.get("run_dir") if isinstance(metrics, dict) else None
    return Path(named) if isinstance(named, str) and named and Path(named).is_dir() else None


def profile_cosines(dataset: InteractionDataset, modalities: tuple[str, ...]) -> np.ndarray:
    """(M, I) the user-profile cosine c^m of every item (``training.data.user_profile``)."""
    return np.stack([user_profile_cosine(dataset, m) for m in modalities])


def run_dataset_dir(run_dir: Path) -> Path:
    """The prepared dataset a run was trained on, as its config.json names it (``dataset.dir``)."""
    from training.runs import read_config

    return Path(read_config(run_dir).get("dataset", {}).get("dir", ""))


def metadata_profile(manifest: dict[str, object], rows: list[dict[str, object]],
                     modalities: tuple[str, ...]) -> np.ndarray | None:  # fmt: skip
    """(M, I) the user-profile cosines the bundle's item metadata carries (``profile_<m>``, null: nan), written at
    export from the run's training interactions; None when its manifest does not declare every modality's."""
    import bundle_format as bf

    if not set(modalities) <= set(bf.profile_modalities(manifest)):
        return None
    values = [[row.get(bf.profile_field(m)) for row in rows] for m in modalities]
    return np.array([[np.nan if v is None else float(v) for v in column] for column in values], dtype=np.float64)  # type: ignore[arg-type]


def bundle_profile(run_dir: Path | None, item_ids: list[str], modalities: tuple[str, ...]) -> tuple[np.ndarray | None, str]:
    """An older bundle's user-profile cosines (exported before it carried them), from the prepared dataset of the run
    it was exported from with the content that run trained on (damaged again, for a corrupted run), when that is on
    this machine with the same items; else None and why."""
    from training.data.dataset import DatasetFormatError, InteractionDataset
    from training.runs import corrupted_as_trained

    needs = ("the bundle was exported before bundles carried it (profile_<modality> in item_metadata.jsonl), and it "
             "needs the training interactions, which a bundle does not ship")  # fmt: skip
    if run_dir is None:
        return None, f"Not computed: {needs}, and the run the bundle was exported from is not on this machine."
    dataset_dir = run_dataset_dir(run_dir)
    try:
        dataset = corrupted_as_trained(run_dir, InteractionDataset.load(dataset_dir))
    except (DatasetFormatError, OSError) as error:
        return None, f"Not computed: {needs}, and the prepared dataset of its run could not be read ({error})."
    if [str(i) for i in dataset.item_ids] != item_ids or not set(modalities) <= set(dataset.modalities):
        return None, f"Not computed: {needs}, and the prepared dataset {dataset_dir} has other items or modalities."
    return profile_cosines(dataset, modalities), ""


def bundle_images(run_dir: Path | None, item_ids: list[str], modalities: tuple[str, ...]) -> tuple[list[str | None] | None, str]:
    """Image files of a bundle's items: a bundle ships none, so they come from the prepared dataset of the run it
    was exported from (config.json names it) when that is on this machine with the same items."""
    if "image" not in modalities:
        return None, no_images_note("this bundle", modalities)
    dataset_dir = None if run_dir is None else run_dataset_dir(run_dir)
    content = None if dataset_dir is None else dataset_dir / "item_content.jsonl"
    items = None if dataset_dir is None else dataset_dir / "items.json"
    if content is None or items is None or not content.is_file() or not items.is_file():
        return None, ("the bundle ships no images and the prepared dataset of its run is not on this machine "
                      "(manifest metrics.run_dir → config.json dataset.dir): no contact sheet")  # fmt: skip
    if [str(i) for i in json.loads(items.read_text())] != item_ids:
        return None, f"the prepared dataset {dataset_dir} has other items than the bundle: no contact sheet"
    return [json.loads(line).get("image") for line in content.read_text().splitlines()], ""


def no_images_note(dataset: str, modalities: tuple[str, ...]) -> str:
    return f"{dataset} has no images (its modalities: {', '.join(modalities)}): no contact sheet"


def run_summary(metrics: dict[str, object]) -> str:
    def metric(split: str) -> str:
        values = metrics.get(split)
        value = values.get("recall@20") if isinstance(values, dict) else None
        return f"{value:.4f}" if isinstance(value, float) else "-"

    seed = f"seed {metrics['seed']}, " if "seed" in metrics else ""
    return f"{seed}best epoch {metrics.get('best_epoch')}, valid Recall@20 {metric('valid')}, test Recall@20 {metric('test')}"


# ------------------------------------------------------------------------------------- ranking and detection
def ranking(table: AuditTable, k: int) -> np.ndarray:
    """Rows of the judged items, worst first by modality k's score, ties by id (the order of ``GET /v1/audit``)."""
    rows = np.flatnonzero(table.judged)
    ids = np.array([table.item_ids[r] for r in rows], dtype=str)
    return rows[np.lexsort((ids, table.scores[k, rows]))]


def profile_flags(table: AuditTable, k: int) -> np.ndarray:
    """(I,) 1 − c^k, higher = less in line with the item's users: ``MISSING_FLAG`` where the item lacks the modality;
    where it has it but c is undefined (none of its users has another item with it), the median of 1 − c over the
    judged items where c is defined (neutral; 0 if there are none)."""
    assert table.profile is not None
    flags = np.where(table.present[k], 1.0 - table.profile[k], MISSING_FLAG)
    undefined = np.isnan(flags)  # present, c undefined (a missing modality's flag is MISSING_FLAG, not nan)
    defined = table.judged & table.present[k] & ~undefined
    flags[undefined] = float(np.median(flags[defined])) if defined.any() else 0.0
    return flags


def profile_ranking(table: AuditTable, k: int) -> np.ndarray:
    """Rows of the judged items, least in line with their users first (by :func:`profile_flags`), ties by id."""
    rows = np.flatnonzero(table.judged)
    ids = np.array([table.item_ids[r] for r in rows], dtype=str)
    return rows[np.lexsort((ids, -profile_flags(table, k)[rows]))]


def precision_at(ranked: np.ndarray, damaged: np.ndarray, n: int) -> float:
    """Share of the first ``n`` ranked rows that are damaged (``n`` at most the ranked count)."""
    top = ranked[:n]
    return float(damaged[top].mean()) if len(top) else float("nan")


def auroc(flag: np.ndarray, positive: np.ndarray) -> float:
    """P(flag of a positive > flag of a negative) + ½ P(tie): the Mann-Whitney statistic with average ranks."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(flag)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Detection:
    """How well one modality's ranking finds the damaged items of a corruption record."""

    modality: str
    ranked: int  # judged items
    damaged: int  # damaged items of this modality among them
    unjudged_damaged: int  # damaged items without training users (not ranked)
    precision: tuple[tuple[int, float], ...]  # (N, precision@N)
    auroc: float  # of the ranking's flag over the ranked items: 1 − s, or the profile's (profile_flags)


def detection(table: AuditTable, k: int, *, by: str = "reviewer") -> Detection:
    """How modality k's ranking finds its damaged items: ``by`` "reviewer" (s^k, :func:`ranking`) or "profile"
    (the user-profile cosine, :func:`profile_ranking`; a run, or a bundle whose cosines are at hand)."""
    if by not in ("reviewer", "profile"):
        raise ValueError(f"by must be 'reviewer' or 'profile', got {by!r}")
    if by == "profile" and table.profile is None:
        raise ValueError(f"no user-profile cosine for the {table.source}: {table.profile_note}")
    name = table.modality_names[k]
    damaged = table.damaged(name)
    ranked = ranking(table, k) if by == "reviewer" else profile_ranking(table, k)
    flag = 1.0 - table.scores[k] if by == "reviewer" else profile_flags(table, k)
    judged = table.judged
    n_damaged = int(damaged[judged].sum())
    sizes = sorted({n for n in (*PRECISION_AT, n_damaged) if 0 < n <= len(ranked)})
    return Detection(modality=name, ranked=len(ranked), damaged=n_damaged,
                     unjudged_damaged=int(damaged[~judged].sum()),
                     precision=tuple((n, precision_at(ranked, damaged, n)) for n in sizes),
                     auroc=auroc(flag[judged], damaged[judged]))  # fmt: skip


# ---------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class AuditFiles:
    markdown: Path
    csv: Path
    contact_sheet: Path | None


def file_stem(table: AuditTable) -> str:
    record = table.corruption
    if record is None:
        return table.dataset
    return f"{table.dataset}-{record.kind}-p{record.fraction:g}-s{record.seed}"


def write_audit(path: Path, out: Path, *, top: int = 20) -> AuditFiles:
    """Read the run or bundle at ``path`` and write the report, the CSV and (with images) the contact sheet."""
    if top < 1:
        raise AuditError(f"--top must be at least 1, got {top}")
    table = audit_table(path)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(table)
    csv_path = write_csv(table, out / f"{stem}.csv")
    sheet = None
    if table.images is not None:
        sheet = plot_contact_sheet(table, out / f"{stem}-contact-sheet.png", columns=min(top, SHEET_COLUMNS))
    markdown = out / f"{stem}.md"
    markdown.write_text(render(table, top=top, csv_name=csv_path.name, sheet_name=sheet.name if sheet else None))
    return AuditFiles(markdown=markdown, csv=csv_path, contact_sheet=sheet)


def write_csv(table: AuditTable, path: Path) -> Path:
    """Every item, in dataset order: id, title, per modality score / rank (1 = worst; empty when not judged) /
    presence (/ damaged, on a corrupted run) (/ user-profile cosine, empty where undefined or missing, and its rank,
    where the cosines are at hand), state, training users."""
    n_modalities, n_judged = len(table.modality_names), int(table.judged.sum())
    ranks = np.zeros((n_modalities, len(table.item_ids)), dtype=np.int64)
    profile_ranks = np.zeros_like(ranks)
    for k in range(n_modalities):
        ranks[k, ranking(table, k)] = np.arange(1, n_judged + 1)
        if table.profile is not None:
            profile_ranks[k, profile_ranking(table, k)] = np.arange(1, n_judged + 1)
    damaged = [table.damaged(m) for m in table.modality_names] if table.corruption is not None else []
    header = ["id", "title"]
    for m in table.modality_names:
        header += [f"score_{m}", f"rank_{m}", f"has_{m}"] + ([f"damaged_{m}"] if damaged else [])
        header += [f"profile_{m}", f"profile_rank_{m}"] if table.profile is not None else []
    header += ["state", "training_users"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r, item_id in enumerate(table.item_ids):
            row: list[object] = [item_id, table.titles[r]]
            for k in range(len(table.modality_names)):
                row += [f"{table.scores[k, r]:.4f}", ranks[k, r] or "", int(table.present[k, r])]
                row += [int(damaged[k][r])] if damaged else []
                if table.profile is not None:
                    cosine = table.profile[k, r]
                    row += ["" if np.isnan(cosine) else f"{cosine:.4f}", profile_ranks[k, r] or ""]
            writer.writerow([*row, table.states[r], int(table.training_users[r])])
    return path


def sheet_rows(table: AuditTable, columns: int) -> tuple[list[int], list[int]]:
    """(worst, best) items for the contact sheet: judged items that have an image file, by s^image."""
    k = table.modality_names.index("image")
    assert table.images is not None
    shown = [r for r in ranking(table, k).tolist() if table.present[k, r] and table.images[r]]
    return shown[:columns], shown[::-1][:columns]


def plot_contact_sheet(table: AuditTable, path: Path, *, columns: int) -> Path | None:
    """Two rows of images, the judged worst and the judged best, each titled with id, title, s^image and state
    (and "DAMAGED" on a corrupted run). None when no image could be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    assert table.images is not None
    k = table.modality_names.index("image")
    damaged = table.damaged("image")
    worst, best = sheet_rows(table, columns)
    fig, axes = plt.subplots(2, columns, figsize=(1.9 * columns, 6.2), squeeze=False)
    shown = 0
    for r, (label, items) in enumerate((("judged worst", worst), ("judged best", best))):
        for c in range(columns):
            axis = axes[r, c]
            axis.axis("off")
            if c >= len(items):
                continue
            item = items[c]
            try:
                with Image.open(table.images[item] or "") as image:
                    axis.imshow(image.convert("RGB"))
                shown += 1
            except OSError:
                axis.text(0.5, 0.5, "(unreadable)", ha="center")
            flag = "\nDAMAGED" if damaged[item] else ""
            axis.set_title(f"{table.item_ids[item]}: {table.titles[item][:20]}\ns^image {table.scores[k, item]:.2f}, "
                           f"{table.states[item]}{flag}", fontsize=6.5)  # fmt: skip
        axes[r, 0].text(-0.08, 0.5, label, rotation=90, va="center", ha="right", transform=axes[r, 0].transAxes)
    fig.tight_layout()
    if shown:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=60, format="png")
        with Image.open(buffer) as sheet:  # a 256-colour palette: a third of the bytes, posters still recognisable
            sheet.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    plt.close(fig)
    return path if shown else None


def render(table: AuditTable, *, top: int, csv_name: str, sheet_name: str | None) -> str:
    names = table.modality_names
    judged = table.judged
    lines = [
        f"# Modality-quality audit: {table.dataset}",
        "",
        f"Generated by `mmrec audit` from the {table.source}. Model: {table.run_summary}; η = {table.threshold}.",
        "",
        "s^m is the reviewer's agreement between the item's modality m and the interests of the users who chose the "
        "item (the mean over its training users of σ(ẽ^m · p)), learned from which items users chose: not aesthetic or "
        "factual quality. A missing modality scores 0; an item without training users scores 0 everywhere (no "
        "evidence) and is not ranked. States: high-quality (both s ≥ η), disparity (one), low-quality (none). "
        "See docs/r2mr.md, \"What the quality scores mean\".",
        "",
        "| state | items | of them without training users |",
        "|---|---|---|",
    ]
    for state in ("high-quality", "disparity", "low-quality"):
        members = np.array([s == state for s in table.states], dtype=bool)
        lines.append(f"| {state} | {int(members.sum())} | {int((members & ~judged).sum())} |")
    lines += ["", "| modality | items ranked | of them without it (s = 0) | mean s | s < η |", "|---|---|---|---|---|"]
    for k, name in enumerate(names):
        ranked = table.scores[k][judged]
        lines.append(f"| {name} | {int(judged.sum())} | {int((~table.present[k] & judged).sum())} | "
                     f"{ranked.mean():.3f} | {int((ranked < table.threshold).sum())} |")  # fmt: skip
    if table.corruption is not None:
        lines += render_detection(table)
    for k in range(len(names)):
        lines += render_worst(table, k, top)
    if table.profile is not None:
        for k in range(len(names)):
            lines += render_profile_worst(table, k, top)
    else:
        lines += ["", "## The user-profile cosine", "", table.profile_note]
    lines += ["", "## Images judged worst and best", ""]
    if sheet_name is not None:
        lines += ["Judged items with an image, by s^image (worst row first); \"DAMAGED\" marks a damaged image.",
                  "", f"![images judged worst and best]({sheet_name})"]  # fmt: skip
    else:
        lines.append(table.images_note or "No image could be read: no contact sheet.")
    lines += ["", f"Every item with its scores, ranks (1 = worst) and state: [{csv_name}]({csv_name}).", ""]
    return "\n".join(lines)


def render_detection(table: AuditTable) -> list[str]:
    record = table.corruption
    assert record is not None
    by_modality = record.damaged_by_modality()
    unknown = sorted(set(by_modality) - set(table.modality_names))
    lines = ["", "## Damaged content found", "",
             f"The corruption record damaged {len(record.damaged)} (item, modality) pairs: kind `{record.kind}`, fraction "
             f"{record.fraction:g}, seed {record.seed}. Precision@N: the share of the N worst-ranked items whose "
             "modality was damaged (N = 10, 50, 100 and the number of damaged items ranked); chance: the damaged "
             "share of the ranked items. AUROC of 1 − s over the ranked items (0.5: no better than chance)."
             + (" Both rankings put a missing modality first from the mask alone (the reviewer scores it 0 unless a "
                "kept rewrite filled it): for kind `missing` these figures measure mostly the mask, not a judgement."
                if record.kind == "missing" else ""), ""]  # fmt: skip
    if unknown:
        lines += [f"The record also names modalities this model does not have: {', '.join(unknown)}.", ""]
    lines += detection_rows(table, "reviewer", "AUROC (1 − s)")
    if table.profile is not None:
        lines += ["", "Found by the user-profile cosine c instead (training-free: the item's feature against its training "
                  "users' other items; a missing modality ranks first, an undefined c at the median): precision@N of "
                  "its N worst, AUROC of 1 − c.",
                  "", *detection_rows(table, "profile", "AUROC (1 − c)")]  # fmt: skip
    return lines


def detection_rows(table: AuditTable, by: str, auroc_label: str) -> list[str]:
    """The precision@N / AUROC table of one ranking (:func:`detection`'s ``by``)."""
    lines = [f"| modality | ranked | damaged | N | damaged among the N worst | precision@N | chance | {auroc_label} |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in range(len(table.modality_names)):
        found = detection(table, k, by=by)
        chance = found.damaged / found.ranked if found.ranked else float("nan")
        for n, precision in found.precision:
            lines.append(f"| {found.modality} | {found.ranked} | {found.damaged} | {n} | {round(precision * n)} | "
                         f"{precision:.3f} | {chance:.3f} | {found.auroc:.3f} |")  # fmt: skip
        if not found.precision:
            lines.append(f"| {found.modality} | {found.ranked} | {found.damaged} | - | - | - | - | {found.auroc:.3f} |")
        if found.unjudged_damaged:
            lines.append(f"| {found.modality}: damaged without training users (not ranked) | | "
                         f"{found.unjudged_damaged} | | | | | |")  # fmt: skip
    return lines


def render_worst(table: AuditTable, k: int, top: int) -> list[str]:
    name = table.modality_names[k]
    others = [m for m in range(len(table.modality_names)) if m != k]
    scores = [(f"s^{table.modality_names[m]}", [f"{s:.3f}" for s in table.scores[m]]) for m in (k, *others)]
    return ["", f"## {name}: the {top} judged worst", "", *item_rows(table, k, ranking(table, k)[:top], scores)]


def render_profile_worst(table: AuditTable, k: int, top: int) -> list[str]:
    """The ``top`` items whose modality k is least in line with their training users' other items."""
    assert table.profile is not None
    name = table.modality_names[k]
    cosines = ["-" if np.isnan(c) else f"{c:.3f}" for c in table.profile[k]]
    scores = [(f"c^{name}", cosines), (f"s^{name}", [f"{s:.3f}" for s in table.scores[k]])]
    return ["", f"## {name}: the {top} least in line with their users' other items (user-profile cosine)", "",
            f"c^{name} = cos(item's {name} feature, sum of its training users' other items' {name} features), centred "
            "features; \"-\": the item lacks it (listed first) or none of its users has another item with it.", "",
            *item_rows(table, k, profile_ranking(table, k)[:top], scores)]  # fmt: skip


def item_rows(table: AuditTable, k: int, rows: np.ndarray, scores: list[tuple[str, list[str]]]) -> list[str]:
    """A Markdown table of ``rows`` in order: rank, id, title, the ``scores`` columns (header, cell per item), state,
    training users, whether the item has modality k (and, on a corrupted run, whether it was damaged)."""
    name = table.modality_names[k]
    damaged = table.damaged(name) if table.corruption is not None else None
    header = ["rank", "id", "title", *(title for title, _ in scores), "state", "training users", f"has {name}",
              *(["damaged"] if damaged is not None else [])]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, r in enumerate(rows.tolist(), start=1):
        cells = [str(rank), table.item_ids[r], table.titles[r], *(column[r] for _, column in scores), table.states[r],
                 str(int(table.training_users[r])), "yes" if table.present[k, r] else "no"]  # fmt: skip
        if damaged is not None:
            cells.append("yes" if damaged[r] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
