"""Benchmarks: guidance overhead, pruning speedup versus FLOPs, end-to-end cost, memory.

Answers "where is my speedup?" with measurements on this machine, as ratios taken within one run
(the machine is shared and noisy: absolute seconds mean little, ratios measured back to back do).
Models are random-weight InternVL checkpoints whose shapes scale down a real pair: the guide costs
about 1/10 of the large model's FLOPs, as InternVL2-2B does next to InternVL2-26B. Images give 256
visual tokens (one tile) and 1792 (six tiles plus a thumbnail).

    lmms-sgl-benchmark --out reports/benchmarks.md          # full run (about 15-25 minutes here)
    lmms-sgl-benchmark --smoke --out /tmp/bench.md          # tiny sizes, seconds (used by a test)

Memory is the peak resident set size above the level just before the measured call, sampled every
2 ms by a background thread (CPU tensors are invisible to tracemalloc). Each configuration that
compares whole pipelines runs in a fresh subprocess so that earlier allocations do not hide peaks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from PIL import Image

from lmms_sgl.factory import ModelSpec, TextSpec, VisionSpec, build_model
from lmms_sgl.families import InternVLFamily, LoadedVLM, Prompt
from lmms_sgl.method import cost
from lmms_sgl.method.guide import captured_prompt_embeddings
from lmms_sgl.method.importance import ATTENTION_NAME, AttentionRecorder, prompt_rows_from_last_visual
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import PAPER_PRESETS, SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline

# Shapes: InternVL2-2B's LM is 24 x 2048 and 26B's 48 x 6144 (about 1/12 the FLOPs per token).
# These keep that ratio (about 1/10) at a size a 2-core CPU runs in seconds; the large model has
# 24 layers so that the paper's presets give its K values at 9 % (K = 1) and a close 35 %/64 %.
FULL = {
    "guide": ModelSpec(
        "bench-guide", "internvl", "guide", TextSpec(320, 8, 5, 1, 896), VisionSpec(128, 2, 4, 512), 31
    ),
    "large": ModelSpec(
        "bench-large", "internvl", "large", TextSpec(640, 24, 10, 2, 1792), VisionSpec(256, 4, 4, 1024), 32
    ),
}
SMOKE = {
    "guide": ModelSpec(
        "smoke-guide", "internvl", "guide", TextSpec(64, 2, 4, 2, 128), VisionSpec(32, 1, 2, 64), 41
    ),
    "large": ModelSpec(
        "smoke-large", "internvl", "large", TextSpec(128, 4, 8, 2, 256), VisionSpec(64, 2, 4, 128), 42
    ),
}
IMAGES = {256: (448, 448), 1792: (1344, 896)}  # 1 tile; 6 tiles + thumbnail with max_tiles=6
QUESTION = "What color is the small circle next to the large square? Answer with a single word."


class PeakMemory:
    """Peak RSS above the starting level while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakMemory:
        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def load_pair(specs: dict[str, ModelSpec], large_attention: str = "sdpa") -> tuple[LoadedVLM, LoadedVLM]:
    family = InternVLFamily(max_tiles=6)
    loaded = []
    for role, attention in (("guide", ATTENTION_NAME), ("large", large_attention)):
        model, processor = build_model(specs[role])
        model.set_attn_implementation({"text_config": attention, "vision_config": "sdpa"})
        processor.tokenizer.padding_side = "left"
        loaded.append(LoadedVLM(family, model.eval(), processor, specs[role].name))
    return loaded[0], loaded[1]


def inputs_for(loaded: LoadedVLM, n_visual: int) -> dict:
    image = Image.new("RGB", IMAGES[n_visual], (90, 140, 200))
    inputs = loaded.family.build_batch(loaded, [Prompt(QUESTION, [image])])
    assert int((inputs["input_ids"] == loaded.image_token_id).sum()) == n_visual
    return inputs


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate(model, inputs, new_tokens: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
        )


# -- 1. importance recording overhead ---------------------------------------------------------
def bench_recording(specs, n_visual: int, new_tokens: int, repeats: int) -> dict:
    guide, _ = load_pair(specs)
    inputs = inputs_for(guide, n_visual)
    visual = inputs["input_ids"] == guide.image_token_id
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
    model = guide.model

    def plain():
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        generate(model, inputs, new_tokens)

    def recording():
        model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})
        with AttentionRecorder(rows).active():
            generate(model, inputs, new_tokens)

    def eager_peer():  # the official code's way: eager attention, attention maps kept by generate
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
        out = generate(model, inputs, new_tokens, output_attentions=True, return_dict_in_generate=True)
        prompt = visual.shape[1]
        first_row = int(rows[0].nonzero()[0])
        total = torch.zeros(visual.shape, dtype=torch.float32)
        for step, per_layer in enumerate(out.attentions[: new_tokens - 1]):
            for attn in per_layer:
                heads = attn.sum(1)  # [B, q, kv]
                total += (heads[:, first_row:] if step == 0 else heads[:, -1:]).sum(1)[:, :prompt]

    result = {}
    for name, fn in (
        ("plain_sdpa", plain),
        ("recording", recording),
        ("eager_output_attentions", eager_peer),
    ):
        seconds = timed(fn, repeats)
        with PeakMemory() as memory:
            fn()
        result[name] = {"seconds": seconds, "peak_mb": memory.delta_mb}
    return result


# -- 2. pruned large model: prefill and decode versus the FLOPs ideal -------------------------
def bench_pruning(specs, n_visual: int, settings: list[tuple[float, float]], repeats: int) -> list[dict]:
    """Language-model prefill and decode of the large model under pruning settings.

    The vision tower costs the same whatever is pruned, so it is left out: the merged prompt
    embeddings are computed once and ``generate`` starts from them.
    """
    _, large = load_pair(specs)
    inputs = inputs_for(large, n_visual)
    visual = inputs["input_ids"] == large.image_token_id
    prompt = inputs["input_ids"].shape[1]
    shape = large.text_shape
    with torch.no_grad(), captured_prompt_embeddings(large.text_model) as captured:
        large.model(**inputs, logits_to_keep=1)
    embeds = {"inputs_embeds": captured["embeds"], "attention_mask": inputs["attention_mask"]}
    rows = []
    decode_tokens = 16
    for prune_layer, keep_ratio in settings:
        pruning = keep_ratio < 1.0
        k = cost.prune_layer_index(large.num_layers, prune_layer)
        plan = plan_from_scores(random_scores(visual, 0), visual, inputs["attention_mask"], keep_ratio)
        pruner = VisualTokenPruner(large.text_model, k)

        def run(tokens, pruning=pruning, pruner=pruner, plan=plan):
            if not pruning:
                return generate(large.model, embeds, tokens)
            with pruner.installed():
                pruner.arm(plan)
                return generate(large.model, embeds, tokens)

        prefill = timed(lambda: run(1), repeats)
        full = timed(lambda: run(decode_tokens + 1), max(1, repeats // 2))
        pruned_len = plan.pruned_length if pruning else prompt
        layer_k = k if pruning else None
        rows.append(
            {
                "prune_layer": prune_layer,
                "keep_ratio": keep_ratio,
                "layer_k": layer_k,
                "token_ratio": cost.token_ratio(k, large.num_layers, keep_ratio) if pruning else 1.0,
                "prefill_seconds": prefill,
                "decode_seconds_per_token": max(full - prefill, 0.0) / decode_tokens,
                "prefill_flops": cost.prefill_flops(shape, prompt, layer_k, pruned_len),
                "decode_flops_per_token": cost.decode_flops(
                    shape, prompt, decode_tokens + 1, layer_k, pruned_len
                )
                / decode_tokens,
            }
        )
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_seconds"] / row["prefill_seconds"]
        row["prefill_ideal_speedup"] = base["prefill_flops"] / row["prefill_flops"]
        row["prefill_fraction_of_ideal"] = row["prefill_speedup"] / row["prefill_ideal_speedup"]
        row["decode_speedup"] = base["decode_seconds_per_token"] / max(row["decode_seconds_per_token"], 1e-9)
        row["decode_ideal_speedup"] = base["decode_flops_per_token"] / row["decode_flops_per_token"]
    return rows


# -- 3 and 4. end to end, one configuration per subprocess ------------------------------------
def end_to_end(
    specs_name: str, method: str, preset: float | None, n_visual: int, new_tokens: int, repeats: int
):
    specs = SMOKE if specs_name == "smoke" else FULL
    before_models = psutil.Process().memory_info().rss
    if (
        method == "fastv"
        and cost.prune_layer_index(specs["large"].text.num_hidden_layers, PAPER_PRESETS[preset][0]) < 1
    ):
        return {
            "method": method,
            "preset": preset,
            "n_visual": n_visual,
            "skipped": "K = 0: FastV needs K >= 1",
        }
    guide, large = load_pair(specs, ATTENTION_NAME if method == "fastv" else "sdpa")
    if method == "large_only":
        del guide
        guide = None
        settings = SGLSettings(method="large_only")
    else:
        prune_layer, keep_ratio = PAPER_PRESETS[preset]
        if method == "fastv":
            guide = None
        settings = SGLSettings(method=method, prune_layer=prune_layer, keep_ratio=keep_ratio)
    image = Image.new("RGB", IMAGES[n_visual], (90, 140, 200))
    sample = Sample("bench", 0, Prompt(QUESTION, [image]))
    gen = GenerationSettings(max_new_tokens=new_tokens)
    pipeline = SGLPipeline(large, guide, settings)
    pipeline.generate([sample], gen)  # warm-up
    records, totals = [], []
    with PeakMemory() as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            records.append(pipeline.generate([sample], gen)[0])
            totals.append(time.perf_counter() - start)
    record = records[-1]
    return {
        "method": method,
        "preset": preset,
        "n_visual": n_visual,
        "seconds": statistics.median(totals),
        "guide_seconds": statistics.median(r.guide_seconds for r in records),
        "large_seconds": statistics.median(r.large_seconds for r in records),
        "flops": record.flops,
        "guide_flops": record.extra.get("guide_flops", 0.0),
        "flops_large_alone": record.flops_large_alone,
        "token_ratio": record.token_ratio,
        "footprint_mb": (memory.peak - before_models) / 2**20,
        "activation_peak_mb": memory.delta_mb,
    }


def run_subprocess(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "lmms_sgl.benchmark", "--worker", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Plan:
    specs_name: str
    visual_counts: tuple[int, ...]
    new_tokens: int
    repeats: int
    isolate: bool = True  # one subprocess per end-to-end configuration


def run_all(plan: Plan) -> dict:
    specs = SMOKE if plan.specs_name == "smoke" else FULL
    torch.set_num_threads(2)
    results: dict = {
        "machine": machine(),
        "plan": plan.__dict__,
        "recording": {},
        "pruning": {},
        "end_to_end": [],
    }
    settings = [(0.0, 1.0), *sorted(PAPER_PRESETS.values(), reverse=True), (0.0, 0.2), (0.5, 0.2)]
    for n in plan.visual_counts:
        results["recording"][n] = bench_recording(specs, n, plan.new_tokens, plan.repeats)
        results["pruning"][n] = bench_pruning(specs, n, settings, plan.repeats)
        for method, preset in [("large_only", None)] + [
            (m, p) for p in sorted(PAPER_PRESETS, reverse=True) for m in ("sgl", "fastv")
        ]:
            if plan.isolate:
                args = (plan.specs_name, method, str(preset), str(n), str(plan.new_tokens), str(plan.repeats))
                row = run_subprocess(*args)
            else:  # smoke runs stay in-process: fast, but memory figures then share one process
                row = end_to_end(plan.specs_name, method, preset, n, plan.new_tokens, plan.repeats)
            results["end_to_end"].append(row)
    results["guide_to_large_flops"] = {
        n: cost.generation_flops(text_shape(specs["guide"]), n + 20, 10)
        / cost.generation_flops(text_shape(specs["large"]), n + 20, 10)
        for n in plan.visual_counts
    }
    return results


def text_shape(spec: ModelSpec) -> cost.TransformerShape:
    t = spec.text
    head_dim = t.hidden_size // t.num_attention_heads
    return cost.TransformerShape(
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        head_dim,
        t.intermediate_size,
        True,
        600,
    )


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.md"))
    parser.add_argument("--smoke", action="store_true", help="tiny models and few repeats (seconds)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.worker:
        specs_name, method, preset, n, new_tokens, repeats = args.worker
        preset_value = None if preset == "None" else float(preset)
        print(json.dumps(end_to_end(specs_name, method, preset_value, int(n), int(new_tokens), int(repeats))))
        return
    plan = Plan("smoke", (256,), 4, 1, isolate=False) if args.smoke else Plan("full", (256, 1792), 10, 3)
    results = run_all(plan)
    from lmms_sgl.benchmark_report import write_report

    command = "lmms-sgl-benchmark" + (" --smoke" if args.smoke else "") + f" --out {args.out}"
    write_report(results, args.out, command)
    print(args.out)


if __name__ == "__main__":
    main()
