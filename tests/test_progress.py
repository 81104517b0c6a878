"""Progress bars that tell the truth: the training bar counts to the run's epoch cap with a whole-run ETA; the
feature bar reports items per second."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from training.config import TrainConfig
from training.data.features import encode_texts
from training.fit.trainer import Trainer


class SleepyTrainer(Trainer):
    """One step per epoch on a 1-parameter model; an epoch takes ``seconds``."""

    def __init__(self, config: TrainConfig, seconds: float) -> None:
        super().__init__(torch.nn.Linear(1, 1), None, config=config, name="sleepy")
        self.optimizer = torch.optim.SGD(self.parameters, lr=0.0)
        self.seconds = seconds

    def batches(self, epoch: int) -> list[torch.Tensor]:
        time.sleep(self.seconds)
        return [torch.ones(1, 1)]

    def loss(self, batch: Any) -> torch.Tensor:
        out: torch.Tensor = self.model(batch).square().mean()
        return out

    def validate(self) -> dict[str, float]:
        return {"recall@20": 0.0}


def test_the_training_bar_counts_to_the_epoch_cap_with_an_eta_of_the_epochs_left(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = TrainConfig(epochs=6, patience=100, device="cpu", progress=True)
    trainer = SleepyTrainer(config, seconds=0.1)
    trainer.fit()
    err = capsys.readouterr().err
    states = re.findall(r"sleepy:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[([0-9:]+)<([0-9:?]+), +([^\]]+)\]", err)
    assert states, err
    assert {total for _, total, *_ in states} == {"6"}  # the cap, not TrainConfig's default 1000
    assert states[-1][0] == "6" and "epoch" in states[-1][4]
    seconds_left = {int(done): int(eta.split(":")[-1]) for done, _, _, eta, _ in states if eta != "?"}
    assert seconds_left and all(left <= 0.1 * (6 - done) * 3 + 1 for done, left in seconds_left.items())


class CountingEncoder:
    version = "counting-1"
    dim = 2

    def encode(self, batch: Sequence[str], /) -> NDArray[np.float32]:
        return np.ones((len(batch), 2), dtype=np.float32)


def test_the_feature_bar_reports_items_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    encode_texts([f"text {i}" for i in range(5)], encoder=CountingEncoder(), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"encode text: 100%.*5/5 .*text/s\]", err), err
