"""Serving cost of a PromptMM teacher run against its student run (docs/models/promptmm.md).

    python scripts/promptmm_serving_cost.py TEACHER_RUN STUDENT_RUN

Prints, for each: the parameters needed to produce the served vectors (the student's exclude the frozen teacher and
its training-only hint head), the served vector width, the float32 bytes of the user and item tables a bundle
holds, the median wall time of one full ``representations()`` pass (what a re-index costs), and the median time
to score one batch of 256 users against every item.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from models.promptmm import PromptMM
from training.runs import load_run


def median_seconds(step: object, repeats: int = 5) -> float:
    assert callable(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(run_dir: Path) -> dict[str, object]:
    model = load_run(run_dir).model
    assert isinstance(model, PromptMM)
    if model.config.stage == "teacher":
        serving = [p for p in model.teacher.parameters()]
    else:
        serving = [model.user_embedding, model.item_embedding]
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        users, items = reps.users, reps.items
        represent = median_seconds(model.representations)
        batch = users[:256]
        score = median_seconds(lambda: model.full_sort_scores(batch, items))
    return {
        "stage": model.config.stage,
        "serving_parameters": sum(p.numel() for p in serving),
        "vector_width": items.shape[1],
        "table_bytes": 4 * (users.numel() + items.numel()),
        "representations_seconds": round(represent, 4),
        "score_256_users_seconds": round(score, 5),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({"teacher": cost(Path(sys.argv[1])), "student": cost(Path(sys.argv[2]))}, indent=2))
