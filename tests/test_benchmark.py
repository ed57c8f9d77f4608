"""The benchmark command runs end to end at tiny sizes and writes its report (timings not judged)."""

from __future__ import annotations

import json

from lmms_sgl.benchmarks import run as benchmark


def test_benchmark_smoke_writes_every_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    benchmark.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    for heading in (
        "## Goals",
        "## 1. Importance",
        "## 2. Pruned large model",
        "## 3. End to end",
        "## 4. Memory",
    ):
        assert heading in text
    results = json.loads(out.with_suffix(".json").read_text())
    methods = {row["method"] for row in results["end_to_end"]}
    assert {"large_only", "sgl", "fastv"} <= methods
    sgl = [row for row in results["end_to_end"] if row["method"] == "sgl"]
    assert all(0 < row["guide_flops"] < row["flops"] for row in sgl)
    assert all(row["consistency_flops"] > 0 and row["consistency_seconds"] > 0 for row in sgl)  # exits only
    unpruned = results["pruning"]["256"][0] if "256" in results["pruning"] else results["pruning"][256][0]
    assert unpruned["prefill_ideal_speedup"] == 1.0
