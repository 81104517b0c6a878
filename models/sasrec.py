"""SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential recommendation over item ID embeddings.

A user is the output of a causal transformer at the most recent position of their left-padded history; an item's
score is the inner product with its embedding, and the same table feeds the sequence. Trained with cross-entropy
over all items, as RecBole does. The transformer (:class:`SequenceTransformer`, RecBole's post-LayerNorm blocks)
is also MP4SR's sequence encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelInputs, Recommender, Representations, SequenceBatch, UserTower

MASKED = -1e9  # finite, so that a query row with no visible key (a padding position) stays NaN-free


@dataclass(frozen=True)
class SASRecConfig:
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.5  # RecBole's SASRec hidden and attention dropout
    max_length: int = 50  # history length: the trainer, the evaluator and the exported user tower read it
    init_std: float = 0.02  # RecBole's normal initialisation of linear and embedding weights
    # "all": every position predicts its next item (SASRec's own objective; with the trainer's sequence_stride=0
    # each item is a target once per epoch, ~max_length times less compute than "last" on every prefix, RecBole's)
    train_positions: Literal["all", "last"] = "all"


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x (B, L, d); visible (B, 1, L, L) bool, True where a query position may attend to a key position."""
        b, length, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        )  # (B, h, L, dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_heads)  # (B, h, L, L)
        weights = self.dropout(scores.masked_fill(~visible, MASKED).softmax(dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(b, length, d)  # (B, L, d)
        out: torch.Tensor = self.out(y)
        return out


class TransformerBlock(nn.Module):
    """Post-LayerNorm block (RecBole): x = LN(x + attention(x)); x = LN(x + FFN(x)) with a GELU FFN."""

    def __init__(self, hidden_size: int, n_heads: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(hidden_size, n_heads, dropout)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, hidden_size)
        )
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, visible)))
        out: torch.Tensor = self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))
        return out


class SequenceTransformer(nn.Module):
    """Left-padded item embeddings (B, L, d) → the output at the most recent (last) position, (B, d).

    Position embeddings count from the end (the most recent item always sits at the last position), then
    LayerNorm and dropout, then causal self-attention blocks in which padding positions are never attended to.
    """

    def __init__(self, *, hidden_size: int, n_layers: int, n_heads: int, inner_size: int, dropout: float,
                 max_length: int) -> None:  # fmt: skip
        super().__init__()
        self.max_length = max_length
        self.position = nn.Embedding(max_length, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden_size, n_heads, inner_size, dropout) for _ in range(n_layers)]
        )

    def forward(self, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """items (B, L, d) with L ≤ max_length; present (B, L) bool, False for padding → (B, d)."""
        return self.all_positions(items, present)[:, -1]

    def all_positions(self, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The output at every position (B, L, d): position j has seen the items up to j."""
        length = items.shape[1]
        x = self.dropout(self.norm(items + self.position.weight[self.max_length - length :]))  # (B, L, d)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()  # (L, L)
        visible = causal[None, None] & present[:, None, None, :]  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, visible)
        out: torch.Tensor = x
        return out


def next_items(histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) left-padded histories (item row + 1) and their (B,) targets → (B, L) the item each position must
    predict (row + 1: the next history item, the target at the last position; 0 at padding positions)."""
    following = torch.cat([histories[:, 1:], (targets + 1).unsqueeze(1)], dim=1)
    return torch.where(histories > 0, following, 0)


def trim_left_padding(histories: torch.Tensor) -> torch.Tensor:
    """(B, L) → (B, L'): drops the leading columns that are padding in every row. Nothing else changes (positions
    count from the end and padding is never attended to); short sequences then cost what they hold."""
    used = (histories > 0).any(dim=0)  # (L,)
    first = int(used.int().argmax()) if bool(used.any()) else histories.shape[1] - 1
    return histories[:, first:]


def initialise_weights(module: nn.Module, std: float) -> None:
    """RecBole's initialisation: normal(0, std) linear and embedding weights, zero biases, identity LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SASRec(Recommender):
    batch_kind = "sequence"

    def __init__(self, config: SASRecConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(inputs.n_items, config.hidden_size)
        self.encoder = SequenceTransformer(hidden_size=config.hidden_size, n_layers=config.n_layers,
                                           n_heads=config.n_heads, inner_size=config.inner_size,
                                           dropout=config.dropout, max_length=config.max_length)  # fmt: skip
        initialise_weights(self, config.init_std)

    def encode_items(self, item_vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, L, d) vectors of a history's items (zeros at padding), (B, L) bool → (B, d) user vectors."""
        users: torch.Tensor = self.encoder(item_vectors, present)
        return users

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        histories = trim_left_padding(histories)
        table = F.pad(reps.items, (0, 0, 1, 0))  # (I + 1, d): row 0 is padding
        return self.encode_items(table[histories], histories > 0)

    def loss(self, batch: SequenceBatch) -> torch.Tensor:  # type: ignore[override]
        items = self.item_embedding.weight  # (I, d)
        if self.config.train_positions == "last":
            users = self.encode_histories(batch.histories, Representations(users=None, items=items))  # (B, d)
            return F.cross_entropy(users @ items.T, batch.targets)
        histories = trim_left_padding(batch.histories)
        present = histories > 0
        outputs = self.encoder.all_positions(F.pad(items, (0, 0, 1, 0))[histories], present)  # (B, L, d)
        labels = next_items(histories, batch.targets)  # (B, L)
        return F.cross_entropy(outputs[present] @ items.T, labels[present] - 1)

    def representations(self) -> Representations:
        return Representations(users=None, items=self.item_embedding.weight)

    def user_tower(self) -> UserTower:
        return UserTower(self, max_length=self.config.max_length)
