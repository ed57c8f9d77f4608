"""Small helpers shared by the method tests: load a factory checkpoint, build a batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

QUESTIONS = ["What color is the circle?", "Is it?", "How many objects are there in the picture?"]
SIZES = [(800, 500), (448, 448), (300, 900)]
COLORS = [(120, 30, 200), (10, 130, 200), (200, 200, 40)]


def load(path: Path, attn_implementation="sdpa"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return model, processor


def prompt(processor, question: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def batch(processor, indices=(0, 1)):
    texts = [prompt(processor, QUESTIONS[i]) for i in indices]
    images = [Image.new("RGB", SIZES[i], COLORS[i]) for i in indices]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def greedy(model, inputs, steps=5, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)


def run_lmms_eval(
    model: str, model_args: str, tasks: str, tasks_dir: Path, out: Path, *extra: str, launcher=()
):
    """Run the plain lmms-eval CLI; return ``(results.json, completed process)``.

    The CLI exits 0 even when evaluation fails, so callers assert on the files it writes.
    """
    exe = Path(sys.executable).with_name("lmms-eval")
    command = [*launcher, "-m", "lmms_eval"] if launcher else [str(exe)]
    command += [
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
    out.mkdir(parents=True, exist_ok=True)
    # one torch thread per process: the tiny models gain nothing from two, and two processes of two
    # threads on two cores wait on each other (an InternVL CLI run took 2x as long under load)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=out, env=env)
    results = sorted(out.rglob("*_results.json"))
    assert results, f"no results.json written\nSTDOUT:{done.stdout[-3000:]}\nSTDERR:{done.stderr[-6000:]}"
    return json.loads(results[-1].read_text()), done


def samples_of(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    assert files, f"no samples log for {task} under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def raw_response(row: dict) -> str:
    """The model's unfiltered answer from a samples-log row (lmms-eval drops ``resps`` when it
    equals ``filtered_resps`` and unwraps one-element lists)."""
    value = row.get("resps", row["filtered_resps"])
    while isinstance(value, list):
        value = value[0]
    return value


def evaluate(
    model: str, model_args: str, tasks: str, tasks_dir: Path, limit: int, batch_size: int = 1, **options
) -> dict:
    """lmms-eval's evaluator in this process (no CLI start-up), samples logged; it raises on errors.
    ``options`` go to ``simple_evaluate`` as they are (``force_simple``, ``use_cache``...)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks.split(","),
        batch_size=batch_size,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        # only the local tasks: indexing lmms-eval's ~2,000 task files costs seconds per call
        task_manager=TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False),
        verbosity="WARNING",
        **options,
    )


def kept_visual_sets(monkeypatch) -> list[list[int]]:
    """Record, per sample the large model ran, which of its visual tokens the keep plan kept
    (ordinals among that sample's visual tokens, so batch padding does not matter); for the methods
    that keep the top tokens by a score (SGL's own plan and the scored baselines)."""
    import lmms_sgl.method.registry as registry_module
    import lmms_sgl.method.sgl as sgl_module

    kept: list[list[int]] = []
    plan_from_scores = sgl_module.plan_from_scores

    def spy(scores, visual_mask, attention_mask, keep_ratio):
        plan = plan_from_scores(scores, visual_mask, attention_mask, keep_ratio)
        for b in range(visual_mask.shape[0]):
            positions = set(plan.index[b][plan.valid[b]].tolist())
            visual = visual_mask[b].nonzero().flatten().tolist()
            kept.append([i for i, position in enumerate(visual) if position in positions])
        return plan

    for module in (sgl_module, registry_module):
        monkeypatch.setattr(module, "plan_from_scores", spy)
    return kept


def one_thread():
    """One torch thread while a module runs (use as a module fixture): the tiny models' operations are
    too small to gain from a second thread, and on a loaded machine two threads waiting on each other
    made an InternVL request ~7x slower (measured in issue 27)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_mass_equals_output_attentions(mass, sequences, eager, inputs, kwargs, rows, visual, steps) -> None:
    """The recorded importance ``mass`` equals the same generation re-run with transformers' eager
    ``output_attentions``: prefill rows weighted by ``rows``, then every fed-back token's row, summed
    over heads and layers (the independent oracle of the guide's recording)."""
    with torch.no_grad():
        out = eager.generate(**inputs, **kwargs, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(sequences, out.sequences)
    length = inputs["input_ids"].shape[1]
    expected = torch.zeros(mass.shape)
    for step, layers in enumerate(out.attentions[:steps]):
        for attention in layers:
            if step == 0:
                expected += torch.einsum("bhqk,bq->bk", attention[..., :length], rows.float())
            else:
                expected += attention[:, :, 0, :length].sum(1)
    assert mass[visual].sum() > 0
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-5)
