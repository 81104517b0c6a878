"""From a prepared dataset to the tensors a model is built from (training edges only, never valid/test)."""

from __future__ import annotations

import torch

from models.base import ModalityInput, ModelInputs
from training.data.dataset import TRAIN, InteractionDataset


def model_inputs(dataset: InteractionDataset, *, modalities: tuple[str, ...] | None = None) -> ModelInputs:
    users, items = dataset.edges(TRAIN)
    chosen = dataset.modalities if modalities is None else {m: dataset.modalities[m] for m in modalities}
    return ModelInputs(
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        train_users=torch.from_numpy(users.copy()),
        train_items=torch.from_numpy(items.copy()),
        modalities={
            name: ModalityInput(features=torch.from_numpy(m.features.copy()), present=torch.from_numpy(m.present.copy()))
            for name, m in chosen.items()
        },
    )
