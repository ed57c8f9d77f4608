"""``--use_cache``: a run killed midway (SIGKILL, no clean-up) and started again with the same cache
ends with the answers, scores and SGL records of an uninterrupted run, and the large model answers
each sample once across both runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import evaluate, raw_response

pytestmark = pytest.mark.slow
TASK, LIMIT, KILL_AFTER = "sgl_smoke", 4, 2
one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)

CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as the test process (tests.helpers.one_thread)
import lmms_sgl
from pathlib import Path
from lmms_sgl.pipeline import SGLPipeline
from tests.helpers import evaluate

calls, run_large, generate = Path(sys.argv[1]), SGLPipeline._run_large, SGLPipeline.generate

def count_large(self, samples, *args, **kwargs):
    run_large(self, samples, *args, **kwargs)
    with calls.open("a") as out:
        out.write("".join(f"{{s.task}}/{{s.doc_id}}\\n" for s in samples))

def killed_midway(self, samples, gen):
    done = len(calls.read_text().splitlines()) if calls.exists() else 0
    if done >= {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash or an out-of-memory kill would
    return generate(self, samples, gen)

SGLPipeline._run_large, SGLPipeline.generate = count_large, killed_midway
evaluate(sys.argv[2], sys.argv[3], "{task}", Path(sys.argv[4]), {limit}, use_cache=sys.argv[5])
"""


def answers(result: dict) -> dict:
    return {row["doc_id"]: raw_response(row) for row in result["samples"][TASK]}


def records(result: dict) -> dict:
    return {row["doc_id"]: row["token_counts"][0]["sgl"] for row in result["samples"][TASK]}


def test_killed_run_resumes_from_the_cache(tmp_path, models_dir, tasks_dir, monkeypatch):
    from lmms_sgl.pipeline import SGLPipeline

    model = "sgl_llava"
    args = f"pretrained={models_dir / 'llava-large'},guide={models_dir / 'llava-guide'},keep_ratio=0.3"
    large_calls: list[str] = []
    run_large = SGLPipeline._run_large

    def count_large(self, samples, *rest, **kwargs):
        large_calls.extend(f"{s.task}/{s.doc_id}" for s in samples)
        return run_large(self, samples, *rest, **kwargs)

    monkeypatch.setattr(SGLPipeline, "_run_large", count_large)
    whole = evaluate(model, args, TASK, tasks_dir, LIMIT)
    assert len(large_calls) == LIMIT
    large_calls.clear()

    cache, calls = tmp_path / "cache", tmp_path / "calls.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(kill_after=KILL_AFTER, task=TASK, limit=LIMIT))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), str(calls), model, args, str(tasks_dir), str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == -9, done.stderr[-3000:]  # killed, not finished
    first = calls.read_text().splitlines()
    assert len(first) == KILL_AFTER

    resumed = evaluate(model, args, TASK, tasks_dir, LIMIT, use_cache=str(cache))
    assert len(first) + len(large_calls) == LIMIT, (first, large_calls)
    assert not set(first) & set(large_calls), "a sample was answered twice by the large model"
    assert answers(resumed) == answers(whole)
    assert resumed["results"][TASK] == whole["results"][TASK]
    ours, reference = records(resumed), records(whole)
    assert sorted(ours) == sorted(reference)
    from_cache = [doc for doc, record in ours.items() if record["extra"].get("from_cache")]
    assert len(from_cache) == KILL_AFTER
    for doc, record in ours.items():  # cached samples keep the record computed before the kill
        expected = {k: v for k, v in reference[doc].items() if not k.endswith("seconds") and k != "extra"}
        assert {k: record[k] for k in expected} == expected, doc
    stats = resumed["results"]["throughput"] if "throughput" in resumed["results"] else None
    if stats is not None:
        assert stats["avg_sgl.overall.samples"] == LIMIT
    log = [json.loads(line) for line in next(cache.glob("sgl_records.rank0.jsonl")).read_text().splitlines()]
    assert len(log) == LIMIT  # the killed run's records and the resumed run's, each sample once
