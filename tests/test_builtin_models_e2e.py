"""lmms-eval's own HF models evaluate the factory checkpoints on the local tasks, offline (in this
process through lmms-eval's evaluator; the CLI itself is exercised by the SGL end-to-end tests)."""

from __future__ import annotations

import pytest

from tests.helpers import evaluate


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,family,shapes_task",
    [("internvl_hf", "internvl", "sgl_shapes_wide"), ("llava_hf", "llava", "sgl_shapes")],
)
def test_builtin_model_runs_local_tasks_offline(models_dir, tasks_dir, model, family, shapes_task):
    args = f"pretrained={models_dir / f'{family}-large'},device=cpu,device_map=cpu"
    tasks = f"sgl_smoke,sgl_gqa_local,{shapes_task}"
    results = evaluate(model, args, tasks, tasks_dir, 3)
    for task in tasks.split(","):
        assert "exact_match,none" in results["results"][task]
        rows = results["samples"][task]
        assert len(rows) == 3 and all("filtered_resps" in row for row in rows)
