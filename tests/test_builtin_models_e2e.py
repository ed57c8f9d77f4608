"""lmms-eval's own HF models evaluate the factory checkpoints on the local tasks, offline.

The lmms-eval CLI exits 0 even when evaluation fails, so these tests assert on the files written.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_lmms_eval


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,family,shapes_task",
    [("internvl_hf", "internvl", "sgl_shapes_wide"), ("llava_hf", "llava", "sgl_shapes")],
)
def test_builtin_model_runs_local_tasks_offline(tmp_path, models_dir, tasks_dir, model, family, shapes_task):
    out = tmp_path / "out"
    args = f"pretrained={models_dir / f'{family}-large'},device=cpu,device_map=cpu"
    tasks = f"sgl_smoke,sgl_gqa_local,{shapes_task}"
    results, _ = run_lmms_eval(model, args, tasks, tasks_dir, out, "--limit", "3")
    for task in tasks.split(","):
        assert "exact_match,none" in results["results"][task]
        samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert samples, f"no samples log for {task}"
        rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
        assert len(rows) == 3 and all("filtered_resps" in row for row in rows)
