"""``lmms-sgl-sweep``: a point's figures are a plain lmms-eval evaluation's, a replayed exit threshold
equals a real run at it, paired standard errors equal a reference, an interrupted sweep (a point's
marker deleted, or the process killed with SIGKILL) evaluates only its missing points, a bad grid
fails before any model loads, and sgl_qwen2_vl sweeps a generation and a multiple-choice task.

One sweep is shared by the module: the shipped trained InternVL pair on 3 documents of
``sgl_shapes``, SGL and FastV at the 64 % and 35 % presets (4 evaluations), then the same grid with
one exit threshold (the middle exit score of the 35 % SGL point), which evaluates nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import types
from pathlib import Path

import pytest
import yaml

from lmms_sgl.sweep.cli import main

ROOT = Path(__file__).resolve().parent.parent
LARGE, GUIDE = ROOT / "models/shapes-internvl-large", ROOT / "models/shapes-internvl-guide"
ARGS = f"pretrained={LARGE},guide={GUIDE}"
LIMIT, BATCH = 3, 4
GRID = {"methods": ["sgl", "fastv"], "ratios": [0.64, 0.35]}


def _sweep(out: Path, grid: Path, model: str = "sgl_internvl2", args: str = ARGS, extra=()) -> int:
    return main(
        [
            "--model",
            model,
            "--model_args",
            args,
            "--tasks",
            "sgl_shapes",
            "--include_path",
            str(ROOT / "tasks"),
        ]
        + ["--limit", str(LIMIT), "--batch_size", str(BATCH), "--output_path", str(out), "--grid", str(grid)]
        + list(extra)
    )


def _grid(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


class Spy:
    """Counts lmms-eval evaluations (the stock ``simple_evaluate``, still run)."""

    def __init__(self, monkeypatch):
        import lmms_eval.evaluator

        self.calls: list[str] = []
        original = lmms_eval.evaluator.simple_evaluate

        def spy(*args, **kwargs):
            self.calls.append(kwargs["model_args"])
            return original(*args, **kwargs)

        monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", spy)


def _plain(model_args: str) -> dict:
    """A plain lmms-eval evaluation of ``sgl_shapes`` with these model args."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model="sgl_internvl2",
        model_args=model_args,
        tasks=["sgl_shapes"],
        batch_size=BATCH,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager("WARNING", include_path=str(ROOT / "tasks"), include_defaults=False),
        verbosity="WARNING",
    )


def _samples(folder: str) -> list[dict]:
    [path] = Path(folder).rglob("*_samples_sgl_shapes.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row(data: dict, label: str) -> dict:
    [row] = [r for r in data["rows"] if r["label"] == label]
    return row


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    out = base / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = Spy(monkeypatch)
        assert _sweep(out, _grid(base / "grid.yaml", GRID)) == 0
        first = list(spy.calls)
        sgl = _row(json.loads((out / "sweep.json").read_text()), "sgl 35 %")
        scores = sorted(s["token_counts"][0]["sgl"]["exit_score"] for s in _samples(sgl["folder"]))
        threshold = scores[len(scores) // 2]  # exits the upper half: 0 < exit rate < 1
        spy.calls.clear()
        grid = _grid(base / "grid_exit.yaml", {**GRID, "exit_thresholds": [threshold]})
        assert _sweep(out, grid, extra=["--price-at", "internvl"]) == 0
        second = list(spy.calls)
    return {
        "out": out,
        "grid": grid,
        "data": json.loads((out / "sweep.json").read_text()),
        "threshold": threshold,
        "first": first,
        "second": second,
    }


@pytest.mark.slow
def test_sweep_writes_report_json_and_plots(swept):
    out, data = swept["out"], swept["data"]
    assert len(swept["first"]) == 4 and swept["second"] == []  # finished points are never recomputed
    labels = [r["label"] for r in data["rows"]]
    t = f"{swept['threshold']:.6g}"
    assert labels == [
        "sgl 64 %",
        "sgl 35 %",
        "fastv 64 %",
        "fastv 35 %",
        f"sgl 64 %, exit >= {t}",
        f"sgl 35 %, exit >= {t}",
    ]
    assert all(r["metric"] == "exact_match" and r["n"] == LIMIT for r in data["rows"])
    assert all(r["real_flops_ratio"] is not None for r in data["rows"])  # --price-at internvl
    assert any(r["on_frontier"] for r in data["rows"])
    text = (out / "sweep.md").read_text()
    assert "## sgl_shapes (exact_match, higher is better)" in text
    assert "Frontier (recorded FLOPs):" in text and "Paired differences against SGL:" in text
    assert "FLOPs % at InternVL2-2B → 26B, one tile" in text
    for kind in ("ratio", "flops"):
        png = out / f"sweep_sgl_shapes_{kind}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in text


@pytest.mark.slow
def test_point_equals_a_plain_evaluation(swept):
    row = _row(swept["data"], "sgl 35 %")
    assert row["model_args"] == f"{ARGS},method=sgl,token_ratio=0.35"
    plain = _plain(row["model_args"])
    scored = plain["results"]["sgl_shapes"]
    stats = {
        k.split(".")[-1]: v for k, v in plain["throughput"].items() if k.startswith("avg_sgl.sgl_shapes.")
    }
    assert row["value"] == scored["exact_match,none"]
    assert row["stderr"] == scored["exact_match_stderr_clt,none"]
    assert row["token_ratio"] == stats["visual_token_ratio"]
    # evaluated with record_exit_score=true; the row leaves its consistency pass out, as the plain run does
    assert row["flops_ratio"] == pytest.approx(stats["flops_ratio"], rel=1e-12)
    assert row["exit_rate"] == stats["exit_rate"] == 0.0


@pytest.mark.slow
def test_replayed_exit_equals_a_real_run(swept):
    threshold = swept["threshold"]
    row = _row(swept["data"], f"sgl 35 %, exit >= {threshold:.6g}")
    assert row["replayed"] and 0 < row["exit_rate"] < 1
    real = _plain(row["model_args"])
    assert row["model_args"].endswith(f",exit_threshold={threshold!r}")
    stats = {
        k.split(".")[-1]: v for k, v in real["throughput"].items() if k.startswith("avg_sgl.sgl_shapes.")
    }
    assert row["value"] == real["results"]["sgl_shapes"]["exact_match,none"]
    assert row["exit_rate"] == stats["exit_rate"]
    assert row["large_call_rate"] == stats["large_call_rate"]
    assert row["flops_ratio"] == stats["flops_ratio"]
    assert row["token_ratio"] == pytest.approx(stats["visual_token_ratio"])
    per_doc = {str(s["doc_id"]): float(s["exact_match"]) for s in real["samples"]["sgl_shapes"]}
    assert row["scores"] == per_doc


@pytest.mark.slow
def test_two_processes_equal_one(swept, tmp_path):
    """The same sweep under ``accelerate launch`` with two gloo processes (lmms-eval shards the
    documents; rank 0 writes the points and the report) gives the same rows, exit replay included."""
    import os
    import subprocess

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29534"]
    out = tmp_path / "two"
    command = [*launcher, "-m", "lmms_sgl.sweep.cli", "--model", "sgl_internvl2", "--model_args", ARGS]
    command += ["--tasks", "sgl_shapes", "--include_path", str(ROOT / "tasks"), "--limit", str(LIMIT)]
    command += ["--batch_size", str(BATCH), "--output_path", str(out), "--grid", str(swept["grid"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "process 1 of 2" in done.stderr, "the launch did not use two processes"
    two = json.loads((out / "sweep.json").read_text())["rows"]
    one = swept["data"]["rows"]
    assert [r["label"] for r in two] == [r["label"] for r in one]
    for a, b in zip(two, one, strict=True):
        assert (a["value"], a["n"], a["scores"], a["exit_rate"]) == (
            b["value"],
            b["n"],
            b["scores"],
            b["exit_rate"],
        )
        assert a["token_ratio"] == pytest.approx(b["token_ratio"]), a["label"]
        assert a["flops_ratio"] == pytest.approx(b["flops_ratio"]), a["label"]
    assert len(list(out.glob("points/*/point.json"))) == 4  # one marker per point, by rank 0


@pytest.mark.slow
def test_paired_standard_errors_equal_a_reference(swept):
    data = swept["data"]

    def scores(label):
        return {s["doc_id"]: float(s["exact_match"]) for s in _samples(_row(data, label)["folder"])}

    for ratio in ("64 %", "35 %"):
        fastv, sgl = scores(f"fastv {ratio}"), scores(f"sgl {ratio}")
        d = [fastv[k] - sgl[k] for k in sorted(sgl)]
        [entry] = [p for p in data["paired"] if p["label"] == f"fastv {ratio}"]
        assert entry["against"] == f"sgl {ratio}" and entry["n"] == LIMIT
        assert entry["difference"] == pytest.approx(statistics.mean(d))
        assert entry["stderr"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))


def _without_seconds(report: str) -> list[str]:
    """The report with each table row's seconds cell blanked (measured time differs run to run)."""
    out = []
    for line in report.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) > 8 and "seconds" not in line:
            cells[-2] = ""
        out.append(" | ".join(cells))
    return out


@pytest.mark.slow
def test_interrupted_sweep_evaluates_only_the_missing_point(swept, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(swept["out"], out)
    before = (out / "sweep.md").read_text()
    folder = Path(_row(swept["data"], "fastv 64 %")["folder"].replace(str(swept["out"]), str(out)))
    (folder / "point.json").unlink()  # killed mid-point: lmms-eval's partial output is not reused
    spy = Spy(monkeypatch)
    assert _sweep(out, swept["grid"], extra=["--price-at", "internvl"]) == 0
    assert spy.calls == [f"{ARGS},method=fastv,token_ratio=0.64"]
    after = json.loads((out / "sweep.json").read_text())
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "folder")} for r in swept["data"]["rows"]]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "folder")} for r in after["rows"]] == strip
    text = (out / "sweep.md").read_text().replace(str(out), str(swept["out"]))
    assert _without_seconds(text) == _without_seconds(before)


# -- before any model loads ---------------------------------------------------------------------
@pytest.fixture
def no_evaluation(monkeypatch):
    import lmms_eval.evaluator

    from lmms_sgl.families.base import HFVisionLanguageFamily

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or an evaluation started")

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", refuse)
    monkeypatch.setattr(HFVisionLanguageFamily, "load", refuse)


@pytest.mark.parametrize(
    ("spec", "model", "args", "said"),
    [
        ({"methods": ["sgl", "fastvv"], "ratios": [0.35]}, None, None, ["'fastvv'", "sgl, fastv, random"]),
        (
            {"methods": ["sgl"], "ratios": [{"prune_layer": 0.2, "keep_ratio": 1.5}]},
            None,
            None,
            ["'sgl K at 0.2, keep 1.5'", "keep_ratio=1.5 is outside the allowed range (0, 1]"],
        ),
        ({"methods": ["sgl"], "ratios": [0.5]}, None, None, ["'sgl 50 %'", "allowed: [0.09, 0.35, 0.64]"]),
        ({"methods": ["fastv"], "ratios": [0.09]}, None, None, ["'fastv 9 %'", "needs K >= 1"]),
        (
            {"methods": ["sgl"], "ratios": [0.35], "layouts": [{"max_tiles": 2}]},
            "sgl_llava",
            f"pretrained={ROOT / 'models/shapes-llava-large'},guide={ROOT / 'models/shapes-llava-guide'}",
            ["'sgl 35 % max_tiles=2'", "allowed with sgl_internvl2"],
        ),
        ({"methods": ["sgl"], "ratios": [0.35]}, None, f"{ARGS},method=fastv", ["sets ['method']"]),
        ({"methods": ["fastv"], "ratios": [0.35], "exit_thresholds": [0.5]}, None, None, ["method sgl"]),
        (
            {"methods": ["sgl"], "ratios": [0.35], "exit_thresholds": [1.5]},
            None,
            None,
            ["exit threshold 1.5"],
        ),
        ({"grids": [{"methods": ["sgl"], "colour": 1}]}, None, None, ["grids[0]: a mapping with keys among"]),
        (
            {"methods": ["sgl"], "units": [{"keep_units": 0}]},
            None,
            None,
            ["keep_units must be a whole number"],
        ),
        (
            {"methods": ["sgl"], "units": [None, {"keep_units": 1}]},
            None,
            None,
            ["or units for unit selection"],
        ),
        (
            {"grids": [{"methods": ["sgl"], "ratios": [0.35]}], "methods": ["fastv"]},
            None,
            None,
            ["grids: give"],
        ),
        (
            {"grids": [{"methods": ["sgl"], "ratios": [0.35]}, {"methods": ["fastv"], "ratios": [0.09]}]},
            None,
            None,
            ["'fastv 9 %'", "needs K >= 1"],
        ),
    ],
)
def test_bad_grid_fails_before_any_model_loads(spec, model, args, said, tmp_path, capsys, no_evaluation):
    out = tmp_path / "out"
    code = _sweep(out, _grid(tmp_path / "grid.yaml", spec), model or "sgl_internvl2", args or ARGS)
    error = capsys.readouterr().err
    assert code == 2
    for text in said:
        assert text in error
    assert not (out / "points").exists()


def test_named_grids_skip_what_the_model_refuses(no_evaluation):
    from lmms_sgl.sweep.grid import build

    grid = build("frontier", "sgl_internvl2", ARGS, 1)
    labels = [p.label for p in grid.points]
    # 12 layers: the 9 % preset is K = int(12 x 0.05) = 0, where FastV and PDrop cannot rank
    assert "fastv 9 %" not in labels and "pdrop 9 %" not in labels
    assert {label for label, _ in grid.skipped} == {"fastv 9 %", "pdrop 9 %"}
    assert {"sgl 9 %", "divprune 9 %", "large_only", "guide_only"} <= set(labels)
    assert grid.exit_thresholds == "deciles"
    paper = [p.label for p in build("paper", "sgl_internvl2", ARGS, 1).points]
    assert paper == [
        "sgl 64 %",
        "sgl 35 %",
        "sgl 9 %",
        "fastv 64 %",
        "fastv 35 %",
        "large_only",
        "guide_only",
    ]


def test_cache_key_follows_the_checkpoints(tmp_path):
    import os

    from lmms_sgl.sweep.run import point_key

    for name in ("large", "guide"):
        shutil.copytree(ROOT / f"models/shapes-internvl-{name}", tmp_path / name)
    args = f"pretrained={tmp_path / 'large'},guide={tmp_path / 'guide'},method=sgl"
    key = point_key("sgl_internvl2", args, ["sgl_shapes"], 4, 1)
    assert key == point_key("sgl_internvl2", args, ["sgl_shapes"], 4, 1)
    assert key != point_key("sgl_internvl2", args, ["sgl_shapes"], 5, 1)
    assert key != point_key("sgl_internvl2", args + ",token_ratio=0.35", ["sgl_shapes"], 4, 1)
    weights = tmp_path / "guide" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert key != point_key("sgl_internvl2", args, ["sgl_shapes"], 4, 1)


def test_wandb_one_run_per_point_in_one_group_and_a_summary(monkeypatch, tmp_path):
    from lmms_sgl.sweep.report import log_wandb

    runs = []

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged, self.finished = kwargs, {}, False
            self.config = types.SimpleNamespace(update=lambda values: self.logged.update(config=values))

        def log(self, values):
            self.logged.update(values)

        def finish(self):
            self.finished = True

    def init(**kwargs):
        runs.append(Run(kwargs))
        return runs[-1]

    fake = types.SimpleNamespace(
        init=init, Table=lambda columns, data: (columns, data), Image=lambda p: ("img", p)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "sweep_gqa_flops.png").write_bytes(b"\x89PNG")
    common = {
        "task": "gqa",
        "metric": "exact_match",
        "method": "sgl",
        "exit_threshold": None,
        "replayed": False,
    }
    rows = [
        {**common, "label": "sgl 35 %", "model_args": "a,method=sgl", "value": 0.5, "on_frontier": True},
        {
            **common,
            "label": "sgl 35 %, exit >= 0.9",
            "model_args": "a,method=sgl,exit_threshold=0.9",
            "value": 0.45,
            "exit_rate": 0.2,
            "replayed": True,
            "exit_threshold": 0.9,
        },
    ]
    data = {
        "grid": "paper",
        "tasks": ["gqa"],
        "command": "c",
        "rows": rows,
        "plots": {"gqa": {"flops": "sweep_gqa_flops.png"}},
    }
    log_wandb("project=p,mode=offline", data, tmp_path)
    assert [r.kwargs["name"] for r in runs] == ["sgl 35 %", "sgl 35 %, exit >= 0.9", "summary"]
    assert all(r.finished and r.kwargs["project"] == "p" and r.kwargs["mode"] == "offline" for r in runs)
    assert len({r.kwargs["group"] for r in runs}) == 1 and len({r.kwargs["id"] for r in runs}) == 3
    assert runs[0].kwargs["config"]["model_args"] == "a,method=sgl"
    assert runs[1].logged == {"gqa/exact_match": 0.45, "gqa/exit_rate": 0.2}
    columns, table = runs[2].logged["sweep/gqa"]
    assert table == [[row.get(c) for c in columns] for row in rows] and "label" in columns
    assert runs[2].logged["sweep/gqa_flops"] == ("img", str(tmp_path / "sweep_gqa_flops.png"))
    ids = [r.kwargs["id"] for r in runs]
    runs.clear()
    log_wandb("project=p,mode=offline", data, tmp_path)  # a resumed sweep updates the same runs
    assert [r.kwargs["id"] for r in runs] == ids and all(r.kwargs["resume"] == "allow" for r in runs)


def test_unwritable_output_path_fails_before_any_model_loads(tmp_path, capsys, no_evaluation):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    grid = _grid(tmp_path / "grid.yaml", {"methods": ["sgl"], "ratios": [0.35]})
    assert _sweep(blocker / "out", grid) == 2
    assert "--output_path" in capsys.readouterr().err


def test_paired_references_and_frontier():
    """Which SGL point each row is compared with, and the frontier on recorded FLOPs."""
    from lmms_sgl.sweep.report import mark_frontier, paired
    from lmms_sgl.sweep.run import Row

    def row(label, method, ratio, value, flops, scores, **extra):
        args, layout = extra.pop("args", f"x,method={method}"), extra.pop("layout", {})
        replayed = extra.pop("replayed", False)
        return Row(
            "t", label, method, ratio, None, layout, None, replayed, "m", value, 0.1, 4, None,
            0.0, 1.0, flops, None, args, "", scores=scores,
        )  # fmt: skip

    sgl = row("sgl 35 %", "sgl", "35 %", 0.75, 0.5, {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0})
    sgl_tiles = row(
        "sgl 35 % max_tiles=2",
        "sgl",
        "35 %",
        0.5,
        0.6,
        {},
        layout={"max_tiles": 2},
        args="x,method=sgl,max_tiles=2",
    )
    fastv = row("fastv 35 %", "fastv", "35 %", 0.25, 0.4, {"0": 0.0, "1": 1.0, "2": 0.0, "3": 0.0})
    large = row("large_only", "large_only", "", 1.0, 1.0, {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0})
    exits = row(
        "sgl 35 %, exit >= 0.9", "sgl", "35 %", 0.5, 0.3, {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0},
        replayed=True, args="x,method=sgl,exit_threshold=0.9",
    )  # fmt: skip
    rows = [sgl, sgl_tiles, fastv, large, exits]
    pairs = {(p["label"], p["against"]): p for p in paired(rows)}
    assert set(pairs) == {
        ("fastv 35 %", "sgl 35 %"),
        ("large_only", "sgl 35 %"),
        ("large_only", "sgl 35 % max_tiles=2"),
        ("sgl 35 %, exit >= 0.9", "sgl 35 %"),
    }
    d = [-1.0, 0.0, -1.0, 0.0]
    assert pairs[("fastv 35 %", "sgl 35 %")]["difference"] == pytest.approx(statistics.mean(d))
    assert pairs[("fastv 35 %", "sgl 35 %")]["stderr"] == pytest.approx(statistics.stdev(d) / 2)
    assert pairs[("large_only", "sgl 35 % max_tiles=2")]["stderr"] is None  # no per-question scores
    mark_frontier(rows)
    # by cost: exits (0.3, 0.5), fastv (0.4, 0.25: worse), sgl (0.5, 0.75), tiles (0.6, 0.5: worse), large
    assert [r.label for r in rows if r.on_frontier] == ["sgl 35 %", "large_only", "sgl 35 %, exit >= 0.9"]


@pytest.mark.slow
def test_killed_sweep_resumes_at_the_first_unfinished_point(swept, tmp_path, monkeypatch):
    """SIGKILL once the first point is cached; the rerun evaluates only the second and reports what
    the uninterrupted module sweep reports for those points. With ``--use_cache`` a point whose
    folder was lost is evaluated again from its response cache."""
    import os
    import signal
    import subprocess
    import time

    grid = _grid(tmp_path / "grid.yaml", {"methods": ["sgl", "fastv"], "ratios": [0.35]})
    out = tmp_path / "out"
    args = ["--model", "sgl_internvl2", "--model_args", ARGS, "--tasks", "sgl_shapes"]
    args += ["--include_path", str(ROOT / "tasks"), "--limit", str(LIMIT), "--batch_size", str(BATCH)]
    args += ["--output_path", str(out), "--grid", str(grid), "--use_cache", str(tmp_path / "cache")]
    process = subprocess.Popen(
        [sys.executable, "-m", "lmms_sgl.sweep.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("points/*/point.json")):
            assert process.poll() is None, "the sweep ended before the first point was cached"
            assert time.monotonic() < deadline, "no point cached in 10 minutes"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert [p.parent.name.split("-")[0] for p in out.glob("points/*/point.json")] == ["sgl_35"]
    spy = Spy(monkeypatch)
    assert main(args) == 0
    assert spy.calls == [f"{ARGS},method=fastv,token_ratio=0.35"]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["sgl 35 %", "fastv 35 %"]
    figures = ("value", "stderr", "n", "scores", "token_ratio", "exit_rate", "flops_ratio")
    uninterrupted = {r["label"]: r for r in swept["data"]["rows"]}
    for row in rows:  # the same figures as the module's uninterrupted sweep of the same points
        reference = uninterrupted[row["label"]]
        assert {k: row[k] for k in figures} == {k: reference[k] for k in figures}, row["label"]
    # the SGL point's folder lost (as if killed before its marker): its answers come from the cache
    [folder] = [p.parent for p in out.glob("points/sgl_35*/point.json")]
    shutil.rmtree(folder)
    spy.calls.clear()
    assert main(args) == 0
    assert len(spy.calls) == 1 and ",method=sgl," in spy.calls[0]
    records = [s["token_counts"][0]["sgl"] for s in _samples(str(folder))]
    assert len(records) == LIMIT and all(r["extra"].get("from_cache") for r in records)
    again = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["value"], r["scores"]) for r in again] == [(r["value"], r["scores"]) for r in rows]


@pytest.mark.slow
def test_qwen_sweep_with_a_multiple_choice_task(models_dir, tmp_path):
    """sgl_qwen2_vl (factory checkpoints) on a generation and a multiple-choice task with
    --force_simple: both measured, the exit replayed on the generation task only (MC never exits)."""
    pixels = f"min_pixels={4 * 32 * 32},max_pixels={16 * 32 * 32}"
    args = f"pretrained={models_dir / 'qwen2.5-vl-large'},guide={models_dir / 'qwen2.5-vl-guide'},{pixels}"
    spec = {"methods": ["sgl"], "ratios": [{"prune_layer": 0.5, "keep_ratio": 0.2}], "exit_thresholds": [0.0]}
    out = tmp_path / "out"
    code = main(
        ["--model", "sgl_qwen2_vl", "--model_args", args, "--tasks", "sgl_smoke,sgl_smoke_mc", "--limit", "2"]
        + ["--include_path", str(ROOT / "tasks"), "--output_path", str(out), "--force_simple"]
        + ["--grid", str(_grid(tmp_path / "grid.yaml", spec))]
    )
    assert code == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = {(r["task"], r["label"]): r for r in data["rows"]}
    label = "sgl K at 0.5, keep 0.2"
    assert set(rows) == {
        ("sgl_smoke", label),
        ("sgl_smoke_mc", label),
        ("sgl_smoke", f"{label}, exit >= 0"),
    }
    assert rows[("sgl_smoke_mc", label)]["metric"] == "acc"
    assert (
        rows[("sgl_smoke", f"{label}, exit >= 0")]["exit_rate"] == 1.0
    )  # threshold 0: the guide answers all
    assert any("sgl_smoke_mc" in note and "never exit" in note for note in data["notes"])
