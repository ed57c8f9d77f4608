"""lmms-eval's own HF models evaluate the factory checkpoints on the local tasks, offline.

The lmms-eval CLI exits 0 even when evaluation fails, so these tests assert on the files written.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_lmms_eval


@pytest.mark.slow
@pytest.mark.parametrize("model,family", [("internvl_hf", "internvl"), ("llava_hf", "llava")])
def test_builtin_model_runs_local_tasks_offline(tmp_path, models_dir, tasks_dir, model, family):
    out = tmp_path / "out"
    args = f"pretrained={models_dir / f'{family}-large'},device=cpu,device_map=cpu"
    results, _ = run_lmms_eval(model, args, "sgl_smoke,sgl_gqa_local", tasks_dir, out, "--limit", "3")
    for task in ("sgl_smoke", "sgl_gqa_local"):
        assert "exact_match,none" in results["results"][task]
        samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert samples, f"no samples log for {task}"
        rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
        assert len(rows) == 3 and all("filtered_resps" in row for row in rows)
