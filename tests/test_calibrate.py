"""``lmms-sgl-calibrate``: a replayed threshold equals a real run at that threshold; bad input fails
cleanly and writes nothing; LLM-judged tasks are judged through the task's own code, once.

Two real lmms-eval runs are shared by the module (the shipped trained LLaVA pair, 12 documents of
``sgl_shapes_val`` and of ``sgl_shapes_anls``): one without exit, one at the threshold calibrated
on the first for a 40 % exit rate.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from lmms_sgl.calibration.cli import main
from lmms_sgl.calibration.replay import EXIT_REFERENCE, ReplaySample, Target, choose, replay, sweep
from lmms_sgl.calibration.runs import load_run
from lmms_sgl.calibration.scoring import build_scorer, task_manager
from tests.helpers import samples_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sgl_shapes_val", "sgl_shapes_anls")
METRIC = {"sgl_shapes_val": "exact_match", "sgl_shapes_anls": "anls"}
ARGS = (
    f"pretrained={ROOT / 'models/shapes-llava-large'},guide={ROOT / 'models/shapes-llava-guide'},"
    "prune_layer=0.125,keep_ratio=0.290909"
)
LIMIT = 12
INCLUDE = ["--include-path", str(ROOT / "tasks")]  # in-process runs do not log the CLI's own


def _run(tasks_dir: Path, out: Path, model_args: str) -> Path:
    """One lmms-eval evaluation in this process, written as the CLI writes it with --log_samples
    (``simple_evaluate`` and ``EvaluationTracker``, what ``lmms-eval`` calls; no second interpreter
    and no index of lmms-eval's built-in tasks, which would cost about 25 s per run here)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    tracker = EvaluationTracker(output_path=str(out))
    results = simple_evaluate(
        model="sgl_llava",
        model_args=model_args,
        tasks=list(TASKS),
        batch_size=8,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False),
        evaluation_tracker=tracker,
        verbosity="WARNING",
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=get_datetime_str())
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tasks_dir):
    """The no-exit run, its calibration for a 40 % exit rate, and a real run at that threshold."""
    base = tmp_path_factory.mktemp("calibrate")
    no_exit = _run(tasks_dir, base / "no_exit", f"{ARGS},record_exit_score=true")
    calibration = base / "val.json"
    code = main(
        [
            str(no_exit),
            "--task",
            "sgl_shapes_val",
            "--include-path",
            str(tasks_dir),
            "--target-exit-rate",
            "0.4",
        ]
        + ["--json", str(calibration), "--plot", str(base / "val.png")]
    )
    assert code == 0
    threshold = json.loads(calibration.read_text())["tasks"]["sgl_shapes_val"]["recommended"]["threshold"]
    exit_run = _run(tasks_dir, base / "exit", f"{ARGS},exit_threshold={threshold!r}")
    return {
        "no_exit": no_exit,
        "exit": exit_run,
        "calibration": calibration,
        "threshold": threshold,
        "base": base,
    }


def _results(out: Path) -> dict:
    return json.loads(sorted(out.rglob("*_results.json"))[-1].read_text())


@pytest.mark.parametrize("task", TASKS)
def test_replayed_threshold_equals_the_real_run(runs, tasks_dir, task):
    """Exit rate, large-model calls, the task's metric and the pipeline's FLOPs, exactly."""
    run = load_run(runs["no_exit"], [task])
    scorer = build_scorer(task, run, task_manager([str(tasks_dir)], [task], run.model))
    from lmms_sgl.calibration.calibrate import replay_samples

    samples = replay_samples(scorer, run.tasks[task], METRIC[task], runs["base"] / "cache")
    point = replay(samples, runs["threshold"], scorer.aggregate(METRIC[task]))
    real = _results(runs["exit"])
    stats = {k.split(".")[-1]: v for k, v in real["throughput"].items() if k.startswith(f"avg_sgl.{task}.")}
    assert 0 < point.exit_rate < 1, "the threshold should split the documents"
    assert point.exit_rate == stats["exit_rate"]
    assert point.large_call_rate == stats["large_call_rate"]
    assert point.accuracy == real["results"][task][f"{METRIC[task]},none"]
    assert point.tflops == stats["tflops"]  # the FLOPs the pipeline spent
    records = {r["doc_id"]: r["token_counts"][0]["sgl"] for r in samples_of(runs["exit"], task)}
    # every record that reached the large model after a guide answer carries the reference the
    # pipeline would have counted had it exited, so the FLOPs ratio replays exactly too
    assert all(EXIT_REFERENCE in r["extra"] for r in records.values() if r["reached_large"])
    assert point.flops_reference == "guide answer length"
    assert point.flops_ratio == stats["flops_ratio"]


def test_cli_recommends_each_target_and_writes_json_and_plot(runs, tasks_dir, tmp_path, capsys):
    data = json.loads(runs["calibration"].read_text())["tasks"]["sgl_shapes_val"]
    curve, chosen = data["curve"], data["recommended"]
    assert curve[0]["threshold"] is None and curve[0]["exit_rate"] == 0  # no exit first
    assert abs(chosen["exit_rate"] - 0.4) == min(abs(p["exit_rate"] - 0.4) for p in curve)
    assert data["model_args_fragment"] == f"exit_threshold={chosen['threshold']!r}"
    assert data["model_args"].endswith(data["model_args_fragment"]) and "pretrained=" in data["model_args"]
    assert "record_exit_score" not in data["model_args"]  # a threshold computes the score anyway
    assert (runs["base"] / "val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    deciles = [p for p in data["table"] if p["threshold"] not in (None, 0.0, chosen["threshold"])]
    assert 1 <= len(deciles) <= 9

    out = tmp_path / "drop.json"
    assert (
        main(
            [
                *INCLUDE,
                str(runs["no_exit"]),
                "--task",
                "sgl_shapes_val",
                "--max-drop",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    drop = json.loads(out.read_text())["tasks"]["sgl_shapes_val"]
    reference, picked = drop["curve"][0]["accuracy"], drop["recommended"]
    assert reference - picked["accuracy"] <= 0.02 + 1e-9
    upto = drop["curve"][: drop["curve"].index(picked) + 1]
    assert all(reference - p["accuracy"] <= 0.02 + 1e-9 for p in upto)
    assert f"--model_args {drop['model_args_fragment']}" in printed

    out = tmp_path / "flops.json"
    assert main([*INCLUDE, str(runs["no_exit"]), "--flops-budget", "0.5", "--json", str(out)]) == 0
    for task in TASKS:  # both tasks of the run, each with its own threshold
        assert json.loads(out.read_text())["tasks"][task]["recommended"]["flops_ratio"] <= 0.5


def test_apply_reports_predicted_and_realised(runs, tmp_path):
    out = tmp_path / "applied.json"
    assert (
        main(
            [str(runs["exit"]), "--task", "sgl_shapes_val", "--apply", str(runs["calibration"])]
            + [
                "--json",
                str(out),
            ]
        )
        == 0
    )
    applied = json.loads(out.read_text())["tasks"]["sgl_shapes_val"]
    predicted, realised = applied["predicted"], applied["realised"]
    assert realised["source"] == "real run"
    # Same documents: what the calibration predicted is what the real run did.
    for key in ("exit_rate", "large_call_rate", "accuracy"):
        assert realised[key] == predicted[key], key

    out = tmp_path / "replayed.json"
    assert (
        main([*INCLUDE, str(runs["no_exit"]), "--apply", str(runs["calibration"]), "--json", str(out)]) == 0
    )
    replayed = json.loads(out.read_text())["tasks"]
    assert set(replayed) == set(TASKS)  # one recommendation: applied to every task of the run
    assert replayed["sgl_shapes_val"]["realised"]["exit_rate"] == predicted["exit_rate"]
    assert replayed["sgl_shapes_val"]["realised"]["source"].startswith("replayed")


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    return err


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return next(target.rglob("*_results.json"))


def test_bad_input_fails_cleanly_and_writes_nothing(runs, tmp_path, capsys):
    out, plot = tmp_path / "out.json", tmp_path / "out.png"
    writes = ["--json", str(out), "--plot", str(plot)]
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails([str(empty), *writes], capsys, "no lmms-eval results")

    no_samples = tmp_path / "no_samples"
    results = _copy_run(runs["no_exit"], no_samples)
    for log in no_samples.rglob("*_samples_*.jsonl"):
        log.unlink()
    _fails([str(no_samples), *writes], capsys, "--log_samples")

    other_model = tmp_path / "other_model"
    results = _copy_run(runs["no_exit"], other_model)
    data = json.loads(results.read_text())
    data["config"]["model"] = "llava_hf"
    results.write_text(json.dumps(data))
    _fails([str(other_model), *writes], capsys, "--model llava_hf", "SGL run")

    no_records = tmp_path / "no_records"
    _copy_run(runs["no_exit"], no_records)
    log = next(no_records.rglob("*_samples_sgl_shapes_val.jsonl"))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "token_counts": [{"output_tokens": 2}]}) + "\n" for r in rows))
    _fails([str(no_records), *writes], capsys, "no SGL record")

    _fails([str(runs["no_exit"]), "--task", "sgl_nope", *writes], capsys, "--task sgl_nope", "logged tasks")

    unknown = tmp_path / "unknown_task"
    _copy_run(runs["no_exit"], unknown)
    for log in unknown.rglob("*_samples_sgl_shapes_anls.jsonl"):
        log.rename(log.with_name(log.name.replace("sgl_shapes_anls", "sgl_not_a_task")))
    _fails([*INCLUDE, str(unknown), "--task", "sgl_not_a_task", *writes], capsys, "not known to lmms-eval")

    # A run that already exited: only thresholds up to its lowest exited score can be replayed.
    _fails(
        [*INCLUDE, str(runs["exit"]), "--task", "sgl_shapes_val", "--target-exit-rate", "0", *writes],
        capsys,
        "already exited",
    )
    _fails([*INCLUDE, str(runs["exit"]), "--max-drop", "1", *writes], capsys, "already exited")
    assert not out.exists() and not plot.exists()

    ok = tmp_path / "exited.json"
    assert main([*INCLUDE, str(runs["exit"]), "--task", "sgl_shapes_val", "--json", str(ok)]) == 0
    data = json.loads(ok.read_text())["tasks"]["sgl_shapes_val"]
    assert data["exited_in_run"] > 0 and data["replayable_ceiling"] is not None
    assert all(
        p["threshold"] is not None and p["threshold"] <= data["replayable_ceiling"] for p in data["curve"]
    )
    assert "Note:" in capsys.readouterr().out


def test_choice_rules_and_fractional_metrics():
    """Partial credit (ANLS, VQA accuracy) is aggregated by the task's function like any value."""

    def sample(doc_id, score, guide, final):
        return ReplaySample(doc_id, score, False, True, guide, final, 10.0, 2.0, 20.0, 20.0)

    samples = [sample(0, 0.9, 0.5, 1.0), sample(1, 0.6, 0.75, 0.25), sample(2, 0.3, 0.0, 1.0)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    points = sweep(samples, [None, 0.9, 0.6, 0.3], mean)
    assert [p.exit_rate for p in points] == [0, 1 / 3, 2 / 3, 1]
    assert [p.accuracy for p in points] == [mean([1.0, 0.25, 1.0]), mean([0.5, 0.25, 1.0])] + [
        mean([0.5, 0.75, 1.0]),
        mean([0.5, 0.75, 0.0]),
    ]
    assert points[3].flops_ratio == 6.0 / 60.0 and points[0].flops_ratio == 30.0 / 60.0
    assert choose(points, Target(exit_rate=0.4), 100).threshold == 0.9
    assert choose(points, Target(max_drop=20), 100).threshold == 0.6  # 0.9 loses 16.7 points, 0.3: 33
    # 0.6 alone would be within 10 points, but 0.9 on the way there is not: no exit.
    assert choose(points, Target(max_drop=10), 100).threshold is None
    assert choose(points, Target(flops_budget=0.3), 100).threshold == 0.6


def test_a_run_without_exit_scores_is_refused_naming_record_exit_score(runs, tmp_path, capsys):
    """A no-exit run made without record_exit_score skipped the consistency pass: nothing to replay."""
    skipped = tmp_path / "skipped"
    _copy_run(runs["no_exit"], skipped)
    for log in skipped.rglob("*_samples_*.jsonl"):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        for row in rows:
            record = row["token_counts"][0]["sgl"]
            record.update(exit_score=None, consistency=None)
            record["extra"]["exit_score_skipped"] = "no exit_threshold"
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    _fails([*INCLUDE, str(skipped), "--json", str(out)], capsys, "no exit scores", "record_exit_score=true")
    assert not out.exists()


def test_no_exit_leaves_out_the_consistency_pass_of_the_recorded_run():
    """The calibrated run paid the consistency pass for its scores; a run without a threshold skips
    it, so only the "no exit" point leaves it out."""
    samples = [
        ReplaySample(i, score, False, True, 1.0, 1.0, 10.0, 3.0, 20.0, 20.0, consistency_flops=1.0)
        for i, score in enumerate((0.9, 0.3))
    ]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    never, half = sweep(samples, [None, 0.5], mean)
    assert never.tflops * 1e12 == pytest.approx(2 * 9.0) and half.tflops * 1e12 == pytest.approx(3.0 + 10.0)


# -- LLM-judged tasks --------------------------------------------------------------------------------
JUDGED_YAML = """\
task: sgl_judged
dataset_path: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.mmvet.utils.mmvet_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mmvet.utils.doc_to_text
doc_to_target: "{{{{answer}}}}"
process_results: !function lmms_eval.tasks.mmvet.utils.mmvet_process_results
metric_list:
  - metric: gpt_eval_score
    aggregation: !function lmms_eval.tasks.mmvet.utils.mmvet_aggregate_results
    higher_is_better: true
"""


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: 1.0 when the prediction equals the ground truth, else 0.0."""

    calls = 0

    def do_POST(self):  # noqa: N802 -- http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # MM-Vet's prompt ends with "question | ground truth | prediction |"
        _question, truth, prediction = body["messages"][-1]["content"].splitlines()[-1][:-2].split(" | ")
        type(self).calls += 1
        reply = {
            "model": "fake-judge",
            "choices": [{"message": {"content": "1.0" if truth == prediction else "0.0"}}],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judged_run(tmp_path):
    """A logged SGL run of a local task scored by MM-Vet's own judge code (6 documents)."""
    import datasets

    docs = [
        {"question_id": f"q{i}", "question": f"Question {i}?", "answer": a, "capability": "rec"}
        for i, a in enumerate(["red", "blue", "two", "yes", "cat", "dog"])
    ]
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_list(docs).to_parquet(str(data / "test.parquet"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sgl_judged.yaml").write_text(JUDGED_YAML.format(data=data))
    out = tmp_path / "out" / "model"
    out.mkdir(parents=True)
    large = ["red", "blue", "three", "yes", "cow", "bird"]  # right on docs 0, 1, 3
    guide = ["red", "green", "two", "no", "cat", "dog"]  # right on docs 0, 2, 4, 5; equals large on doc 0
    rows = []
    for i, doc in enumerate(docs):
        record = {
            "task": "sgl_judged",
            "doc_id": i,
            "answer": large[i],
            "guide_answer": guide[i],
            "exited": False,
            "reached_large": True,
            "exit_score": 0.1 * (i + 1),
            "flops": 10.0,
            "flops_large_alone": 20.0,
            "extra": {"guide_flops": 3.0},
        }
        score = {
            **doc,
            "gt_answer": doc["answer"],
            "pred_answer": large[i],
            "score": float(large[i] == doc["answer"]),
        }
        rows.append(
            {
                "doc_id": i,
                "target": doc["answer"],
                "filtered_resps": large[i],
                "token_counts": [{"output_tokens": 2, "sgl": record}],
                "gpt_eval_score": {**score, "capabilities": "rec"},
            }
        )
    (out / "20260101_000000_samples_sgl_judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": "sgl_llava",
        "model_args": "pretrained=a,guide=b",
        "resolved_cli_args": {"include_path": str(tasks)},
    }
    (out / "20260101_000000_results.json").write_text(json.dumps({"config": config, "results": {}}))
    return out.parent


def test_judged_task_needs_a_judge_before_any_work(judged_run, tmp_path, monkeypatch, capsys):
    for name in ("API_TYPE", "OPENAI_API_KEY", "LLM_JUDGE_URL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "judged.json"
    _fails([str(judged_run), "--json", str(out)], capsys, "LLM judge", "OPENAI_API_KEY", "Nothing was scored")
    assert not out.exists() and not list(judged_run.rglob("sgl_calibration_cache"))


def test_judged_task_is_judged_once_and_cached(judged_run, tmp_path, monkeypatch, capsys):
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("API_TYPE", "local")
    monkeypatch.setenv("LLM_JUDGE_URL", f"http://127.0.0.1:{server.server_port}/v1/chat/completions")
    monkeypatch.delitem(
        sys.modules, "lmms_eval.tasks.mmvet.utils", raising=False
    )  # reads the judge at import
    stderr = []
    try:
        # Doc 0's guide answer is the run's own answer: its logged score is reused, 5 are judged;
        # the second run finds all 5 in the cache.
        for name in ("first.json", "second.json"):
            assert main([str(judged_run), "--target-exit-rate", "0.5", "--json", str(tmp_path / name)]) == 0
            assert _Judge.calls == 5
            stderr.append(capsys.readouterr().err)
    finally:
        server.shutdown()
        monkeypatch.delitem(sys.modules, "lmms_eval.tasks.mmvet.utils", raising=False)
    assert "judging guide answers (sgl_judged)" in stderr[0] and "5 guide answers judged now" in stderr[0]
    assert "0 guide answers judged now" in stderr[1]
    first, second = (
        json.loads((tmp_path / n).read_text())["tasks"]["sgl_judged"] for n in ("first.json", "second.json")
    )
    assert first["curve"] == second["curve"]
    # No exit: the large answers' logged scores (3 of 6, in percent as MM-Vet aggregates);
    # everything exits: the guide's answers as the judge scored them (4 of 6).
    assert first["curve"][0]["accuracy"] == pytest.approx(100 * 3 / 6)
    assert first["curve"][-1]["accuracy"] == pytest.approx(100 * 4 / 6)


def test_unwritable_outputs_exit_2_before_any_calibration(runs, tmp_path, monkeypatch, capsys):
    """``--json`` / ``--plot`` that cannot be written are usage errors: exit 2, one line naming the
    option and the path, before the run is even read."""
    import os

    import lmms_sgl.calibration.cli as cli

    def read(*args, **kwargs):
        raise AssertionError("the run was read although an output cannot be written")

    monkeypatch.setattr(cli, "load_run", read)
    run = str(runs["no_exit"])
    (tmp_path / "notes.txt").write_text("a file")
    _fails(
        [run, "--json", str(tmp_path / "notes.txt" / "out.json")], capsys, "--json", "is a file, not a folder"
    )
    _fails([run, "--plot", str(tmp_path)], capsys, "--plot", "is a folder")
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root may write anywhere: let the OS answer as it does for other users

        def access(path, mode, *args, **kwargs):
            if Path(path) == locked and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    err = _fails([run, "--plot", str(locked / "deep" / "out.png")], capsys, "--plot", "not writable")
    assert str(locked) in err and "Traceback" not in err
    assert list(locked.iterdir()) == []
