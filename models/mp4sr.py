"""MP4SR (Zhang et al., TORS 2024): multimodal pre-training for sequential recommendation via contrastive learning.

Items are represented per modality: the modality's sentence vectors are attention-pooled into one vector (masked
over padding) and adapted by a mixture-of-experts (MoE) adapter. A user history becomes one sequence per
modality, and one SASRec transformer (shared by the modalities) encodes each into a user vector per modality.

- Pre-training (``stage="pretrain"``, content only): with random item dropout and complementary sequence mixup
  (positions whose text and image embeddings are swapped), next-item InfoNCE per modality against the batch's
  distinct target items (so an in-batch item equal to the row's own target is never a negative), plus λ × a
  symmetric cross-modality InfoNCE between the text and the image user vectors of the same sequence (its last
  position; sequences with the same target are not negatives).
- Fine-tuning (``stage="finetune"``): an ID embedding is added to every item embedding; cross-entropy over all
  items with logits Σ_m cos(user_m, item_m) / τ. Weights come from a pre-training run through the trainer
  (``--train init_from=RUN_DIR``); without it this is the "without pre-training" ablation.

Deviations from the reference, each for a reason:
- Every position of a training window predicts its next item (``train_positions="all"``, SASRec's objective),
  instead of one target per prefix: the same targets for ~max_length times less compute (2 shared CPU cores).
- An item vector is the concatenation of its L2-normalised per-modality embeddings, and the user vector the
  concatenation of the normalised per-modality outputs, so the score Σ_m cos is one inner product (what the index
  serves). The transformer reads the same normalised item embeddings (times a learned scale, before the input
  LayerNorm), not the raw MoE output: then the exported user tower consumes the vectors the index holds, and an
  ingested item can appear inside a history with the vector it is recommended with.
- Our prepared datasets hold one MiniLM vector per item text (and one EfficientNet-Lite0 vector per image): each
  is a bag of one sentence, for which attention pooling is the identity; the pooling is kept general (N, S, d).
  The image path is EfficientNet-Lite0 features and a learned projection: the MoE experts' Linear(1280→d).
- A missing modality is never a zero feature: an item without it takes the mean of its present modalities'
  adapted embeddings (complementary mixup trains the encoder to read one modality's embedding in another's
  sequence), and an item with no content at all takes a learned embedding.
- Complementary mixup needs two modalities: with one (the text-only variant, amazon-scientific) it is skipped and
  the cross-modality loss is zero; with more than two, the cross-modality loss averages over pairs and mixup is
  skipped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ContentEncoder, ModelInputs, Recommender, Representations, SequenceBatch, UserTower
from models.losses import in_batch_info_nce
from models.sasrec import MASKED, SequenceTransformer, initialise_weights, next_items, trim_left_padding


@dataclass(frozen=True)
class MP4SRConfig:
    stage: Literal["pretrain", "finetune"] = "finetune"
    modalities: tuple[str, ...] = ()  # empty: every modality of the dataset; ("text",): the text-only variant
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.2
    max_length: int = 50  # history length: the trainer, the evaluator and the exported user tower read it
    n_experts: int = 8
    adapter_dropout: float = 0.2
    pooling_size: int = 64  # attention pooling: α = softmax(Linear(64→1)(Linear(d→64)(x)))
    temperature: float = 0.07
    cross_modal_weight: float = 0.01  # λ of the cross-modality contrastive loss (pre-training)
    item_drop_max: float = 0.2  # pre-training: each sequence drops items with p ~ U(0, item_drop_max)
    mixup: bool = True
    mixup_max: float = 0.5  # pre-training: each position swaps its modalities with p ~ U(0, mixup_max)
    init_std: float = 0.02  # RecBole's normal initialisation
    # "all": every position predicts its next item (SASRec's objective; with the trainer's sequence_stride=0 each
    # item is a target once per epoch, ~max_length times cheaper than "last" on every prefix as the reference does)
    train_positions: Literal["all", "last"] = "all"


class AttentionPooling(nn.Module):
    """One vector per item from its bag of sentence vectors: α = softmax over the bag of w₂ᵀ(W₁x), e = Σ α x."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.project = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, sentences: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """sentences (N, S, d), present (N, S) bool (False: padding) → (N, d)."""
        logits = self.score(self.project(sentences)).squeeze(-1).masked_fill(~present, MASKED)  # (N, S)
        alpha = logits.softmax(dim=-1) * present  # an item with no sentence pools to zero (masked upstream)
        pooled: torch.Tensor = (alpha.unsqueeze(-1) * sentences).sum(dim=1)  # (N, d)
        return pooled


class MoEAdapter(nn.Module):
    """n experts, each LayerNorm(dropout(Linear(d→h)(x))), mixed by softmax gates computed from x."""

    def __init__(self, dim: int, hidden: int, n_experts: int, dropout: float) -> None:
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.experts = nn.Linear(dim, n_experts * hidden)  # the n expert projections as one matrix
        self.norm_weight = nn.Parameter(torch.ones(n_experts, hidden))  # per-expert LayerNorm affine
        self.norm_bias = nn.Parameter(torch.zeros(n_experts, hidden))
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, h)."""
        experts = self.dropout(self.experts(x)).view(-1, self.n_experts, self.hidden)  # (N, E, h)
        experts = F.layer_norm(experts, (self.hidden,), eps=1e-12) * self.norm_weight + self.norm_bias
        gates = self.gate(x).softmax(dim=-1)  # (N, E)
        mixed: torch.Tensor = (gates.unsqueeze(-1) * experts).sum(dim=1)  # (N, h)
        return mixed


class MP4SR(Recommender):
    batch_kind = "sequence"

    def __init__(self, config: MP4SRConfig, inputs: ModelInputs) -> None:
        super().__init__()
        names = config.modalities or tuple(sorted(inputs.modalities))
        unknown = sorted(set(names) - set(inputs.modalities))
        if not names or unknown:
            raise ValueError(f"MP4SR modalities {list(names)}: the dataset has {sorted(inputs.modalities)}")
        self.config = config
        self.modality_names = tuple(names)
        self.n_items = inputs.n_items
        for k, name in enumerate(self.modality_names):
            m = inputs.modalities[name]
            self.register_buffer(f"features_{k}", m.features.float(), persistent=False)  # (I, d_m)
            self.register_buffer(f"present_{k}", m.present.bool(), persistent=False)  # (I,)
        h = config.hidden_size
        dims = [inputs.modalities[name].features.shape[1] for name in self.modality_names]
        self.pooling = nn.ModuleList([AttentionPooling(d, config.pooling_size) for d in dims])
        adapters = [MoEAdapter(d, h, config.n_experts, config.adapter_dropout) for d in dims]
        self.adapters = nn.ModuleList(adapters)
        self.no_content = nn.Parameter(torch.zeros(h))  # an item with none of the modalities
        # unit item vectors times this scale are the transformer's inputs: LayerNorm-sized, like the MoE output
        self.input_scale = nn.Parameter(torch.tensor(float(h) ** 0.5))
        self.encoder = SequenceTransformer(hidden_size=h, n_layers=config.n_layers, n_heads=config.n_heads,
                                           inner_size=config.inner_size, dropout=config.dropout,
                                           max_length=config.max_length)  # fmt: skip
        self.id_embedding = nn.Embedding(inputs.n_items, h) if config.stage == "finetune" else None
        initialise_weights(self, config.init_std)
        for adapter in adapters:
            nn.init.zeros_(adapter.gate.weight)  # uniform expert mixture at the start (UniSRec, MP4SR)
        nn.init.normal_(self.no_content, std=config.init_std)

    @property
    def n_modalities(self) -> int:
        return len(self.modality_names)

    # ------------------------------------------------------------------------------------------ item side
    def content_embeddings(self, features: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """Per-modality adapted embeddings (N, M, h) from features (N, d_m) and presence (N,) bool or float."""
        adapted = []
        for k, x in enumerate(features):
            bag = x.unsqueeze(1)  # (N, 1, d_m): one sentence vector per item in our datasets
            pooled = self.pooling[k](bag, torch.ones(bag.shape[:2], dtype=torch.bool, device=x.device))
            adapted.append(self.adapters[k](pooled))
        stacked = torch.stack(adapted, dim=1)  # (N, M, h)
        mask = torch.stack([p.float() for p in present], dim=1).unsqueeze(-1)  # (N, M, 1)
        n_present = mask.sum(dim=1, keepdim=True)  # (N, 1, 1)
        mean_present = (stacked * mask).sum(dim=1, keepdim=True) / n_present.clamp(min=1.0)  # (N, 1, h)
        fallback = torch.where(n_present > 0, mean_present, self.no_content)  # (N, 1, h)
        return torch.where(mask > 0, stacked, fallback)  # (N, M, h)

    def item_vectors(self) -> torch.Tensor:
        """(I, M·h): each modality's embedding (+ ID when fine-tuning), L2-normalised, concatenated."""
        features = [getattr(self, f"features_{k}") for k in range(self.n_modalities)]
        present = [getattr(self, f"present_{k}") for k in range(self.n_modalities)]
        e = self.content_embeddings(features, present)  # (I, M, h)
        if self.id_embedding is not None:
            e = e + self.id_embedding.weight.unsqueeze(1)
        return F.normalize(e, dim=-1).flatten(1)

    def representations(self) -> Representations:
        return Representations(users=None, items=self.item_vectors())

    def content_encoder(self) -> ContentEncoder:
        return MP4SRContentEncoder(self)

    # ------------------------------------------------------------------------------------------ user side
    def encode_positions(self, sequences: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """sequences (B, L, M, h) of unit item embeddings, present (B, L) → (B, L, M, h) unit user vectors at every
        position; the transformer, shared by the modalities, reads each modality's sequence separately."""
        b, length, m, h = sequences.shape
        x = sequences.transpose(1, 2).reshape(b * m, length, h) * self.input_scale  # (B·M, L, h)
        out = self.encoder.all_positions(x, present.repeat_interleave(m, dim=0))  # (B·M, L, h)
        return F.normalize(out.view(b, m, length, h).transpose(1, 2), dim=-1)

    def encode_items(self, item_vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, length, _ = item_vectors.shape
        sequences = item_vectors.view(b, length, self.n_modalities, self.config.hidden_size)
        return self.encode_positions(sequences, present)[:, -1].flatten(1)  # (B, M·h)

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        histories = trim_left_padding(histories)
        table = F.pad(reps.items, (0, 0, 1, 0))  # (I + 1, M·h): row 0 is padding
        return self.encode_items(table[histories], histories > 0)

    def user_tower(self) -> UserTower:
        return UserTower(self, max_length=self.config.max_length)

    # ---------------------------------------------------------------------------------------- augmentation
    def drop_items(self, sequences: torch.Tensor, *, keep_last: int) -> torch.Tensor:
        """Each sequence drops each item with its own p ~ U(0, item_drop_max), never its ``keep_last`` most recent;
        the remaining items close up to the right (left padding again), in order. (B, L) → (B, L)."""
        b, length = sequences.shape
        present = sequences > 0
        p = torch.rand(b, 1, device=sequences.device) * self.config.item_drop_max
        keep = present & (torch.rand(b, length, device=sequences.device) >= p)
        keep[:, length - keep_last :] = present[:, length - keep_last :]
        positions = torch.arange(1, length + 1, device=sequences.device)
        order = torch.argsort(torch.where(keep, positions, 0), dim=1, stable=True)  # dropped first, then kept
        n_kept = keep.sum(dim=1, keepdim=True)
        return torch.where(positions > length - n_kept, sequences.gather(1, order), 0)

    def complementary_mixup(self, sequences: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, L, 2, h): each sequence swaps the two modality embeddings of each item with p ~ U(0, mixup_max),
        giving two complementary mixed sequences."""
        b, length = present.shape
        p = torch.rand(b, 1, device=present.device) * self.config.mixup_max
        swap = present & (torch.rand(b, length, device=present.device) < p)  # (B, L)
        return torch.where(swap[:, :, None, None], sequences.flip(2), sequences)

    # ------------------------------------------------------------------------------------------------ loss
    def predicting_positions(self, users: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """From (B, L, M, h) user vectors at every position: the (N, M, h) ones that predict something and their
        (N,) target rows; every non-padding position (train_positions "all") or the last one ("last")."""
        if self.config.train_positions == "last":
            return users[:, -1], targets
        present = histories > 0
        return users[present], next_items(histories, targets)[present] - 1

    def loss(self, batch: SequenceBatch) -> torch.Tensor:  # type: ignore[override]
        cfg, m, h = self.config, self.n_modalities, self.config.hidden_size
        items = self.item_vectors()  # (I, M·h)
        table = F.pad(items, (0, 0, 1, 0))  # (I + 1, M·h): row 0 is padding
        if cfg.stage == "finetune":
            histories = trim_left_padding(batch.histories)
            sequences = table[histories].view(*histories.shape, m, h)  # (B, L, M, h)
            all_users = self.encode_positions(sequences, histories > 0)  # (B, L, M, h)
            users, targets = self.predicting_positions(all_users, histories, batch.targets)
            return F.cross_entropy(users.flatten(1) @ items.T / cfg.temperature, targets)
        # pre-training: item dropout over the history and its target, then complementary mixup, then InfoNCE
        dropped = self.drop_items(
            torch.cat([batch.histories, (batch.targets + 1).unsqueeze(1)], dim=1), keep_last=2
        )
        histories, last_targets = trim_left_padding(dropped[:, :-1]), dropped[:, -1] - 1
        sequences = table[histories].view(*histories.shape, m, h)  # (B, L, M, h)
        if cfg.mixup and m == 2:
            sequences = self.complementary_mixup(sequences, histories > 0)
        all_users = self.encode_positions(sequences, histories > 0)  # (B, L, M, h)
        users, targets = self.predicting_positions(all_users, histories, last_targets)  # (N, M, h), (N,)
        # next-item InfoNCE per modality; the negatives are the batch's other distinct target items
        candidates, positives = torch.unique(targets, return_inverse=True)  # (K,), (N,)
        keys = items[candidates].view(-1, m, h)  # (K, M, h)
        loss = torch.stack([
            in_batch_info_nce(users[:, k], keys[:, k], positives, temperature=cfg.temperature) for k in range(m)
        ]).sum()  # fmt: skip
        if m > 1 and cfg.cross_modal_weight > 0:
            loss = loss + cfg.cross_modal_weight * self.cross_modal_loss(all_users[:, -1], last_targets)
        return loss

    def cross_modal_loss(self, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between two modalities' (B, M, h) user vectors of the same sequence, the batch's other
        sequences as negatives unless they have the same target; the mean over modality pairs."""
        rows = torch.arange(users.shape[0], device=users.device)
        t = self.config.temperature
        return torch.stack([
            0.5 * (in_batch_info_nce(users[:, a], users[:, b], rows, temperature=t, key_ids=targets)
                   + in_batch_info_nce(users[:, b], users[:, a], rows, temperature=t, key_ids=targets))
            for a, b in itertools.combinations(range(self.n_modalities), 2)
        ]).mean()  # fmt: skip


class MP4SRContentEncoder(ContentEncoder):
    """A new item's MP4SR vector from its content alone (no ID embedding was learned for it)."""

    def __init__(self, model: MP4SR) -> None:
        super().__init__()
        self.modality_names = model.modality_names
        self.model = model

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        features = list(features_and_masks[0::2])  # (N, d_m) each
        present = [mask[:, 0] for mask in features_and_masks[1::2]]  # (N,) float each
        e = self.model.content_embeddings(features, present)  # (N, M, h)
        return F.normalize(e, dim=-1).flatten(1)
