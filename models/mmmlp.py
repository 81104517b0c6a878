"""MMMLP (Liang et al., WWW 2023): multi-modal multilayer perceptron for sequential recommendation.

A user history becomes one sequence per modality: the items' ID embeddings, and for each content modality (text,
image) the items' projected features. Three modules, as in the paper:

- Feature Mixer Layer, one per sequence: an input LayerNorm, then ``n_layers`` MLP-Mixer blocks. A block mixes the
  L positions of each channel (token mixing), then the channels of each position (channel mixing), each a two-layer
  GELU MLP (width × ``expansion``) in a pre-LayerNorm residual:
      X ← X + (W₂ σ(W₁ LN(X)ᵀ))ᵀ        W₁ (4L × L), W₂ (L × 4L): across positions
      X ← X + W₄ σ(W₃ LN(X))             W₃ (4h × h), W₄ (h × 4h): across channels
- Fusion Mixer Layer: the S = 1 + M mixed sequences concatenated along channels, (B, L, S·h), ``fusion_layers``
  Mixer blocks over that concatenation, then LayerNorm and a Linear(S·h → h) per position.
- Prediction Layer: the most recent position's fused vector, LayerNorm'd, is the user state s (h); the score of item
  i is s · e_i with e_i the item's ID embedding (the table the ID sequence reads). Cross-entropy over all items.

The paper's token-mixing MLP is fully connected across positions, so a position sees the items after it; the
authors' code (RecBole) trains one prefix per example. That costs ~max_length times the compute of SASRec's
every-position objective, which the trainer uses here (2 shared CPU cores), so by default the token-mixing MLPs are
masked causally (``token_mixing="causal"``: position j reads positions ≤ j; the last position, the user state, still
reads the whole history) and every position of a window predicts its next item. ``token_mixing="full"`` with
``train_positions="last"`` and the trainer's ``sequence_stride=1`` is the paper's form.

Serving (the one user-tower contract): an item's vector is [e_id | c_1 | … | c_M] (S·h), c_m its projected content
for modality m (a learned vector where the item lacks m); the user tower reads those vectors for the history and
returns [s | 0 … 0], so that user · item = s · e_id, the model's own score, for every item. A new item's content
slots come from the projections; its ID slot is a ridge map from content to the trained ID embeddings.

Where this follows the authors' code (github.com/Applied-Machine-Learning-Lab/MMMLP, ``mmmlp.py``) and where not,
and why: docs/models/mmmlp.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ContentEncoder, ModelInputs, Recommender, Representations, SequenceBatch, UserTower
from models.layers import SameDrawsDropout
from models.ridge import fit_ridge
from models.sasrec import initialise_weights, next_items


@dataclass(frozen=True)
class MMMLPConfig:
    modalities: tuple[str, ...] = ()  # content sequences beside the ID one; empty: every modality of the dataset
    hidden_size: int = 64  # the code's text/image vectors are 128-d; 64 as SASRec and MP4SR here (CPU budget)
    n_layers: int = 2  # Mixer blocks per Feature Mixer Layer (RecBole's n_layers default, the code's ID branch)
    fusion_layers: int = 1  # Mixer blocks over the concatenated sequences (the paper); 0: the code's LN + Linear only
    expansion: int = 4  # both mixing MLPs are width × 4 inside (the code's expansion_factor)
    dropout: float = 0.5  # RecBole's hidden_dropout_prob default, after each GELU and each mixing MLP
    max_length: int = 50  # L: the token-mixing MLPs are L × 4L; the trainer, evaluator and user tower read it
    layer_norm_eps: float = 1e-12  # RecBole's layer_norm_eps (input, fusion and output norms; Mixer blocks: 1e-5)
    init_std: float = 0.02  # RecBole's normal initialisation; token-mixing layers keep PyTorch's default (Conv1d's)
    # "causal": position j's token mixing reads positions ≤ j, so every position of a window can predict its next
    # item (train_positions="all", ~max_length times less compute than one prefix per example: 2 shared CPU cores);
    # "full": the paper's MLP over all L positions, which sees later items: only with train_positions="last" and the
    # trainer's sequence_stride=1 (one example per prefix, as the authors' RecBole code trains it)
    token_mixing: Literal["causal", "full"] = "causal"
    train_positions: Literal["all", "last"] = "all"


class MixerMLP(nn.Module):
    """Linear(n → e·n) → GELU → dropout → Linear(e·n → n) → dropout, over the channels of (B, L, n) or, with
    ``across_positions``, over the n = L positions of (B, L, d) for each channel (the code's Conv1d, kernel 1).

    ``causal`` (across positions only): hidden unit u belongs to position u // e and reads positions ≤ it; output
    position j reads the hidden units of positions ≤ j. Output j then depends on inputs ≤ j only (MADE-style masks
    on both weight matrices); the last position still reads every position."""

    expand_mask: torch.Tensor
    contract_mask: torch.Tensor

    def __init__(self, size: int, expansion: int, dropout: float, *, across_positions: bool = False,
                 causal: bool = False) -> None:  # fmt: skip
        super().__init__()
        if causal and not across_positions:
            raise ValueError("a causal MixerMLP mixes positions: causal needs across_positions")
        self.expand = nn.Linear(size, expansion * size)
        self.contract = nn.Linear(expansion * size, size)
        self.dropout = SameDrawsDropout(dropout)
        self.across_positions, self.causal = across_positions, causal
        if causal:
            group = torch.arange(expansion * size) // expansion  # (e·n,) the position of each hidden unit
            position = torch.arange(size)  # (n,)
            self.register_buffer("expand_mask", (position[None, :] <= group[:, None]).float(), persistent=False)
            self.register_buffer("contract_mask", (group[None, :] <= position[:, None]).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expand, contract = self.expand.weight, self.contract.weight  # (e·n, n), (n, e·n)
        if self.causal:
            expand, contract = expand * self.expand_mask, contract * self.contract_mask
        if self.across_positions:  # x (B, L, d): the MLP runs on each channel's (L,) column
            x = x.transpose(1, 2)  # (B, d, L)
        hidden = self.dropout(F.gelu(F.linear(x, expand, self.expand.bias)))  # (B, ·, e·n)
        out: torch.Tensor = self.dropout(F.linear(hidden, contract, self.contract.bias))  # (B, ·, n)
        return out.transpose(1, 2) if self.across_positions else out


class MixerBlock(nn.Module):
    """One MLP-Mixer layer on a (B, L, d) sequence, each half a pre-LayerNorm residual (the code's PreNormResidual):
    token mixing X ← X + MLP_L(LN(X)) across the L positions, then channel mixing X ← X + MLP_d(LN(X))."""

    def __init__(self, length: int, channels: int, expansion: int, dropout: float, *, causal: bool) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(channels)
        self.token_mlp = MixerMLP(length, expansion, dropout, across_positions=True, causal=causal)
        self.channel_norm = nn.LayerNorm(channels)
        self.channel_mlp = MixerMLP(channels, expansion, dropout)

    def forward(self, x: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """x (B, L, d) → (B, L, d), or (B, 1, d) with ``last_only``: channel mixing at the last position only."""
        x = x + self.token_mlp(self.token_norm(x))
        if last_only:
            x = x[:, -1:]
        out: torch.Tensor = x + self.channel_mlp(self.channel_norm(x))
        return out


class FeatureMixer(nn.Module):
    """Feature Mixer Layer of one modality's sequence: LayerNorm, then ``n_layers`` Mixer blocks. (B, L, h) → same."""

    def __init__(self, config: MMMLPConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([MixerBlock(config.max_length, h, config.expansion, config.dropout,
                                                causal=config.token_mixing == "causal")
                                     for _ in range(config.n_layers)])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for block in self.blocks:
            x = block(x)
        return x


class FusionMixer(nn.Module):
    """Fusion Mixer Layer: Mixer blocks over the concatenated sequences (B, L, S·h), then LayerNorm and
    Linear(S·h → h) at each position → (B, L, h)."""

    def __init__(self, config: MMMLPConfig, n_sequences: int) -> None:
        super().__init__()
        width = n_sequences * config.hidden_size
        self.blocks = nn.ModuleList([MixerBlock(config.max_length, width, config.expansion, config.dropout,
                                                causal=config.token_mixing == "causal")
                                     for _ in range(config.fusion_layers)])  # fmt: skip
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.project = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """x (B, L, S·h) → (B, L, h), or (B, 1, h) with ``last_only``: after the last token mixing, only the last
        position is computed (the fusion's channel MLP, 4·S·h wide, is the largest layer of the model)."""
        for k, block in enumerate(self.blocks):
            x = block(x, last_only=last_only and k == len(self.blocks) - 1)
        if last_only:
            x = x[:, -1:]  # (B, 1, S·h); a no-op after a block that already kept it
        out: torch.Tensor = self.project(self.norm(x))
        return out


class MMMLP(Recommender):
    batch_kind = "sequence"

    def __init__(self, config: MMMLPConfig, inputs: ModelInputs) -> None:
        super().__init__()
        names = config.modalities or tuple(sorted(inputs.modalities))
        unknown = sorted(set(names) - set(inputs.modalities))
        if not names or unknown:
            raise ValueError(f"MMMLP modalities {list(names)}: the dataset has {sorted(inputs.modalities)}")
        if config.max_length < 1 or config.n_layers < 0 or config.fusion_layers < 0:
            raise ValueError(f"MMMLP needs max_length ≥ 1 and n_layers, fusion_layers ≥ 0; got {config}")
        if config.token_mixing == "full" and config.train_positions == "all":
            raise ValueError("MMMLP token_mixing='full' lets a position see the items after it: train it with "
                             "train_positions='last' (and the trainer's sequence_stride=1)")
        self.config = config
        self.modality_names = tuple(names)
        self.n_items = inputs.n_items
        h = config.hidden_size
        for k, name in enumerate(self.modality_names):
            m = inputs.modalities[name]
            self.register_buffer(f"features_{k}", m.features.float(), persistent=False)  # (I, d_m)
            self.register_buffer(f"present_{k}", m.present.bool(), persistent=False)  # (I,)
        self.id_embedding = nn.Embedding(inputs.n_items, h)
        dims = [inputs.modalities[name].features.shape[1] for name in self.modality_names]
        self.projections = nn.ModuleList([nn.Linear(d, h) for d in dims])  # features (d_m) → the sequence's h
        self.missing = nn.Parameter(torch.zeros(len(dims), h))  # (M, h): the slot of an item without modality m
        self.feature_mixers = nn.ModuleList([FeatureMixer(config) for _ in range(self.n_sequences)])  # ID first
        self.fusion = FusionMixer(config, self.n_sequences)
        self.output_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        initialise_weights(self, config.init_std)
        nn.init.normal_(self.missing, std=config.init_std)
        for block in self.mixer_blocks():  # the code's token mixers are Conv1d(k=1), untouched by its init
            block.token_mlp.expand.reset_parameters()
            block.token_mlp.contract.reset_parameters()

    @property
    def n_sequences(self) -> int:
        """S: the ID sequence and one sequence per content modality."""
        return 1 + len(self.modality_names)

    def mixer_blocks(self) -> list[MixerBlock]:
        return [m for m in self.modules() if isinstance(m, MixerBlock)]

    # ------------------------------------------------------------------------------------------ item side
    def content_slots(self, features: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """(N, M, h): each modality's projected features (N, d_m) where present (N,) bool, its learned missing
        vector where not (an absent modality's feature row is never read)."""
        slots = [torch.where(p[:, None], self.projections[k](x), self.missing[k])
                 for k, (x, p) in enumerate(zip(features, present, strict=True))]  # fmt: skip
        return torch.stack(slots, dim=1)

    def item_vectors(self) -> torch.Tensor:
        """(I, S·h): [ID embedding | content slot of each modality] — what the index holds and the tower reads."""
        features = [getattr(self, f"features_{k}") for k in range(len(self.modality_names))]
        present = [getattr(self, f"present_{k}") for k in range(len(self.modality_names))]
        return torch.cat([self.id_embedding.weight, self.content_slots(features, present).flatten(1)], dim=1)

    def representations(self) -> Representations:
        return Representations(users=None, items=self.item_vectors())

    def content_encoder(self) -> ContentEncoder:
        return MMMLPContentEncoder(self)

    # ------------------------------------------------------------------------------------------ user side
    def positions(self, item_vectors: torch.Tensor, present: torch.Tensor, *,
                  last_only: bool = False) -> torch.Tensor:  # fmt: skip
        """(B, L', S·h) item vectors of left-padded histories and (B, L') bool → (B, L, h): the LayerNorm'd fused
        vector at every position (causal token mixing: position j has seen the items up to j); with ``last_only``
        (B, 1, h), the most recent position's alone.

        Histories are fitted to L = max_length first (the most recent L items, left-padded): the token-mixing
        weights are per position. Padding positions enter as zero vectors, whatever the input holds there."""
        length, cap = item_vectors.shape[1], self.config.max_length
        if length > cap:
            item_vectors, present = item_vectors[:, length - cap :], present[:, length - cap :]
        elif length < cap:
            item_vectors = F.pad(item_vectors, (0, 0, cap - length, 0))
            present = F.pad(present, (cap - length, 0))
        b, h = item_vectors.shape[0], self.config.hidden_size
        x = torch.where(present[..., None], item_vectors, 0.0).view(b, cap, self.n_sequences, h)  # (B, L, S, h)
        mixed = [mixer(x[:, :, s]) for s, mixer in enumerate(self.feature_mixers)]  # S × (B, L, h)
        fused = self.fusion(torch.cat(mixed, dim=-1), last_only=last_only)  # (B, L or 1, h)
        out: torch.Tensor = self.output_norm(fused)
        return out

    def user_states(self, item_vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The Prediction Layer's user state s (B, h): the most recent position's fused vector.

        Only that position goes through the fusion's channel mixing, except in training: there the other
        positions' dropout masks are drawn too, as before, so that a seed keeps its draws
        (``train_positions="last"``)."""
        return self.positions(item_vectors, present, last_only=not self.training)[:, -1]

    def encode_items(self, item_vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, L, S·h), (B, L) → (B, S·h) user vectors [s | 0 … 0]: their inner product with an item vector is
        s · e_id, the Prediction Layer's score."""
        users = self.user_states(item_vectors, present)
        return F.pad(users, (0, (self.n_sequences - 1) * self.config.hidden_size))

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        table = F.pad(reps.items, (0, 0, 1, 0))  # (I + 1, S·h): row 0 is padding
        return self.encode_items(table[histories], histories > 0)

    def user_tower(self) -> UserTower:
        return UserTower(self, max_length=self.config.max_length)

    def loss(self, batch: SequenceBatch) -> torch.Tensor:  # type: ignore[override]
        """Cross-entropy over all items of s · e_i: each history's last position predicts its target
        (``train_positions="last"``), or every non-padding position its next item (``"all"``, causal mixing)."""
        table = F.pad(self.item_vectors(), (0, 0, 1, 0))  # (I + 1, S·h)
        items = self.id_embedding.weight  # (I, h)
        if self.config.train_positions == "last":
            users = self.user_states(table[batch.histories], batch.histories > 0)  # (B, h)
            return F.cross_entropy(users @ items.T, batch.targets)
        histories = batch.histories[:, -self.config.max_length :]
        length = histories.shape[1]
        outputs = self.positions(table[histories], histories > 0)[:, -length:]  # (B, L', h)
        present = histories > 0
        labels = next_items(histories, batch.targets)  # (B, L')
        return F.cross_entropy(outputs[present] @ items.T, labels[present] - 1)


def content_features(features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """The ridge map's input from (N, d_m) features and (N, 1) float masks: [f_m · mask_m, mask_m, …, 1]."""
    parts = [p for f, m in zip(features, masks, strict=True) for p in (f * m, m)]
    return torch.cat([*parts, torch.ones_like(masks[0])], dim=1)  # (N, F + 1)


class MMMLPContentEncoder(ContentEncoder):
    """A new item's vector [ID slot | content slots] from its features alone (exported to ONNX).

    The content slots are the model's own (projection, or the learned missing vector). A new item has no ID
    embedding: its ID slot is a ridge map from content to the trained items' ID embeddings (``models.ridge``,
    strength by held-out cosine on a seeded 10 % of items), fitted when the encoder is built, so that its score
    s · ê_id is the best linear guess from content.
    """

    id_map: torch.Tensor

    def __init__(self, model: MMMLP, *, holdout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.modality_names = model.modality_names
        self.model = model
        with torch.no_grad():
            n = len(self.modality_names)
            features = [getattr(model, f"features_{k}").cpu() for k in range(n)]
            masks = [getattr(model, f"present_{k}").cpu().float()[:, None] for k in range(n)]
            x = content_features(features, masks)  # (I, F + 1)
            held = torch.rand(model.n_items, generator=torch.Generator().manual_seed(seed)) < holdout
            fit = fit_ridge(x, model.id_embedding.weight.detach().cpu(), held, criterion="cosine")
        device = model.id_embedding.weight.device
        self.register_buffer("id_map", fit.weight.float().to(device), persistent=False)  # (F + 1, h)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        features = list(features_and_masks[0::2])  # (N, d_m) each
        masks = list(features_and_masks[1::2])  # (N, 1) float each
        ids = content_features(features, masks) @ self.id_map  # (N, h)
        slots = self.model.content_slots(features, [m[:, 0] > 0.5 for m in masks])  # (N, M, h)
        return torch.cat([ids, slots.flatten(1)], dim=1)
