"""The QARM pipeline (docs/qarm.md): pair mining, alignment training, residual k-means codes, the code-based
recommender, the quantiser report and the cold-start evaluation, from one call (`mmrec qarm`).

1. A trained LightGCN (the best run of the dataset by VALIDATION Recall@20, trained here if there is none) gives
   item vectors; (trigger, target) pairs are mined from them: U2I — for each training positive, the most similar
   other item of the user's training history; I2I — each item's nearest items.
2. The alignment head (``models.qarm.AlignmentHead``) is trained on the frozen encoder features with an in-batch
   contrastive loss over the pairs; the epoch is chosen on held-out pairs (pair Recall@k), never on test.
3. FAISS k-means, level by level on the residuals, fits L codebooks of K centres on the embeddings of the items that
   have training interactions (cold items are coded afterwards, as new items are at serving time).
4. The QARM recommender is trained by the one trainer, its head and codebooks installed by the ``initialise`` hook.
5. Reports: codebook use per level, collisions and reconstruction error over a (K, L) grid; with cold items, their
   Recall@20 for QARM, the ID model (LightGCN) and content similarity with the raw (and the aligned) features.

Cold start: ``cold_share`` of the items with interactions are held out of training entirely (all their interactions
moved to test) in a derived prepared dataset ``<name>-cold<pct>``; the cold items are listed in its
``dataset.json`` report.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from models.base import ModelInputs, Recommender, Representations
from models.config import build_config, config_to_dict
from models.losses import in_batch_info_nce
from models.qarm import QARM, AlignmentHead, QARMConfig, RawFeatureFusion, content_embedder
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.data.inputs import model_inputs
from training.fit.evaluator import top_k_masked
from training.fit.metrics import per_user_metrics
from training.fit.trainer import TrainConfig, train
from training.runs import (
    has_checkpoint,
    load_run,
    read_config,
    read_metrics,
    read_report,
    reported_runs,
    run_directories,
    write_report,
)

log = logging.getLogger(__name__)

COLD_TOPK = (10, 20, 50)
QARM_REPORT = "qarm"  # the report each QARM run keeps in its run directory (qarm_report.json)


@dataclass(frozen=True)
class AlignmentTrainConfig:
    epochs: int = 40
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.1  # in-batch InfoNCE temperature on cosine similarities (CLIP-style range 0.05–0.2)
    patience: int = 5  # epochs without a better held-out pair recall before stopping
    valid_share: float = 0.1  # share of mined pairs held out to choose the epoch
    eval_k: int = 10  # pair Recall@k: is the target among the trigger's k nearest items?
    i2i_neighbours: int = 10  # I2I pairs per item from the recommender's item–item cosine
    max_pairs: int = 60_000  # cap on mined training pairs (seeded subsample): keeps an epoch a few seconds on CPU
    seed: int = 2024


@dataclass(frozen=True)
class PipelineConfig:
    cold_share: float = 0.0  # share of items held out entirely (0: the dataset's own warm split)
    cold_seed: int = 2024
    grid_sizes: tuple[int, ...] = (8, 16, 32, 64)  # K values of the quantiser report
    grid_levels: tuple[int, ...] = (2, 3, 4)  # L values of the quantiser report
    kmeans_iterations: int = 25  # faiss.Kmeans niter (its default)
    seed: int = 2024


# ============================================================================================== cold-start split
def cold_dataset_name(name: str, share: float) -> str:
    return f"{name}-cold{round(share * 100)}"


def make_cold_split(dataset: InteractionDataset, *, share: float, seed: int) -> InteractionDataset:
    """A copy of ``dataset`` where ``share`` of the items with interactions (drawn with ``seed``) are cold: every
    interaction of theirs moves to test. Warm items keep their split. The cold rows are listed in the report."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"cold share must be in (0, 1), got {share}")
    candidates = np.unique(dataset.item)
    n_cold = max(1, round(share * candidates.size))
    cold = np.sort(np.random.default_rng(seed).choice(candidates, n_cold, replace=False))
    split = dataset.split.copy()
    split[np.isin(dataset.item, cold)] = TEST
    pct = round(share * 100)
    report = {**dict(dataset.report), "cold_start": {"from": dataset.name, "share": share, "seed": seed,
                                                    "items": cold.tolist()}}  # fmt: skip
    return dataclasses.replace(dataset, name=cold_dataset_name(dataset.name, share),
                               split_name=f"{dataset.split_name}+cold{pct}-seed{seed}", split=split, report=report)  # fmt: skip


def cold_items(dataset: InteractionDataset) -> np.ndarray:
    """The cold item rows of a dataset made by :func:`make_cold_split` (empty for any other dataset)."""
    return np.asarray(dataset.report.get("cold_start", {}).get("items", []), dtype=np.int64)


def ensure_cold_dataset(datasets_root: Path, base_dir: Path, *, share: float, seed: int) -> Path:
    """The derived cold-start dataset directory next to ``base_dir``, written on first use."""
    base = InteractionDataset.load(base_dir)
    directory = datasets_root / cold_dataset_name(base.name, share)
    if (directory / "dataset.json").exists():
        existing = InteractionDataset.load(directory).report.get("cold_start", {})
        if existing.get("seed") != seed or existing.get("share") != share:
            raise ValueError(f"{directory} holds a cold split with seed {existing.get('seed')}, share "
                             f"{existing.get('share')}; remove it or use those")  # fmt: skip
        return directory
    make_cold_split(base, share=share, seed=seed).save(directory)
    return directory


# ================================================================================================ pair mining
@dataclass(frozen=True)
class MinedPairs:
    pairs: np.ndarray  # (P, 2) int64 (trigger, target), distinct
    n_u2i: int
    n_i2i: int


def mine_pairs(item_vectors: np.ndarray, users: np.ndarray, items: np.ndarray, *, eligible: np.ndarray,
               i2i_neighbours: int) -> MinedPairs:  # fmt: skip
    """(trigger, target) pairs from a recommender's item vectors, by cosine similarity.

    U2I: for each distinct training (user, target) with target eligible, the most similar OTHER eligible item of
    that user's training history (ties to the lowest row). I2I: each eligible item with its ``i2i_neighbours``
    most similar eligible items. Duplicates are removed; (a, b) and (b, a) are different pairs.
    """
    x = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    keys = np.unique(users.astype(np.int64) * item_vectors.shape[0] + items)
    user_of, item_of = keys // item_vectors.shape[0], keys % item_vectors.shape[0]
    keep = eligible[item_of]
    user_of, item_of = user_of[keep], item_of[keep]
    bounds = np.searchsorted(user_of, np.arange(user_of.max() + 2 if user_of.size else 1))
    u2i = []
    for u in range(bounds.size - 1):
        history = item_of[bounds[u] : bounds[u + 1]]  # sorted, distinct
        if history.size < 2:
            continue
        sim = x[history] @ x[history].T  # (H, H)
        np.fill_diagonal(sim, -np.inf)
        u2i.append(np.stack([history[sim.argmax(axis=1)], history], axis=1))
    u2i_pairs = np.concatenate(u2i) if u2i else np.zeros((0, 2), dtype=np.int64)
    rows = np.flatnonzero(eligible)
    k = min(i2i_neighbours, rows.size - 1)
    i2i_pairs = np.zeros((0, 2), dtype=np.int64)
    if k > 0:
        sim = x[rows] @ x[rows].T
        np.fill_diagonal(sim, -np.inf)
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        i2i_pairs = np.stack([np.repeat(rows, k), rows[top.reshape(-1)]], axis=1)
    pairs = np.unique(np.concatenate([u2i_pairs, i2i_pairs]).astype(np.int64), axis=0)
    return MinedPairs(pairs=pairs, n_u2i=int(np.unique(u2i_pairs, axis=0).shape[0]),
                      n_i2i=int(i2i_pairs.shape[0]))  # fmt: skip


# ========================================================================================== alignment training
def content_tensors(inputs: ModelInputs, names: Sequence[str]) -> list[torch.Tensor]:
    """[features (I, d_m) zeroed where absent, mask (I, 1)] per modality in ``names`` order: an embedder's inputs."""
    out = []
    for name in names:
        m = inputs.modalities[name]
        out += [m.features.float() * m.present[:, None], m.present.float()[:, None]]
    return out


@torch.no_grad()
def embed_items(embedder: torch.nn.Module, content: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    was_training = embedder.training
    embedder.eval()
    inputs = content if rows is None else [t[rows] for t in content]
    out: torch.Tensor = embedder(*inputs)
    embedder.train(was_training)
    return out


def pair_recall(embeddings: np.ndarray, pairs: np.ndarray, *, eligible: np.ndarray, k: int) -> float:
    """Share of (trigger, target) pairs whose target is among the trigger's k most similar eligible items
    (cosine, the trigger itself excluded)."""
    if pairs.shape[0] == 0:
        return float("nan")
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = x[pairs[:, 0]] @ x.T  # (P, I)
    sim[:, ~eligible] = -np.inf
    sim[np.arange(pairs.shape[0]), pairs[:, 0]] = -np.inf
    target = sim[np.arange(pairs.shape[0]), pairs[:, 1]]
    rank = (sim > target[:, None]).sum(axis=1)  # items strictly better than the target
    return float((rank < k).mean())


def symmetric_info_nce(triggers: torch.Tensor, targets: torch.Tensor, trigger_ids: torch.Tensor,
                       target_ids: torch.Tensor, *, temperature: float) -> torch.Tensor:  # fmt: skip
    """CLIP's symmetric in-batch loss over (trigger_b, target_b) pairs (B, d): each trigger against the batch's
    targets and each target against its triggers; the same item twice in a batch is not its own negative."""
    rows = torch.arange(triggers.shape[0], device=triggers.device)
    forward = in_batch_info_nce(triggers, targets, rows, temperature=temperature, key_ids=target_ids)
    backward = in_batch_info_nce(targets, triggers, rows, temperature=temperature, key_ids=trigger_ids)
    return 0.5 * (forward + backward)


@dataclass(frozen=True)
class AlignmentResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    valid_recall: float
    history: list[dict[str, float]]


def train_alignment(head: AlignmentHead, content: list[torch.Tensor], train_pairs: np.ndarray,
                    valid_pairs: np.ndarray, *, eligible: np.ndarray, config: AlignmentTrainConfig,
                    progress: Callable[[str], None] | None = None) -> AlignmentResult:  # fmt: skip
    """In-batch contrastive training of ``head`` on (trigger, target) pairs; the head is left at its best epoch
    by held-out pair Recall@k (epoch 0 = untrained)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    pairs = torch.from_numpy(train_pairs)

    def evaluate() -> float:
        return pair_recall(embed_items(head, content).numpy(), valid_pairs, eligible=eligible, k=config.eval_k)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in head.state_dict().items()}

    best_epoch, best_recall, best_state = 0, evaluate(), snapshot()
    history: list[dict[str, float]] = [{"epoch": 0, "valid_pair_recall": best_recall}]
    stale = 0
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = pairs[torch.randperm(pairs.shape[0], generator=generator)]
        total, batches = 0.0, 0
        for start in range(0, order.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]  # (B, 2)
            if batch.shape[0] < 2:
                continue
            unique, inverse = torch.unique(batch.reshape(-1), return_inverse=True)
            z = head(*[t[unique] for t in content])[inverse.reshape(-1, 2)]  # (B, 2, d): each item encoded once
            loss = symmetric_info_nce(z[:, 0], z[:, 1], batch[:, 0], batch[:, 1], temperature=config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        recall = evaluate()
        history.append({"epoch": epoch, "loss": total / max(batches, 1), "valid_pair_recall": recall})
        if progress is not None:
            progress(f"alignment epoch {epoch}: loss {total / max(batches, 1):.4f}, held-out pair recall@{config.eval_k} {recall:.4f}")
        if recall > best_recall:
            best_epoch, best_recall, best_state = epoch, recall, snapshot()
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return AlignmentResult(state=best_state, best_epoch=best_epoch, valid_recall=best_recall, history=history)


# ============================================================================================ residual k-means
@dataclass(frozen=True)
class ResidualCodebooks:
    codebooks: np.ndarray  # (L, K, d) float32
    codes: np.ndarray  # (N, L) int64: the greedy codes of the training vectors


def fit_residual_kmeans(x: np.ndarray, *, levels: int, size: int, seed: int, iterations: int = 25) -> ResidualCodebooks:
    """QARM's RQ codes: faiss.Kmeans with ``size`` centres on the vectors, then on what the nearest centre leaves
    over, ``levels`` times. Returns the codebooks and the (greedy, nearest-centre) codes of ``x``."""
    import faiss

    if x.shape[0] < size:
        raise ValueError(f"{x.shape[0]} vectors cannot fit {size} centres per level")
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codebooks, codes = [], []
    for level in range(levels):
        kmeans = faiss.Kmeans(residual.shape[1], size, niter=iterations, seed=seed + level, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1_000_000)  # fmt: skip
        kmeans.train(residual)
        centres = np.asarray(kmeans.centroids, dtype=np.float32)  # (K, d)
        _, assigned = kmeans.index.search(residual, 1)
        code = assigned[:, 0].astype(np.int64)
        residual -= centres[code]
        codebooks.append(centres)
        codes.append(code)
    return ResidualCodebooks(codebooks=np.stack(codebooks), codes=np.stack(codes, axis=1))


def faiss_residual_encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Greedy residual codes (N, L) of ``x`` with exact FAISS L2 search per level (the serving-side twin)."""
    import faiss

    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codes = []
    for centres in codebooks:
        index = faiss.IndexFlatL2(centres.shape[1])
        index.add(np.ascontiguousarray(centres, dtype=np.float32))
        _, assigned = index.search(residual, 1)
        code = assigned[:, 0].astype(np.int64)
        residual -= centres[code]
        codes.append(code)
    return np.stack(codes, axis=1)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def quantiser_report(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray) -> dict[str, Any]:
    """Codebook use per level (share of centres used, entropy in bits and over log2 K), collisions of full codes,
    and the relative reconstruction error ‖x − x̂‖² / ‖x‖² after each level (summed over items)."""
    levels, size = codebooks.shape[0], codebooks.shape[1]
    per_level = []
    reconstruction = np.zeros_like(x, dtype=np.float64)
    energy = float((x.astype(np.float64) ** 2).sum())
    for level in range(levels):
        counts = np.bincount(codes[:, level], minlength=size)
        reconstruction += codebooks[level][codes[:, level]]
        error = float(((x - reconstruction) ** 2).sum()) / max(energy, 1e-12)
        h = entropy_bits(counts)
        per_level.append({"level": level + 1, "used_share": float((counts > 0).mean()), "entropy_bits": h,
                          "entropy_norm": h / np.log2(size), "relative_error": error})  # fmt: skip
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    return {
        "K": int(size), "L": int(levels), "n_items": int(x.shape[0]),
        "levels": per_level,
        "distinct_codes": int(counts.size),
        "collision_rate": float(shared.mean()),  # share of items whose full code another item also has
        "max_items_per_code": int(counts.max()),
        "relative_error": per_level[-1]["relative_error"],
    }


# ================================================================================================= cold start
class StaticScores(Recommender):
    """Fixed user and item vectors (content-similarity baselines) behind the Recommender interface."""

    batch_kind = "none"
    users: torch.Tensor
    items: torch.Tensor

    def __init__(self, users: torch.Tensor, items: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("users", users)
        self.register_buffer("items", items)

    def representations(self) -> Representations:
        return Representations(users=self.users, items=self.items)


def content_similarity_scores(dataset: InteractionDataset, embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> StaticScores:
    """Content-only similarity: score(u, i) = mean over the modalities item i has of cos(profile_u,m, f_i,m), with
    profile_u,m the mean normalised vector of u's TRAINING items that have modality m. An absent modality is left
    out of the mean (not scored as zero). ``embeddings``: name → (vectors (I, d), present (I,))."""
    train = dataset.matrix(TRAIN)
    users, items = [], []
    present = np.stack([p for _, p in embeddings.values()], axis=1).astype(np.float64)  # (I, M)
    n_present = np.maximum(present.sum(axis=1, keepdims=True), 1.0)
    for k, (vectors, has) in enumerate(embeddings.values()):
        x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) * has[:, None]
        counts = np.maximum(np.asarray(train @ has.astype(np.float64)).reshape(-1, 1), 1.0)
        users.append(np.asarray(train @ x) / counts)  # (U, d_m)
        items.append(x * present[:, k : k + 1] / n_present)  # (I, d_m)
    return StaticScores(torch.from_numpy(np.concatenate(users, axis=1)).float(),
                        torch.from_numpy(np.concatenate(items, axis=1)).float())  # fmt: skip


@torch.no_grad()
def cold_start_metrics(model: Recommender, dataset: InteractionDataset, cold: np.ndarray, *,
                       topk: tuple[int, ...] = COLD_TOPK) -> dict[str, dict[str, float]]:  # fmt: skip
    """Metrics on the cold items' test interactions, for users who have one. ``cold_only``: the candidates are the
    cold items (the usual item cold-start protocol); ``full_catalogue``: all items, training and validation items
    of the user masked, only cold items count as hits."""
    model.eval()
    reps = model.representations()
    assert reps.users is not None, "cold-start evaluation needs a user table"
    truth = dataset.matrix(TEST)[:, cold].tocsr()  # (U, C)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    seen = ((dataset.matrix(TRAIN) + dataset.matrix(VALID)) > 0).astype(np.float32).tocsr()
    scores = (reps.users[torch.from_numpy(users)] @ reps.items.T).float().cpu()  # (B, I)
    n_relevant = np.diff(truth.indptr)[users]
    topk = tuple(k for k in topk if k <= cold.size) or (int(cold.size),)
    out = {}
    # cold_only: rank the cold items among themselves (none of them is in any user's training data)
    top = scores[:, torch.from_numpy(cold)].topk(min(max(topk), cold.size), dim=1).indices.numpy()  # (B, k)
    hits = np.take_along_axis(truth[users].toarray() > 0, top, axis=1)
    out["cold_only"] = {k: float(v.mean()) for k, v in per_user_metrics(hits, n_relevant, topk).items()
                        if k.split("@")[0] in ("recall", "ndcg")}  # fmt: skip
    full_truth = sp.csr_matrix((np.ones(cold.size), (np.zeros(cold.size, dtype=np.int64), cold)),
                               shape=(1, dataset.n_items)).toarray()[0] > 0  # fmt: skip
    top = top_k_masked(scores, seen[users], max(topk)).numpy()
    relevant = dataset.matrix(TEST)[users].toarray() > 0
    hits = np.take_along_axis(relevant & full_truth[None, :], top, axis=1)
    out["full_catalogue"] = {k: float(v.mean()) for k, v in per_user_metrics(hits, n_relevant, topk).items()
                             if k.split("@")[0] in ("recall", "ndcg")}  # fmt: skip
    out["n_users"] = {"count": float(users.size)}
    return out


# ============================================================================================== orchestration
def best_run(runs_root: Path, dataset: str, model: str, *, metric: str = "recall@20") -> Path | None:
    """The untagged run of ``model`` on ``dataset`` with the best VALIDATION ``metric`` (None if there is none)."""
    best: tuple[float, Path] | None = None
    for run_dir in run_directories(runs_root, dataset, model):
        if not has_checkpoint(run_dir):
            continue
        metrics = read_metrics(run_dir)
        if metrics.get("tag"):
            continue
        score = float(metrics.get("valid", {}).get(metric, float("-inf")))
        if best is None or score > best[0]:
            best = (score, run_dir)
    return None if best is None else best[1]


@dataclass(frozen=True)
class QarmOutcome:
    run_dir: Path | None
    report: dict[str, Any]


def run_qarm(
    dataset_dir: Path,
    *,
    runs_root: Path,
    datasets_root: Path,
    model_config: dict[str, Any] | None = None,
    train_config: TrainConfig | None = None,
    align_config: AlignmentTrainConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    lightgcn_train_config: TrainConfig | None = None,
    tag: str = "",
    echo: Callable[[str], None] = print,
) -> QarmOutcome:
    """The whole QARM pipeline on the prepared dataset in ``dataset_dir`` (see the module docstring)."""
    train_config = train_config or TrainConfig()
    align_config = align_config or AlignmentTrainConfig()
    pipeline_config = pipeline_config or PipelineConfig()
    base = InteractionDataset.load(dataset_dir)
    if pipeline_config.cold_share > 0:
        dataset_dir = ensure_cold_dataset(datasets_root, dataset_dir, share=pipeline_config.cold_share,
                                          seed=pipeline_config.cold_seed)  # fmt: skip
    dataset = InteractionDataset.load(dataset_dir)
    cold = cold_items(dataset)
    report: dict[str, Any] = {"dataset": dataset.name, "split": dataset.split_name, "n_cold_items": int(cold.size)}

    # 1. the recommender the pairs are mined from
    lightgcn_dir = best_run(runs_root, dataset.name, "lightgcn")
    if lightgcn_dir is None:
        chosen = best_run(runs_root, base.name, "lightgcn")
        lightgcn_config = read_config(chosen)["model_config"] if chosen else {}
        echo(f"no LightGCN run for {dataset.name}: training one with {lightgcn_config or 'defaults'}"
             + (f" (the config chosen on validation for {base.name})" if chosen else ""))  # fmt: skip
        trained = train(dataset, "lightgcn", dataset_dir=dataset_dir, model_config=lightgcn_config,
                        train_config=lightgcn_train_config or train_config, runs_root=runs_root)  # fmt: skip
        assert trained.run_dir is not None
        lightgcn_dir = trained.run_dir
    lightgcn = load_run(lightgcn_dir, dataset_dir=dataset_dir)
    lightgcn_config = lightgcn.config["model_config"]
    report["lightgcn"] = {"run_dir": str(lightgcn_dir), "config": lightgcn_config,
                          "valid_recall@20": lightgcn.metrics["valid"].get("recall@20"),
                          "test_recall@20": lightgcn.metrics["test"].get("recall@20")}  # fmt: skip
    echo(f"pairs from LightGCN run {lightgcn_dir} (valid recall@20 {lightgcn.metrics['valid'].get('recall@20'):.4f})")

    # QARM inherits LightGCN's validated graph settings; --set overrides them
    inherited = {k: lightgcn_config[k] for k in ("embedding_size", "n_layers", "reg_weight") if k in lightgcn_config}
    config = build_config(QARMConfig, inherited, model_config or {})
    inputs = model_inputs(dataset)
    train_users, train_items = dataset.edges(TRAIN)
    eligible = np.bincount(train_items, minlength=dataset.n_items) > 0  # items with training interactions

    # 2. pairs
    with torch.no_grad():
        lightgcn_items = lightgcn.model.representations().items.detach().float().numpy()
    mined = mine_pairs(lightgcn_items, train_users, train_items, eligible=eligible,
                       i2i_neighbours=align_config.i2i_neighbours)  # fmt: skip
    rng = np.random.default_rng(align_config.seed)
    shuffled = mined.pairs[rng.permutation(mined.pairs.shape[0])]
    n_valid = int(round(align_config.valid_share * shuffled.shape[0]))
    valid_pairs, train_pairs = shuffled[:n_valid], shuffled[n_valid:][: align_config.max_pairs]
    report["pairs"] = {"u2i": mined.n_u2i, "i2i": mined.n_i2i, "distinct": int(mined.pairs.shape[0]),
                       "train": int(train_pairs.shape[0]), "valid": int(valid_pairs.shape[0])}  # fmt: skip

    # 3. the embedding the codes quantise: aligned (trained head) or raw (the ablation)
    names = tuple(sorted(inputs.modalities))
    content = content_tensors(inputs, names)
    raw = content_embedder(dataclasses.replace(config, source="raw"), inputs)
    raw_recall = pair_recall(embed_items(raw, content).numpy(), valid_pairs, eligible=eligible, k=align_config.eval_k)
    report["alignment"] = {"config": config_to_dict(align_config), f"raw_valid_pair_recall@{align_config.eval_k}": raw_recall}
    embedder = content_embedder(config, inputs)
    embedder_state: dict[str, torch.Tensor] | None = None
    if isinstance(embedder, AlignmentHead):
        torch.manual_seed(align_config.seed)
        embedder = content_embedder(config, inputs)
        assert isinstance(embedder, AlignmentHead)
        aligned = train_alignment(embedder, content, train_pairs, valid_pairs, eligible=eligible, config=align_config,
                                  progress=log.info)  # fmt: skip
        embedder_state = aligned.state
        report["alignment"].update({"best_epoch": aligned.best_epoch,
                                    f"valid_pair_recall@{align_config.eval_k}": aligned.valid_recall,
                                    "history": aligned.history})  # fmt: skip
        echo(f"alignment: best epoch {aligned.best_epoch}, held-out pair recall@{align_config.eval_k} "
             f"{aligned.valid_recall:.4f} (raw features {raw_recall:.4f})")  # fmt: skip
    else:
        assert isinstance(embedder, RawFeatureFusion)
    embeddings = embed_items(embedder, content).numpy()  # (I, d_e)

    # 4. codebooks on the items with training interactions; the (K, L) grid report
    warm_x = embeddings[eligible]
    grid = []
    for size in pipeline_config.grid_sizes:
        for levels in pipeline_config.grid_levels:
            if warm_x.shape[0] < size:
                continue
            fitted = fit_residual_kmeans(warm_x, levels=levels, size=size, seed=pipeline_config.seed,
                                         iterations=pipeline_config.kmeans_iterations)  # fmt: skip
            grid.append(quantiser_report(warm_x, fitted.codebooks, fitted.codes))
    report["quantiser_grid"] = grid
    fitted = fit_residual_kmeans(warm_x, levels=config.code_levels, size=config.codebook_size,
                                 seed=pipeline_config.seed, iterations=pipeline_config.kmeans_iterations)  # fmt: skip
    report["quantiser"] = quantiser_report(warm_x, fitted.codebooks, fitted.codes)
    codebooks = torch.from_numpy(fitted.codebooks)

    # 5. the code-based recommender, trained by the one trainer
    def install(model: Recommender) -> None:
        assert isinstance(model, QARM)
        model.install_quantiser(codebooks, embedder_state)

    result = train(dataset, "qarm", dataset_dir=dataset_dir, model_config=config_to_dict(config),
                   train_config=train_config, runs_root=runs_root, tag=tag, initialise=install)  # fmt: skip
    model = result.model.cpu()
    assert isinstance(model, QARM)
    model_codes = model.item_codes.numpy()
    report["code_agreement"] = {
        "model_vs_faiss_kmeans_assignment": float((model_codes[eligible] == fitted.codes).all(axis=1).mean()),
        "model_vs_faiss_encode_all_items": float(
            (model_codes == faiss_residual_encode(model.content_embeddings.numpy(), fitted.codebooks)).all(axis=1).mean()),
    }  # fmt: skip
    report["qarm"] = {"run_dir": str(result.run_dir), "config": config_to_dict(config), "best_epoch": result.best_epoch,
                      "valid_recall@20": result.valid.get("recall@20"), "test_recall@20": result.test.get("recall@20")}  # fmt: skip
    echo(f"qarm: best epoch {result.best_epoch}, valid recall@20 {result.valid['recall@20']:.4f}, "
         f"test recall@20 {result.test['recall@20']:.4f}")  # fmt: skip

    # 6. cold start
    if cold.size:
        rows: dict[str, Any] = {
            "qarm": cold_start_metrics(model, dataset, cold),
            "lightgcn (ID)": cold_start_metrics(lightgcn.model, dataset, cold),
        }
        modality_vectors = {n: (m.features, m.present) for n, m in dataset.modalities.items()}
        rows["content similarity (raw features)"] = cold_start_metrics(
            content_similarity_scores(dataset, modality_vectors), dataset, cold)
        if embedder_state is not None:
            everywhere = np.ones(dataset.n_items, dtype=bool)
            rows["content similarity (aligned embedding)"] = cold_start_metrics(
                content_similarity_scores(dataset, {"aligned": (embeddings, everywhere)}), dataset, cold)
        rows["random (expected)"] = {"cold_only": {f"recall@{k}": min(k, cold.size) / cold.size for k in COLD_TOPK}}
        report["cold_start"] = rows
        for name, row in rows.items():
            full = f" (full catalogue {row['full_catalogue'].get('recall@20', np.nan):.4f})" if "full_catalogue" in row else ""
            echo(f"cold items, {name}: recall@20 {row['cold_only'].get('recall@20', np.nan):.4f}{full}")
    if result.run_dir is not None:
        write_report(result.run_dir, QARM_REPORT, report)
    return QarmOutcome(run_dir=result.run_dir, report=report)


# ================================================================================================== the report
def _fmt(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.4f}"


def render_report(runs_root: Path) -> str:
    """Markdown tables of every QARM run under ``runs_root`` (their ``qarm_report.json`` and ``metrics.json``):
    warm accuracy next to the LightGCN each mined its pairs from, cold start, alignment, and the quantiser grid."""
    reports = []
    for run_dir in reported_runs(runs_root, "qarm", QARM_REPORT):
        report = read_report(run_dir, QARM_REPORT)
        metrics = read_metrics(run_dir)
        report["_metrics"], report["_tag"] = metrics, metrics.get("tag") or ""
        report["_lightgcn_metrics"] = read_metrics(Path(report["lightgcn"]["run_dir"]))
        reports.append(report)
    lines = ["<!-- generated by `mmrec qarm-report`: do not edit by hand -->", ""]

    def label(report: dict[str, Any]) -> str:
        config = report["qarm"]["config"]
        return f"QARM ({config['source']}, K={config['codebook_size']}, L={config['code_levels']}" + (
            f", {report['_tag']})" if report["_tag"] else ")")

    warm = [r for r in reports if not r["n_cold_items"]]
    lines += ["### Warm accuracy (test, at the best validation epoch; the dataset's own split)", "",
              "| dataset | model | Recall@10 | Recall@20 | NDCG@20 | valid Recall@20 | best epoch |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for dataset in sorted({r["dataset"] for r in warm}):
        rows = [r for r in warm if r["dataset"] == dataset]
        base = rows[0]["_lightgcn_metrics"]
        lines.append(f"| {dataset} | LightGCN (pairs mined from it) | {_fmt(base['test'].get('recall@10'))} | "
                     f"{_fmt(base['test'].get('recall@20'))} | {_fmt(base['test'].get('ndcg@20'))} | "
                     f"{_fmt(base['valid'].get('recall@20'))} | {base['best_epoch']} |")  # fmt: skip
        for r in rows:
            m = r["_metrics"]
            lines.append(f"| {dataset} | {label(r)} | {_fmt(m['test'].get('recall@10'))} | {_fmt(m['test'].get('recall@20'))} | "
                         f"{_fmt(m['test'].get('ndcg@20'))} | {_fmt(m['valid'].get('recall@20'))} | {m['best_epoch']} |")  # fmt: skip
    cold = [r for r in reports if r["n_cold_items"]]
    lines += ["", "### Cold start (items held out of training entirely; their test interactions)", "",
              "`cold only`: the cold items ranked among themselves; `full`: among all items (the user's training and "
              "validation items masked), only cold items counting as hits. `warm valid`: the model's validation "
              "Recall@20 on the warm items.", "",
              "| dataset | model | cold only Recall@10 | cold only Recall@20 | cold only NDCG@20 | full Recall@20 | warm valid Recall@20 |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for dataset in sorted({r["dataset"] for r in cold}):
        rows = [r for r in cold if r["dataset"] == dataset]
        first = rows[0]
        entries: list[tuple[str, dict[str, Any], Any]] = [(label(r), r["cold_start"]["qarm"], r["_metrics"]["valid"].get("recall@20"))
                                                          for r in rows]  # fmt: skip
        for name, row in first["cold_start"].items():
            if name != "qarm":
                valid = first["_lightgcn_metrics"]["valid"].get("recall@20") if name.startswith("lightgcn") else None
                entries.append((name, row, valid))
        for r in rows[1:]:
            for name, row in r["cold_start"].items():
                if name.startswith("content similarity (aligned") and name not in first["cold_start"]:
                    entries.append((name, row, None))
        for name, row, valid in entries:
            only, full = row.get("cold_only", {}), row.get("full_catalogue", {})
            lines.append(f"| {dataset} ({first['n_cold_items']} cold items) | {name} | {_fmt(only.get('recall@10'))} | "
                         f"{_fmt(only.get('recall@20'))} | {_fmt(only.get('ndcg@20'))} | {_fmt(full.get('recall@20'))} | {_fmt(valid)} |")  # fmt: skip
    lines += ["", "### Alignment (held-out mined pairs: is the target among the trigger's 10 nearest items?)", "",
              "| dataset | pairs U2I / I2I / distinct | raw features pair Recall@10 | aligned pair Recall@10 | best epoch |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in reports:
        a = r["alignment"]
        if "best_epoch" not in a or r["_tag"]:  # variants retrain the same head: one row per dataset
            continue
        p = r["pairs"]
        lines.append(f"| {r['dataset']} | {p['u2i']} / {p['i2i']} / {p['distinct']} | {_fmt(a.get('raw_valid_pair_recall@10'))} | "
                     f"{_fmt(a.get('valid_pair_recall@10'))} | {a['best_epoch']} |")  # fmt: skip
    lines += ["", "### Quantiser (residual k-means on the items with training interactions)", "",
              "Per level: share of centres used / entropy over log2 K. Collisions: share of items whose full code another "
              "item also has. Error: ‖x − x̂‖² / ‖x‖² after the last level.", ""]  # fmt: skip
    for r in reports:
        if r["_tag"] or not r.get("quantiser_grid"):
            continue
        lines += [f"**{r['dataset']}** ({r['qarm']['config']['source']} embeddings, {r['quantiser']['n_items']} items)", "",
                  "| K | L | use / entropy per level | distinct codes | collision rate | max items per code | error |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in r["quantiser_grid"]:
            levels = ", ".join(f"{lv['used_share']:.2f}/{lv['entropy_norm']:.2f}" for lv in g["levels"])
            lines.append(f"| {g['K']} | {g['L']} | {levels} | {g['distinct_codes']} | {g['collision_rate']:.3f} | "
                         f"{g['max_items_per_code']} | {g['relative_error']:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"
