"""MCLN (Li, Guo, Liu, Hong & Xue, SIGIR 2023): multimodal counterfactual learning network — filtration.

Follows the authors' TensorFlow code (github.com/shuaiyangli/MCLN, ``Model-*/model-*.py``; the paper's release link
is hfutmars/MCLN); docs/models/mcln.md lists every deviation. With d the embedding size and M content modalities:

- Collaborative part: LightGCN over the training graph (``n_layers`` layers, the mean of layers 0..L): users u,
  items e_i.
- Content parts: per modality m, c^m_i = W_m x̂^m_i (no bias), x̂ the L2-normalised feature, zero where absent.
- Tokens: t_i = [e_i ‖ c^1_i ‖ … ‖ c^M_i] of width D = (1 + M)·d.
- The counterfactual filter: ``n_blocks`` blocks over a SET of tokens (the authors' attention runs across the rows of a
  batch), each a counterfactual attention then a feed-forward layer:

      logits[q, k] = (Q h_q · K h_k − Q' t'_q · K' t'_k) / √D      factual minus counterfactual attention
      h ← LN(h + W_o softmax_k(logits) V h)
      h ← LN(h + ReLU(W_2 ReLU(W_1 h + b_1) + b_2))                 (W_1: D → 4D)

  where t' are the counterfactual tokens (layer 0, never updated): in training, for the positive items, the tokens of
  one UN-interacted item sampled per row for the same user — the counterfactual world whose attention pattern is
  removed from the factual one, so what the filter keeps is what the interacted items share beyond what any item
  shares; the negatives pass the filter without the counterfactual term, as in the authors' code. For ranking the
  set is the whole catalogue and t' = t (the authors evaluate with the candidates as their own counterfactual).
- Filtered part: f_i = ReLU(W_f h_i) (D → d, no bias).
- Score: r̂_ui = u · (e_i + Σ_m c^m_i + f_i), an inner product; ranking the catalogue as one set makes f_i
  user-independent, so ``representations()`` returns users u and items e_i + Σ_m c^m_i + f_i.
- Loss: Σ over the parts p ∈ {e, c^1, …, c^M, f} of BPR(u · p_i⁺, u · p_i⁻) (one BPR per part, as the authors) +
  reg_weight · (½ Σ‖·‖² / B) of the batch's layer-0 user/item embeddings and of its c and f vectors.

Missing modalities: an absent modality's block is zero (whatever its feature row holds). A new item (content
encoder): zero ID part, its content parts, and f from its token attending over the trained catalogue's per-block
states (held fixed) and itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (
    ContentEncoder,
    ModelInputs,
    PairwiseBatch,
    Recommender,
    Representations,
    require_modalities,
)
from models.graph import light_propagate, normalized_bipartite_adjacency, to_csr
from models.losses import bpr_loss, squared_l2_penalty

QUERY_CHUNK = 4096  # catalogue rows attended at once when ranking: bounds the (chunk, I) logits in memory


@dataclass(frozen=True)
class MCLNConfig:
    embedding_size: int = 64  # the authors' embed_size
    n_layers: int = 5  # LightGCN layers (the authors' n_layers = 5)
    n_blocks: int = 2  # counterfactual attention + feed-forward blocks (the authors' n_mca = 2)
    ffn_multiplier: int = 4  # feed-forward inner width = 4·D, as the authors' code
    reg_weight: float = 1e-2  # the authors' decay, on ½Σ‖·‖²/B (their tf.nn.l2_loss / batch_size)
    # Training sets: consecutive groups of this many batch rows (the sampler shuffles) attend among themselves. The
    # authors use the whole batch (2048), 64× the attention cost of 256: too slow on 2 shared CPU cores.
    attention_set_size: int = 256


class CounterfactualAttention(nn.Module):
    """One counterfactual attention layer: queries (N, D) attend over keys (K, D) with the factual logits minus the
    counterfactual logits of (N, D) / (K, D) counterfactual tokens (None: factual only), residual + LayerNorm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.output = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.cf_query, self.cf_key = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, cf_queries: torch.Tensor | None = None,
                cf_keys: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        logits = self.query(queries) @ self.key(keys).T * self.scale  # (N, K)
        if cf_queries is not None and cf_keys is not None:
            logits = logits - self.cf_query(cf_queries) @ self.cf_key(cf_keys).T * self.scale
        attended = torch.softmax(logits, dim=-1) @ self.value(keys)  # (N, D)
        out: torch.Tensor = self.norm(queries + self.output(attended))
        return out


class FeedForward(nn.Module):
    """LN(h + ReLU(W_2 ReLU(W_1 h + b_1) + b_2)): the authors' feed-forward layer (ReLU on both dense layers)."""

    def __init__(self, width: int, multiplier: int) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(width, multiplier * width), nn.Linear(multiplier * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(h + F.relu(self.outer(F.relu(self.inner(h)))))
        return out


class CounterfactualFilter(nn.Module):
    """``n_blocks`` × (counterfactual attention, feed-forward) over a set of tokens, then f = ReLU(W_f h)."""

    def __init__(self, width: int, out_dim: int, n_blocks: int, ffn_multiplier: int) -> None:
        super().__init__()
        self.attention = nn.ModuleList([CounterfactualAttention(width) for _ in range(n_blocks)])
        self.feed_forward = nn.ModuleList([FeedForward(width, ffn_multiplier) for _ in range(n_blocks)])
        self.head = nn.Linear(width, out_dim, bias=False)

    def block(self, b: int, queries: torch.Tensor, keys: torch.Tensor, cf_queries: torch.Tensor | None,
              cf_keys: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        out: torch.Tensor = self.feed_forward[b](self.attention[b](queries, keys, cf_queries, cf_keys))
        return out

    def states(self, tokens: torch.Tensor, counterfactual: torch.Tensor | None) -> list[torch.Tensor]:
        """(N, D) tokens forming one set and their (N, D) counterfactual tokens (or None) → the inputs of every block
        and the last block's output, n_blocks + 1 tensors (N, D). Queries run in chunks (the keys are the whole set)."""
        states = [tokens]
        for b in range(len(self.attention)):
            h = states[-1]
            states.append(torch.cat([
                self.block(b, h[s : s + QUERY_CHUNK], h,
                           None if counterfactual is None else counterfactual[s : s + QUERY_CHUNK], counterfactual)
                for s in range(0, h.shape[0], QUERY_CHUNK)]))  # fmt: skip
        return states

    def forward(self, tokens: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
        """(N, D) set → (N, d) filtered vectors f."""
        return F.relu(self.head(self.states(tokens, counterfactual)[-1]))


class MCLN(Recommender):
    present: torch.Tensor
    adjacency: torch.Tensor
    interaction_keys: torch.Tensor

    def __init__(self, config: MCLNConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "MCLN")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        d = config.embedding_size
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
        projections = {n: nn.Linear(inputs.modalities[n].features.shape[1], d, bias=False) for n in self.content_names}
        for projection in projections.values():
            nn.init.xavier_uniform_(projection.weight)  # as the authors' W_v, W_t
        self.projections = nn.ModuleDict(projections)
        self.filter = CounterfactualFilter((1 + len(self.content_names)) * d, d, config.n_blocks, config.ffn_multiplier)
        present = torch.stack([inputs.modalities[n].present for n in self.content_names], dim=1)  # (I, M)
        self.register_buffer("present", present, persistent=False)
        for m, name in enumerate(self.content_names):
            features = F.normalize(inputs.modalities[name].features, dim=1) * present[:, m, None]
            self.register_buffer(f"features_{name}", features, persistent=False)  # (I, d_m), 0 where absent
        adjacency = normalized_bipartite_adjacency(inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items)
        self.register_buffer("adjacency", to_csr(adjacency), persistent=False)  # CSR: see light_propagate
        keys = torch.unique(inputs.train_users * inputs.n_items + inputs.train_items)  # sorted
        full = torch.bincount(keys // inputs.n_items, minlength=inputs.n_users) >= inputs.n_items
        if config.attention_set_size < 1:
            raise ValueError(f"MCLN attention_set_size={config.attention_set_size}: expected at least 1")
        if bool(full.any()):
            raise ValueError(f"MCLN samples an un-interacted item per user; user {int(full.nonzero()[0])} has them all")
        self.register_buffer("interaction_keys", keys, persistent=False)
        self.sample_generator = torch.Generator()  # counterfactual-item draws; reseeded by on_epoch_start

    # ------------------------------------------------------------------------------------------- the parts
    def features(self, name: str) -> torch.Tensor:
        features: torch.Tensor = self.get_buffer(f"features_{name}")
        return features

    def encode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Users u (U, d), items' collaborative parts e (I, d) and content parts c (I, M, d), zero where absent."""
        ego = torch.cat([self.user_embedding, self.item_embedding])  # (U+I, d)
        final = light_propagate(self.adjacency, ego, self.config.n_layers)
        content = torch.stack([self.projections[n](self.features(n)) * self.present[:, m, None]
                               for m, n in enumerate(self.content_names)], dim=1)  # fmt: skip  (I, M, d)
        return final[: self.n_users], final[self.n_users :], content

    @staticmethod
    def tokens(collaborative: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """(N, d) and (N, M, d) → (N, (1 + M)·d) filter tokens [e ‖ c^1 ‖ … ‖ c^M]."""
        return torch.cat([collaborative, content.flatten(1)], dim=1)

    # ------------------------------------------------------------------------------------------- training
    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Seed this epoch's draws of counterfactual (un-interacted) items."""
        self.sample_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def sample_uninteracted(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) users → (B,) items drawn uniformly among the items each user has NOT interacted with in training."""
        keys = self.interaction_keys.cpu()
        users = users.cpu()
        items = torch.randint(0, self.n_items, users.shape, generator=self.sample_generator)
        while True:
            query = users * self.n_items + items
            position = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
            seen = keys[position] == query
            if not bool(seen.any()):
                return items.to(self.present.device)
            items[seen] = torch.randint(0, self.n_items, (int(seen.sum()),), generator=self.sample_generator)

    def filter_sets(self, tokens: torch.Tensor, counterfactual: torch.Tensor | None) -> torch.Tensor:
        """(B, D) batch tokens → (B, d) f, each group of ``attention_set_size`` consecutive rows one set."""
        size = self.config.attention_set_size
        # split, not slices: a slice's backward writes its gradient into a zero (B, D) tensor, one per set
        sets = torch.split(tokens, size)
        if counterfactual is None:
            return torch.cat([self.filter(t, None) for t in sets])
        counterfactual_sets = torch.split(counterfactual, size)
        return torch.cat([self.filter(t, cf) for t, cf in zip(sets, counterfactual_sets, strict=True)])

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        users, collaborative, content = self.encode()
        counterfactual_items = self.sample_uninteracted(batch.users)
        u = users[batch.users]  # (B, d)
        pos_tokens = self.tokens(collaborative[batch.pos_items], content[batch.pos_items])  # (B, D)
        cf_tokens = self.tokens(collaborative[counterfactual_items], content[counterfactual_items])
        neg_tokens = self.tokens(collaborative[batch.neg_items], content[batch.neg_items])
        pos_filtered = self.filter_sets(pos_tokens, cf_tokens)  # (B, d) the positives, with the counterfactual
        neg_filtered = self.filter_sets(neg_tokens, None)  # the negatives, without it (as the authors)
        pos_parts = [collaborative[batch.pos_items], *content[batch.pos_items].unbind(1), pos_filtered]
        neg_parts = [collaborative[batch.neg_items], *content[batch.neg_items].unbind(1), neg_filtered]
        loss = torch.stack([bpr_loss((u * p).sum(-1), (u * n).sum(-1))
                            for p, n in zip(pos_parts, neg_parts, strict=True)]).sum()  # fmt: skip
        if self.config.reg_weight > 0.0:
            loss = loss + self.config.reg_weight * squared_l2_penalty(
                self.user_embedding[batch.users], self.item_embedding[batch.pos_items],
                self.item_embedding[batch.neg_items], *pos_parts[1:], *neg_parts[1:])  # fmt: skip
        return loss

    # ------------------------------------------------------------------------------------------- ranking
    def catalogue_states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Users (U, d), items' collaborative + content sum (I, d), catalogue tokens (I, D) and the filter's states
        over the catalogue as one set with itself as the counterfactual (n_blocks + 1 tensors (I, D))."""
        users, collaborative, content = self.encode()
        tokens = self.tokens(collaborative, content)
        return users, collaborative + content.sum(1), tokens, self.filter.states(tokens, tokens)

    def representations(self) -> Representations:
        users, base, _, states = self.catalogue_states()
        return Representations(users=users, items=base + F.relu(self.filter.head(states[-1])))

    def content_encoder(self) -> ContentEncoder:
        return MCLNContentEncoder(self)


class MCLNContentEncoder(ContentEncoder):
    """A new item's MCLN vector Σ_m c^m + f: no collaborative part (zero), and f from its token [0 ‖ c^1 ‖ … ‖ c^M]
    attending, in each block, over the trained catalogue's states at that block (fixed, computed at export) and its
    own state, with its own and the catalogue's layer-0 tokens as the counterfactual (as in ranking)."""

    def __init__(self, model: MCLN) -> None:
        super().__init__()
        self.modality_names = tuple(model.content_names)
        self.projections = nn.ModuleList([model.projections[n] for n in model.content_names])
        self.filter = model.filter
        self.embedding_size = model.config.embedding_size
        with torch.no_grad():
            _, _, _, states = model.catalogue_states()
        for b, state in enumerate(states[:-1]):
            self.register_buffer(f"catalogue_state_{b}", state.detach().clone())  # (I, D): block b's inputs

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for k, projection in enumerate(self.projections):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]  # (N, d_m), (N, 1)
            parts.append(projection(F.normalize(features * mask, dim=1)) * mask)  # (N, d)
        content = torch.stack(parts, dim=1)  # (N, M, d)
        token = MCLN.tokens(torch.zeros_like(parts[0]), content)  # (N, D)
        catalogue_tokens = self.get_buffer("catalogue_state_0")
        h = token
        for b in range(len(self.filter.attention)):
            catalogue: torch.Tensor = self.get_buffer(f"catalogue_state_{b}")
            # each new item attends over the catalogue and itself: its own key is the diagonal of a (N, N) block
            h = self.own_and_catalogue_block(b, h, catalogue, token, catalogue_tokens)
        return content.sum(1) + F.relu(self.filter.head(h))

    def own_and_catalogue_block(self, b: int, h: torch.Tensor, catalogue: torch.Tensor, token: torch.Tensor,
                                catalogue_tokens: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Block b for N independent new items: row n's keys are the I catalogue states and row n itself."""
        attention = self.filter.attention[b]
        assert isinstance(attention, CounterfactualAttention)
        q, cf_q = attention.query(h), attention.cf_query(token)  # (N, D)
        logits_catalogue = (q @ attention.key(catalogue).T - cf_q @ attention.cf_key(catalogue_tokens).T)
        logits_own = ((q * attention.key(h)).sum(-1, keepdim=True) - (cf_q * attention.cf_key(token)).sum(-1, keepdim=True))
        weights = torch.softmax(torch.cat([logits_catalogue, logits_own], dim=1) * attention.scale, dim=-1)  # (N, I+1)
        attended = weights[:, :-1] @ attention.value(catalogue) + weights[:, -1:] * attention.value(h)
        out: torch.Tensor = self.filter.feed_forward[b](attention.norm(h + attention.output(attended)))
        return out
