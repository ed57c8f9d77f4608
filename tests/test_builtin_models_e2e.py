"""lmms-eval's own HF models evaluate the factory checkpoints on the local tasks, offline.

The lmms-eval CLI exits 0 even when evaluation fails, so these tests assert on the files written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_lmms_eval(model: str, model_args: str, tasks: str, tasks_dir: Path, out: Path, *extra: str):
    exe = Path(sys.executable).with_name("lmms-eval")
    cmd = [
        str(exe),
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(tasks_dir),
        "--output_path",
        str(out),
        "--log_samples",
        "--verbosity",
        "DEBUG",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    results = sorted(out.rglob("*_results.json"))
    assert results, f"no results.json written\nSTDOUT:{done.stdout[-3000:]}\nSTDERR:{done.stderr[-5000:]}"
    return json.loads(results[-1].read_text()), done


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
