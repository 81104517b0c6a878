"""The `mmrec` command line: settings that cannot mean what they say are refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "not-prepared", "--model", "bpr", "--train", "seed=1"],
    ["tune", "--dataset", "not-prepared", "--model", "bpr", "--grid", "reg_weight=1e-3", "--train", "seed=1"],
    ["qarm", "--dataset", "not-prepared", "--train", "seed=1"],
])  # fmt: skip
def test_a_seed_given_as_a_trainer_setting_is_refused(command: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MMREC_HOME", str(tmp_path))  # nothing may be prepared or written before the refusal
    monkeypatch.setenv("COLUMNS", "200")  # the error box is not wrapped
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert "give the seed as --seed 1, not --train seed=..." in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []
