"""PromptMM (Wei, Tang, Xia & Huang, WWW 2024): multi-modal knowledge distillation for recommendation with prompts.

Two stages of one registered model, run as two ``mmrec train`` calls (the second names the first with
``--train init_from=RUN_DIR``, as MP4SR's pre-training → fine-tuning):

Teacher (``stage="teacher"``). Per content modality m the item features x̂^m (L2-normalised, zero where absent).

- Prompt module: hard tokens h_i = mean over the modalities item i HAS of PCA_d(x̂^m)_i (fitted on the items with
  m), h_u = mean of h_i over u's training items; soft prompts p_u = dropout(W_u h_u), p_i = dropout(W_i h_i).
- Prompt-tuned feature extractor: x̃^m = x̂^m + η_f · normalise(P (Pᵀ x̂^m)) with P = (p_i) (I, d), then
  f^m = dropout(W_m x̃^m) (I, d), zero where absent.
- Modality graph: u^m = mean of f^m over u's training items that have m; i^m = mean of u^m over i's users (zero
  where i lacks m).
- ID graph: LightGCN (mean of layers 0..L over D^{-1/2} A D^{-1/2}) from e⁰_u = E_u + η_s normalise(p_u),
  e⁰_i = E_i + η_s normalise(p_i).
- z_u = e_u + κ Σ_m normalise(u^m), z_i = e_i + κ Σ_m normalise(i^m); score z_u · z_i.
- Loss: BPR(z) + prompt_weight·BPR(p) + modality_weight·Σ_m BPR(u^m · i^m) + feature_reg·½Σ_m(‖u^m‖² + ‖i^m‖²)/I
  + reg_weight·EmbLoss(E of the batch).

Student (``stage="student"``): a LightGCN over ID embeddings only (``student_embedding_size``,
``student_n_layers``), no content at all, what the bundle serves. With ``start_from_teacher`` (the reference's
``init_user_item_embed``) its embeddings start, at the trainer's first epoch, at the teacher's z_u and z_i. The teacher (loaded from its run, frozen, in eval
mode) provides, once per epoch, its fused scores and its modality-specific scores u^m · i^m. Loss:

- BPR(student) + reg_weight·EmbLoss;
- listwise distillation, per batch row a list [i⁺, n_list_negatives uniform items]:
  τ² Σ_{t ∈ {fused, m…}} KL(softmax(s^t/τ) ‖ softmax(s^student/τ)) (mean over rows), weight list_weight;
- embedding distillation: Σ_m mean over the items with m of (1 − cos(i^m, G s_i)) with s_i the student's item
  vector and G a linear map student → teacher width (a training-only hint head, not served), weight embedding_weight.

Deviations (docs/models/promptmm.md): ID layers without the reference's softmax on the last layer; the prompt is
not tuned by the student (the reference computes the teacher under ``no_grad`` in the student stage, so its prompt
gets no gradient there either); KL on listwise logits instead of the reference's KD on −log softmax values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelInputs, PairwiseBatch, Recommender, Representations, require_modalities
from models.graph import (
    light_propagate,
    mean_aggregation,
    normalized_bipartite_adjacency,
    sparse_matmul,
    to_csr,
)
from models.layers import SameDrawsDropout
from models.losses import bpr_loss, embedding_norm_penalty


@dataclass(frozen=True)
class PromptMMConfig:
    stage: Literal["teacher", "student"] = "teacher"
    # teacher
    embedding_size: int = 64  # the reference's embed_size
    n_layers: int = 2  # ID graph layers (the reference's weight_size [64, 64])
    dropout: float = 0.2  # feature and prompt dropout (the reference's drop_rate)
    modality_rate: float = 0.55  # κ: weight of the modality parts in z (the reference's model_cat_rate)
    soft_token_rate: float = (
        0.1  # η_s: prompt added to the ID embeddings (the reference varies it per dataset)
    )
    feature_prompt_rate: float = (
        0.1  # η_f: prompt added to the features (the reference's feat_soft_token_rate)
    )
    prompt_weight: float = 1.0  # BPR on the soft prompts (t_prompt_rate1 = 1 in the reference's last config)
    modality_weight: float = 1.0  # BPR on each modality's u^m · i^m (t_feat_mf_rate = 1)
    feature_reg: float = 1e-5  # the reference's feat_reg_decay
    reg_weight: float = 1e-4  # EmbLoss on the batch's ID embeddings, as LightGCN here
    # student
    student_embedding_size: int = (
        64  # the served width; equal to the teacher's so that the student can start there
    )
    start_from_teacher: bool = True  # the reference's init_user_item_embed: epoch 1 starts the student at z
    student_n_layers: int = 1  # the reference's student_n_layers
    n_list_negatives: int = 10  # the reference's neg_sample_num
    temperature: float = 5.0  # τ of the listwise distillation (the reference's student_tau)
    list_weight: float = 1.0  # validation grid {0.1, 1.0}
    embedding_weight: float = 1.0  # validation grid {0.1, 1.0}


def principal_components(features: torch.Tensor, present: torch.Tensor, n: int) -> torch.Tensor:
    """(I, d_m) features, (I,) presence → (I, n) scores on the top-n principal axes of the present rows (centred on
    their mean); zero rows for absent items, zero columns beyond the data's rank. The sign of each axis is fixed so
    that its largest loading is positive (SVD signs are otherwise arbitrary)."""
    out = torch.zeros(features.shape[0], n)
    rows = features[present].double()
    if rows.shape[0] == 0:
        return out
    centred = rows - rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (r, d_m)
    axes = vh[:n]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # (k, 1)
    scores = centred @ (axes * sign).T  # (n_present, k)
    out[present, : scores.shape[1]] = scores.float()
    return out


def listwise_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, L) student and teacher scores of the same candidate lists → τ² mean_b KL(softmax(t/τ) ‖ softmax(s/τ))."""
    target = F.log_softmax(teacher / temperature, dim=-1)
    log_student = F.log_softmax(student / temperature, dim=-1)
    kl = (target.exp() * (target - log_student)).sum(-1)  # (B,)
    return kl.mean() * temperature**2


def projected_feature_prompt(
    features: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """(I, d_m) features x, (I, d) prompts P, (d, d_m) projection W → (I, d) rows W · normalise(P (Pᵀ x))_i.

    The same vectors as projecting the normalised (I, d_m) prompt term, reassociated so that nothing of width d_m
    is formed beyond Pᵀ x: P (Pᵀ x) Wᵀ = P ((Pᵀ x) Wᵀ), and the row norms ‖P_i (Pᵀ x)‖ = √(P_i G P_iᵀ) with the
    (d, d) Gram matrix G = (Pᵀ x)(Pᵀ x)ᵀ, floored at F.normalize's 1e-12. On ml100k-posters' 1280-wide image
    features the (I, d_m) products and their element-wise backward were ~45 % of a teacher step."""
    shared = prompts.T @ features  # (d, d_m)
    squared_norms = ((prompts @ (shared @ shared.T)) * prompts).sum(1, keepdim=True)  # (I, 1)
    return prompts @ (shared @ weight.T) / squared_norms.clamp(min=1e-24).sqrt()  # (I, d)


class PromptMMTeacher(nn.Module):
    """The teacher: prompt module, prompt-tuned modality feature extractors, modality and ID graphs."""

    adjacency: torch.Tensor
    present: torch.Tensor
    trained: torch.Tensor

    def __init__(self, config: PromptMMConfig, inputs: ModelInputs) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.content_names = sorted(inputs.modalities)
        d = config.embedding_size
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
        self.prompt_user = nn.Linear(d, d)
        self.prompt_item = nn.Linear(d, d)
        self.dropout = SameDrawsDropout(config.dropout)  # F.dropout's masks, drawn faster on the CPU
        projections = {n: nn.Linear(inputs.modalities[n].features.shape[1], d) for n in self.content_names}
        for projection in projections.values():
            nn.init.xavier_uniform_(projection.weight)  # as the reference's image_trans / text_trans
        self.projections = nn.ModuleDict(projections)
        present = torch.stack([inputs.modalities[n].present for n in self.content_names], dim=1)  # (I, M)
        self.register_buffer("present", present, persistent=False)
        tokens = torch.zeros(inputs.n_items, d)
        for m, name in enumerate(self.content_names):
            features = F.normalize(inputs.modalities[name].features, dim=1) * present[:, m, None]
            self.register_buffer(f"features_{name}", features, persistent=False)  # (I, d_m), 0 where absent
            tokens += principal_components(features, present[:, m], d)
        item_tokens = (
            tokens / present.sum(1, keepdim=True).clamp(min=1).float()
        )  # mean over present modalities
        users, items = inputs.train_users, inputs.train_items
        user_tokens = torch.sparse.mm(
            mean_aggregation(inputs.n_users, inputs.n_items, users, items), item_tokens
        )
        self.register_buffer("item_tokens", item_tokens, persistent=False)  # (I, d) hard tokens
        self.register_buffer("user_tokens", user_tokens, persistent=False)  # (U, d)
        # The graphs as CSR, the mean aggregations with their transposes (for their backward): see sparse_matmul.
        self.register_buffer("adjacency", to_csr(normalized_bipartite_adjacency(
            inputs.n_users, inputs.n_items, users, items)), persistent=False)  # fmt: skip
        self.register_csr_pair(
            "item_to_users", mean_aggregation(inputs.n_items, inputs.n_users, items, users)
        )
        for m, name in enumerate(self.content_names):
            has = present[items, m]
            self.register_csr_pair(f"user_to_items_{name}", mean_aggregation(
                inputs.n_users, inputs.n_items, users[has], items[has]))  # fmt: skip
        # 1 once trained as a teacher (saved with the teacher run): the student refuses to distil from a fresh one
        self.register_buffer("trained", torch.zeros(()))

    def buffer(self, name: str) -> torch.Tensor:
        value: torch.Tensor = self.get_buffer(name)
        return value

    def register_csr_pair(self, name: str, matrix: torch.Tensor) -> None:
        """Buffers ``name`` (the COO ``matrix`` as CSR) and ``name``_transposed, for ``aggregate``."""
        self.register_buffer(name, to_csr(matrix), persistent=False)
        self.register_buffer(f"{name}_transposed", to_csr(matrix.t()), persistent=False)

    def aggregate(self, name: str, dense: torch.Tensor) -> torch.Tensor:
        """The mean aggregation ``name`` (a ``register_csr_pair``) applied to ``dense``."""
        return sparse_matmul(self.buffer(name), dense, transposed=self.buffer(f"{name}_transposed"))

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft prompts p_u (U, d) and p_i (I, d)."""
        prompt_user = self.dropout(self.prompt_user(self.user_tokens))
        prompt_item = self.dropout(self.prompt_item(self.item_tokens))  # drawn after the users', as before
        return prompt_user, prompt_item

    def forward(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_u (U, d), z_i (I, d), modality parts u^m (U, M, d) and i^m (I, M, d), prompts p_u, p_i."""
        c = self.config
        prompt_user, prompt_item = self.prompts()
        user_parts, item_parts = [], []
        for m, name in enumerate(self.content_names):
            x = self.buffer(f"features_{name}")  # (I, d_m)
            projection = self.projections[name]
            assert isinstance(projection, nn.Linear)
            prompt = projected_feature_prompt(x, prompt_item, projection.weight)  # (I, d)
            projected = projection(x) + c.feature_prompt_rate * prompt  # W_m x̃^m + b_m
            f = self.dropout(projected) * self.present[:, m, None]  # (I, d), 0 where absent
            u_m = self.aggregate(f"user_to_items_{name}", f)  # (U, d)
            i_m = self.aggregate("item_to_users", u_m) * self.present[:, m, None]  # (I, d)
            user_parts.append(u_m)
            item_parts.append(i_m)
        ego = torch.cat([self.user_embedding + c.soft_token_rate * F.normalize(prompt_user, dim=1),
                         self.item_embedding + c.soft_token_rate * F.normalize(prompt_item, dim=1)])  # fmt: skip
        ids = light_propagate(self.adjacency, ego, c.n_layers)  # (U+I, d)
        users = ids[: self.n_users] + c.modality_rate * sum(F.normalize(u, dim=1) for u in user_parts)
        items = ids[self.n_users :] + c.modality_rate * sum(F.normalize(i, dim=1) for i in item_parts)
        return (users, items, torch.stack(user_parts, dim=1), torch.stack(item_parts, dim=1),
                prompt_user, prompt_item)  # fmt: skip

    def loss(self, batch: PairwiseBatch) -> torch.Tensor:
        c = self.config
        users, items, user_parts, item_parts, prompt_user, prompt_item = self()
        u, pos, neg = batch.users, batch.pos_items, batch.neg_items

        def bpr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return bpr_loss((a[u] * b[pos]).sum(-1), (a[u] * b[neg]).sum(-1))

        loss = bpr(users, items)
        if c.prompt_weight > 0.0:
            loss = loss + c.prompt_weight * bpr(prompt_user, prompt_item)
        if c.modality_weight > 0.0:
            loss = loss + c.modality_weight * sum(
                bpr(user_parts[:, m], item_parts[:, m]) for m in range(len(self.content_names))
            )
        if c.feature_reg > 0.0:
            loss = (
                loss
                + c.feature_reg * 0.5 * (user_parts.pow(2).sum() + item_parts.pow(2).sum()) / self.n_items
            )
        if c.reg_weight > 0.0:
            loss = loss + c.reg_weight * embedding_norm_penalty(
                self.user_embedding[u], self.item_embedding[pos], self.item_embedding[neg])  # fmt: skip
        return loss


class PromptMM(Recommender):
    """Teacher stage: the teacher alone. Student stage: a frozen teacher (from ``init_from``) and the ID student."""

    student_adjacency: torch.Tensor

    def __init__(self, config: PromptMMConfig, inputs: ModelInputs) -> None:
        super().__init__()
        require_modalities(inputs, "PromptMM")
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.teacher = PromptMMTeacher(config, inputs)
        if config.stage == "teacher":
            self.teacher.trained.fill_(1.0)
            return
        self.teacher.requires_grad_(False)
        d = config.student_embedding_size
        if config.start_from_teacher and d != config.embedding_size:
            raise ValueError(f"PromptMM start_from_teacher needs student_embedding_size ({d}) equal to the teacher's "
                             f"embedding_size ({config.embedding_size})")  # fmt: skip
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(inputs.n_items, d)))
        self.hint = nn.Linear(
            d, config.embedding_size
        )  # student → teacher width, for the embedding distillation
        self.register_buffer("student_adjacency", normalized_bipartite_adjacency(
            inputs.n_users, inputs.n_items, inputs.train_users, inputs.train_items), persistent=False)  # fmt: skip
        self.teacher_outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.negative_generator = torch.Generator()

    # ------------------------------------------------------------------------------------------------ student
    def student(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's LightGCN outputs: users (U, d_s), items (I, d_s)."""
        ego = torch.cat([self.user_embedding, self.item_embedding])
        out = light_propagate(self.student_adjacency, ego, self.config.student_n_layers)
        return out[: self.n_users], out[self.n_users :]

    def frozen_teacher(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's z_u, z_i, u^m, i^m in eval mode without gradients (computed once per epoch)."""
        if self.teacher_outputs is None:
            if float(self.teacher.trained) != 1.0:
                raise ValueError("PromptMM student: the teacher is untrained; start the student from a teacher run "
                                 "(--train init_from=<teacher run directory>)")  # fmt: skip
            was_training = self.teacher.training
            self.teacher.eval()
            with torch.no_grad():
                users, items, user_parts, item_parts, _, _ = self.teacher()
            self.teacher.train(was_training)
            self.teacher_outputs = (users, items, user_parts, item_parts)
        return self.teacher_outputs

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        if self.config.stage == "student":
            self.teacher_outputs = (
                None  # the teacher is frozen; recomputed so that it follows the model's device
            )
            self.negative_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            if epoch == 1 and self.config.start_from_teacher:
                users, items, _, _ = self.frozen_teacher()
                with torch.no_grad():
                    self.user_embedding.copy_(users)
                    self.item_embedding.copy_(items)

    def student_loss(self, batch: PairwiseBatch) -> torch.Tensor:
        c = self.config
        users, items = self.student()
        t_users, t_items, t_user_parts, t_item_parts = self.frozen_teacher()
        u, pos, neg = batch.users, batch.pos_items, batch.neg_items
        loss = bpr_loss((users[u] * items[pos]).sum(-1), (users[u] * items[neg]).sum(-1))
        if c.list_weight > 0.0:
            negatives = torch.randint(0, self.n_items, (u.shape[0], c.n_list_negatives),
                                      generator=self.negative_generator).to(u.device)  # fmt: skip
            candidates = torch.cat([pos[:, None], negatives], dim=1)  # (B, 1 + n)
            student_scores = (users[u][:, None] * items[candidates]).sum(-1)  # (B, 1 + n)
            teachers = [(t_users[u][:, None] * t_items[candidates]).sum(-1)]
            teachers += [(t_user_parts[u, m][:, None] * t_item_parts[candidates, m]).sum(-1)
                         for m in range(t_user_parts.shape[1])]  # fmt: skip
            loss = loss + c.list_weight * sum(
                listwise_distillation(student_scores, t, c.temperature) for t in teachers
            )
        if c.embedding_weight > 0.0:
            hinted = self.hint(items)  # (I, d)
            present = self.teacher.present
            for m in range(t_item_parts.shape[1]):
                cosine = F.cosine_similarity(hinted[present[:, m]], t_item_parts[present[:, m], m], dim=1)
                loss = loss + c.embedding_weight * (1.0 - cosine).mean()
        if c.reg_weight > 0.0:
            loss = loss + c.reg_weight * embedding_norm_penalty(
                self.user_embedding[u], self.item_embedding[pos], self.item_embedding[neg])  # fmt: skip
        return loss

    # -------------------------------------------------------------------------------------------- the model
    def loss(self, batch: PairwiseBatch) -> torch.Tensor:  # type: ignore[override]
        return self.teacher.loss(batch) if self.config.stage == "teacher" else self.student_loss(batch)

    def representations(self) -> Representations:
        if self.config.stage == "teacher":
            users, items, *_ = self.teacher()
        else:
            users, items = self.student()
        return Representations(users=users, items=items)
