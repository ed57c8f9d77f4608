"""The SGL models through the plain lmms-eval CLI, offline, on the factory checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import evaluate, raw_response, run_lmms_eval, samples_of

pytestmark = pytest.mark.slow
SGL_ARGS = "prune_layer=0.5,keep_ratio=0.2"
one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)  # in-process runs too


def sgl_records(out: Path, task: str) -> list[dict]:
    """Our per-request records from the samples log (a multiple-choice doc has one per choice)."""
    return [entry["sgl"] for row in samples_of(out, task) for entry in row["token_counts"]]


def throughput(results: dict, scope: str, name: str):
    return results["throughput"][f"avg_sgl.{scope}.{name}"]


@pytest.mark.parametrize("model,family", [("sgl_internvl2", "internvl"), ("sgl_llava", "llava")])
def test_sgl_model_end_to_end_with_wandb(tmp_path, models_dir, tasks_dir, model, family):
    out = tmp_path / "out"
    args = f"pretrained={models_dir / f'{family}-large'},guide={models_dir / f'{family}-guide'},{SGL_ARGS}"
    args += ",max_tiles=6" if family == "internvl" else ""  # only InternVL tiles
    args += ",exit_threshold=0.00156"  # splits the random-weight guides' exit scores (about 0.0015-0.0018)
    results, done = run_lmms_eval(
        model,
        args,
        "sgl_smoke,sgl_gqa_local,sgl_smoke_mc",
        tasks_dir,
        out,
        "--limit",
        "4",
        "--batch_size",
        "2",
        "--wandb_args",
        f"project=lmms-sgl-test,mode=offline,dir={tmp_path}",
        "--force_simple",  # multiple choice reaches simple models only (README)
    )
    for task, metric in (
        ("sgl_smoke", "exact_match,none"),
        ("sgl_gqa_local", "exact_match,none"),
        ("sgl_smoke_mc", "acc,none"),
    ):
        assert metric in results["results"][task]

    generated = sgl_records(out, "sgl_smoke") + sgl_records(out, "sgl_gqa_local")
    scored = sgl_records(out, "sgl_smoke_mc")
    everything = generated + scored
    assert len(generated) == 8 and len(scored) == 4 * 6  # one log-likelihood request per choice
    assert throughput(results, "overall", "samples") == len(everything)
    exited = sum(r["exited"] for r in everything)
    assert 0 < exited < len(generated), "the threshold should split the generated samples"
    assert throughput(results, "overall", "exit_rate") == pytest.approx(exited / len(everything))
    reached = [r for r in everything if r["reached_large"] and r["total_visual"]]
    ratio = sum(r["token_ratio"] * r["total_visual"] for r in reached) / sum(
        r["total_visual"] for r in reached
    )
    assert throughput(results, "overall", "visual_token_ratio") == pytest.approx(ratio)
    flops = sum(r["flops"] for r in everything) / sum(r["flops_large_alone"] for r in everything)
    assert throughput(results, "overall", "flops_ratio") == pytest.approx(flops)
    assert throughput(results, "sgl_smoke", "samples") == 4
    for row in samples_of(out, "sgl_smoke"):
        record = row["token_counts"][0]["sgl"]
        assert raw_response(row) == record["answer"]
        if record["exited"]:
            assert record["answer"] == record["guide_answer"] and not record["reached_large"]
    assert "SGL run statistics" in done.stdout and "| failed | exit_not_applied |" in done.stdout
    for record in scored:  # multiple choice: the guide ranks, the large model scores, no exit
        assert record["guide_seconds"] > 0 and record["large_seconds"] > 0 and not record["exited"]
        assert record["extra"]["exit_not_applied"]
    assert throughput(results, "overall", "exit_not_applied") == len(scored)
    assert throughput(results, "sgl_smoke", "exit_not_applied") == 0

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("run-*.wandb"))
    tables = list(runs[0].rglob("sgl/samples_*.table.json"))
    assert tables, "the per-sample table was not logged"
    table = json.loads(tables[0].read_text())
    assert {
        "task",
        "doc_id",
        "guide_answer",
        "answer",
        "exited",
        "token_ratio",
        "confidence",
        "consistency",
    } <= set(table["columns"])
    assert len(table["data"]) == len(everything)


@pytest.mark.parametrize(
    "host,model,family,dtype",
    [("internvl_hf", "sgl_internvl2", "internvl", "bfloat16"), ("llava_hf", "sgl_llava", "llava", "float32")],
)
def test_large_only_answers_equal_the_host_model(models_dir, tasks_dir, host, model, family, dtype):
    """Same checkpoint, same prompts: lmms-eval's own HF model and ours with pruning and exit off.
    Neither side is cut: these tasks have no ``until`` of their own, and lmms-eval's injected
    "\\n\\n" stops neither (test_faithful_answers checks answers that contain one)."""
    large = models_dir / f"{family}-large"
    tasks = "sgl_smoke,sgl_gqa_local"
    host_args = f"pretrained={large},device=cpu,device_map=cpu" + (
        ",max_patches=12" if family == "internvl" else ""
    )
    theirs = evaluate(host, host_args, tasks, tasks_dir, 3)  # 3 documents a task: bf16 is slow on CPU
    ours_args = f"pretrained={large},method=large_only,dtype={dtype}" + (
        ",max_tiles=12" if family == "internvl" else ""  # only InternVL tiles
    )
    ours = evaluate(model, ours_args, tasks, tasks_dir, 3, batch_size=2)
    for task in tasks.split(","):
        expected = [raw_response(row) for row in theirs["samples"][task]]
        got = [raw_response(row) for row in ours["samples"][task]]
        assert got == expected, task


def test_two_processes_equal_one(tmp_path, models_dir, tasks_dir):
    """Two gloo processes under ``accelerate launch`` equal one, through the CLI. It runs the Qwen2.5-VL
    pair (3-D positions, images of any size, window attention; the sharding and the statistics merge
    are the same for every family) on generation and multiple choice."""
    args = f"pretrained={models_dir / 'qwen2.5-vl-large'},guide={models_dir / 'qwen2.5-vl-guide'}"
    # the checkpoint's own small pixel bounds, explicit (unset ones are lmms-eval's: 256+ tokens an image)
    args += ",prune_layer=0.5,keep_ratio=0.2,min_pixels=3136,max_pixels=50176"
    # multiple choice reaches simple models only (README)
    tasks, common = "sgl_smoke,sgl_smoke_mc", ("--limit", "7", "--batch_size", "2", "--force_simple")
    single, _ = run_lmms_eval("sgl_qwen2_vl", args, tasks, tasks_dir, tmp_path / "one", *common)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = (accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29533")
    wandb = ("--wandb_args", f"project=lmms-sgl-test,mode=offline,dir={tmp_path}")
    double, done = run_lmms_eval(
        "sgl_qwen2_vl", args, tasks, tasks_dir, tmp_path / "two", *common, *wandb, launcher=launcher
    )
    assert "Running on rank 1" in done.stderr + done.stdout, "the launch did not use two processes"
    for task in tasks.split(","):
        one = {row["doc_id"]: raw_response(row) for row in samples_of(tmp_path / "one", task)}
        two = {row["doc_id"]: raw_response(row) for row in samples_of(tmp_path / "two", task)}
        assert one == two and len(one) == 7, task
    assert double["results"]["sgl_smoke_mc"]["acc,none"] == single["results"]["sgl_smoke_mc"]["acc,none"]
    for name in ("samples", "visual_token_ratio", "exit_rate", "large_call_rate", "flops_ratio", "fallbacks"):
        assert throughput(double, "overall", name) == pytest.approx(throughput(single, "overall", name)), name
    assert throughput(single, "overall", "fallbacks") == 0
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1, "one W&B run per launch"


def run_cli(model_args: str, model: str, tasks_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lmms-eval")
    command = [
        str(exe),
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        "sgl_smoke",
        "--include_path",
        str(tasks_dir),
        "--verbosity",
        "DEBUG",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_bad_arguments_fail_before_loading(tmp_path, models_dir, tasks_dir, monkeypatch):
    pair = f"pretrained={models_dir / 'internvl-large'},guide={models_dir / 'internvl-guide'}"
    broken_guide = truncated_copy(models_dir / "llava-guide", tmp_path)
    cases = [
        (f"{pair},keep_ratio=1.5", "sgl_internvl2", r"keep_ratio=1.5 is outside the allowed range (0, 1]"),
        (f"{pair},colour=red", "sgl_internvl2", "unknown model argument(s) ['colour']"),
        (
            f"pretrained={tmp_path / 'missing'},method=large_only",
            "sgl_llava",
            "could not be read as a checkpoint",
        ),
        (
            f"pretrained={models_dir / 'internvl-large'},method=large_only",
            "sgl_llava",
            "is a 'internvl' checkpoint; the llava family serves",
        ),
        (  # the large model has 4 layers: int(4 * 0.05) = 0, and FastV ranks at layer K - 1
            f"pretrained={models_dir / 'internvl-large'},method=fastv,token_ratio=0.09",
            "sgl_internvl2",
            "method='fastv' ranks at layer K-1 and needs K >= 1",
        ),
        (
            f"pretrained={models_dir / 'llava-large'},guide={broken_guide}",
            "sgl_llava",
            f"guide={str(broken_guide)!r}: {broken_guide / 'model.safetensors'}: tensors need",
        ),
    ]
    import importlib

    import transformers
    from lmms_eval.utils import simple_parse_args_string

    from lmms_sgl.lmms.registry import MODELS

    def no_weights(*args, **kwargs):
        raise AssertionError("the error must come before any weights load")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    for model_args, model, message in cases:  # in this process: the model's own constructor
        module, name = MODELS[model].rsplit(".", 1)
        model_class = getattr(importlib.import_module(module), name)
        with pytest.raises(ValueError) as raised:
            model_class(**simple_parse_args_string(model_args))
        assert message in str(raised.value)
    # and once through the CLI: a non-zero exit with the message on stderr
    model_args, model, message = cases[0]
    done = run_cli(model_args, model, tasks_dir, tmp_path)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]


def truncated_copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of ``checkpoint`` whose weights file lost its last kilobyte (an interrupted copy)."""
    import shutil

    copy = tmp_path / f"{checkpoint.name}-truncated"
    shutil.copytree(checkpoint, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1024])
    return copy
