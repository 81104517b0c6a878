"""MARIO: the test metrics of what its bundle serves against what the evaluator ranks by (docs/models/mario.md).

The evaluator ranks MARIO by its exact per-interaction score (`MARIO.full_sort_scores`); the bundle serves the
inner product of its exported vectors (the attention averaged per user). For each run directory given, this prints
the run's own test metrics (exact score, best validation epoch) and the same evaluator's metrics on the served
inner product of the same checkpoint, as one JSON line.

    MMREC_HOME=/work/var-shared python scripts/mario_served_scores.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models.base import Recommender, Representations
from training.data.dataset import TEST
from training.fit.evaluator import FullRankingEvaluator
from training.runs import load_run

METRICS = ("recall@20", "ndcg@20")


class ServedInnerProduct(Recommender):
    """A trained model ranked by the inner product of its representations, as the bundle's index ranks it."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def representations(self) -> Representations:
        return self.model.representations()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        run = load_run(run_dir)
        evaluator = FullRankingEvaluator(run.dataset, split=TEST, topk=(20,))
        with torch.no_grad():
            exact = evaluator.evaluate(run.model).metrics
            served = evaluator.evaluate(ServedInnerProduct(run.model)).metrics
        print(json.dumps({"run": str(run_dir), "exact": {k: round(exact[k], 4) for k in METRICS},
                          "served": {k: round(served[k], 4) for k in METRICS}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
