"""The unit benchmark's --smoke path: every row measured, the section written between its markers,
unit skipping at K = 0 giving the answer of the same run without skipping at lower FLOPs."""

from __future__ import annotations

import json

from lmms_sgl.benchmarks import units


def test_units_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    units.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert "kept text" in text and text.count(units.START) == 1 and text.count(units.END) == 1
    results = json.loads((tmp_path / "benchmarks_units.json").read_text())
    rows = {r["config"]: r for r in results["rows"]}
    assert set(rows) == set(units.SMOKE_ROWS)
    assert rows["large_only"]["flops_ratio"] == 1.0 and rows["large_only"]["units"] == "7/7"
    skip, full = (
        rows["K=0 9 %, unit skipping, guide at 1 tile"],
        rows["K=0 9 %, no skipping, guide at 1 tile"],
    )
    assert results["skip_answers_identical"] == {"guide at 1 tile": True}
    assert skip["answer"] == full["answer"] and full["units"] == "7/7"
    assert int(skip["units"].split("/")[0]) < 7 and skip["flops_ratio"] < full["flops_ratio"]
    assert rows[units.GOAL_ROW]["units"] == "2/7" and rows[units.GOAL_ROW]["kept_visual"] == 512
    assert "Goal (issue 26)" in text
