"""Benchmarks: guidance overhead, pruning speedup versus FLOPs, end-to-end cost, memory.

Answers "where is my speedup?" with measurements on this machine, as ratios taken within one run
(the machine is shared and noisy: absolute seconds mean little, ratios measured side by side do).
Models are random-weight InternVL checkpoints whose shapes scale down a real pair: the guide costs
about 1/10 of the large model's FLOPs, as InternVL2-2B does next to InternVL2-26B. Images give 256
visual tokens (one tile) and 1792 (six tiles plus a thumbnail).

    lmms-sgl-benchmark --out reports/benchmarks.md          # full run (about 10-15 minutes here)
    lmms-sgl-benchmark --smoke --out /tmp/bench.md          # tiny sizes, seconds (used by a test)
    lmms-sgl-benchmark --real-dims --device cuda --dtype bfloat16 --out bench.md   # the real pair's sizes
    lmms-sgl-benchmark --render --out reports/benchmarks.md # the report from the saved JSON files

Every goal is judged on the same operating point priced on InternVL2-2B -> 26B as well
(:mod:`.real_pair`): this pair's language models are dominated by attention at these lengths, the
real ones are not, so a goal met here may not be met there.

How it measures:
* configurations are run round-robin (after a warm-up round) and medians are taken, so drift of
  a shared machine hits every configuration alike;
* prefill and decode times come from one ``generate`` call each, timestamped at every step by a
  logits processor (prefill = time to the first step, decode = median step interval);
* peak memory is the peak of live tensor memory during one call, from the profiler's memory
  events (allocator-independent; RSS would hide re-used heap), plus parameter bytes for footprints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lmms_sgl.benchmarks.common import (
    DECODE_STEPS,
    FULL,
    IMAGES,
    QUESTION,
    SMOKE,
    Setup,
    add_setup_arguments,
    generate,
    inputs_for,
    interleaved,
    load_pair,
    machine,
    peak_tensor_memory,
    prefill_and_decode,
    seconds,
    set_text_attention,
    setup_from,
    synchronize,
    text_shape,
    weight_bytes,
)
from lmms_sgl.families import LoadedVLM, Prompt
from lmms_sgl.method import cost
from lmms_sgl.method.guide import captured_prompt_embeddings
from lmms_sgl.method.importance import ATTENTION_NAME, AttentionRecorder, prompt_rows_from_last_visual
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import PAPER_PRESETS, SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline


# -- 1. importance recording overhead ---------------------------------------------------------
def bench_recording(guide: LoadedVLM, n_visual: int, new_tokens: int, rounds: int) -> dict:
    inputs = inputs_for(guide, n_visual)
    visual = inputs["input_ids"] == guide.image_token_id
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
    model, prompt = guide.model, visual.shape[1]

    def plain():
        set_text_attention(guide, "sdpa")
        generate(model, inputs, new_tokens)

    def recording():
        set_text_attention(guide, ATTENTION_NAME)
        recorder = AttentionRecorder(rows)
        with recorder.active():
            generate(model, inputs, new_tokens)
        recorder.finalize([new_tokens - 1])

    def eager_peer():  # the official code's way: eager attention, attention maps kept by generate
        set_text_attention(guide, "eager")
        out = generate(model, inputs, new_tokens, output_attentions=True, return_dict_in_generate=True)
        first_row = int(rows[0].nonzero()[0])
        total = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for step, per_layer in enumerate(out.attentions[: new_tokens - 1]):
            for attn in per_layer:
                heads = attn.sum(1)  # [B, q, kv]
                total += (heads[:, first_row:] if step == 0 else heads[:, -1:]).sum(1)[:, :prompt]

    variants = {"plain_sdpa": plain, "recording": recording, "eager_output_attentions": eager_peer}
    times = interleaved({name: (lambda fn=fn: seconds(fn)) for name, fn in variants.items()}, rounds)
    result = {
        name: {
            "seconds": statistics.median(times[name]),
            "peak_mb": peak_tensor_memory(fn, guide.device) / 2**20,
        }
        for name, fn in variants.items()
    }
    set_text_attention(guide, ATTENTION_NAME)
    return result


# -- 2. pruned large model: prefill and decode versus the FLOPs ideal -------------------------
def bench_pruning(
    large: LoadedVLM, n_visual: int, settings: list[tuple[float, float]], rounds: int
) -> list[dict]:
    """Language-model prefill and decode of the large model under pruning settings.

    The vision tower costs the same whatever is pruned, so it is left out: the merged prompt
    embeddings are computed once and ``generate`` starts from them. For each setting a *dense*
    reference (no hooks, all layers) on a sequence as long as the pruned one separates the cost
    of our hooks from the CPU's lower efficiency on shorter sequences.
    """
    set_text_attention(large, "sdpa")
    inputs = inputs_for(large, n_visual)
    visual = inputs["input_ids"] == large.image_token_id
    prompt, shape, layers = inputs["input_ids"].shape[1], large.text_shape, large.num_layers
    with torch.no_grad(), captured_prompt_embeddings(large.text_model) as captured:
        large.model(**inputs, logits_to_keep=1)
    embeds = {"inputs_embeds": captured["embeds"], "attention_mask": inputs["attention_mask"]}

    functions, meta = {}, {}
    for prune_layer, keep_ratio in settings:
        pruning = keep_ratio < 1.0
        k = cost.prune_layer_index(layers, prune_layer)
        plan = plan_from_scores(random_scores(visual, 0), visual, inputs["attention_mask"], keep_ratio)
        pruner = VisualTokenPruner(large.text_model, k)
        name = f"{prune_layer}/{keep_ratio}"

        def run(pruning=pruning, pruner=pruner, plan=plan):
            if not pruning:
                return prefill_and_decode(large.model, embeds)
            with pruner.installed():
                pruner.arm(plan)
                return prefill_and_decode(large.model, embeds)

        pruned_len = plan.pruned_length if pruning else prompt
        short = {
            "inputs_embeds": captured["embeds"][:, -pruned_len:],
            "attention_mask": inputs["attention_mask"][:, -pruned_len:],
        }
        functions[name] = run
        functions[name + "/dense"] = lambda short=short: prefill_and_decode(large.model, short)
        meta[name] = (prune_layer, keep_ratio, k if pruning else None, pruned_len)

    measured = interleaved(functions, rounds)
    rows = []
    for name, (prune_layer, keep_ratio, layer_k, pruned_len) in meta.items():
        prefill = statistics.median(p for p, _ in measured[name])
        decode = statistics.median(d for _, d in measured[name])
        dense_prefill = statistics.median(p for p, _ in measured[name + "/dense"])
        rows.append(
            {
                "prune_layer": prune_layer,
                "keep_ratio": keep_ratio,
                "layer_k": layer_k,
                "pruned_length": pruned_len,
                "token_ratio": cost.token_ratio(layer_k, layers, keep_ratio) if layer_k is not None else 1.0,
                "prefill_seconds": prefill,
                "dense_prefill_at_pruned_length": dense_prefill,
                "decode_seconds_per_token": decode,
                "prefill_flops": cost.prefill_flops(shape, prompt, layer_k, pruned_len),
                "decode_flops_per_token": cost.decode_flops(
                    shape, prompt, DECODE_STEPS + 1, layer_k, pruned_len
                )
                / DECODE_STEPS,
            }
        )
    base = rows[0]
    for row in rows:
        k = layers if row["layer_k"] is None else row["layer_k"]
        achievable = (
            k * base["prefill_seconds"] + (layers - k) * row["dense_prefill_at_pruned_length"]
        ) / layers
        row["prefill_speedup"] = base["prefill_seconds"] / row["prefill_seconds"]
        row["prefill_ideal_speedup"] = base["prefill_flops"] / row["prefill_flops"]
        row["prefill_fraction_of_ideal"] = row["prefill_speedup"] / row["prefill_ideal_speedup"]
        row["prefill_achievable_speedup"] = base["prefill_seconds"] / achievable
        row["decode_speedup"] = base["decode_seconds_per_token"] / row["decode_seconds_per_token"]
        row["decode_ideal_speedup"] = base["decode_flops_per_token"] / row["decode_flops_per_token"]
    return rows


# -- 3 and 4. end to end and memory ------------------------------------------------------------
def bench_end_to_end(
    guide: LoadedVLM, large: LoadedVLM, n_visual: int, new_tokens: int, rounds: int
) -> list[dict]:
    image = Image.new("RGB", IMAGES[n_visual], (90, 140, 200))
    sample = Sample("bench", 0, Prompt(QUESTION, [image]))
    gen = GenerationSettings(max_new_tokens=new_tokens)
    configs: dict[str, tuple[SGLPipeline, str]] = {
        "large_only": (SGLPipeline(large, None, SGLSettings(method="large_only")), "sdpa")
    }
    skipped = []
    for preset in sorted(PAPER_PRESETS, reverse=True):
        prune_layer, keep_ratio = PAPER_PRESETS[preset]
        # the exit score is computed (its consistency pass timed and counted) so that exit rates
        # can be composed; the no-exit row leaves it out, as a run without a threshold skips it
        settings = SGLSettings(prune_layer=prune_layer, keep_ratio=keep_ratio, record_exit_score=True)
        configs[f"sgl/{preset}"] = (SGLPipeline(large, guide, settings), "sdpa")
        if cost.prune_layer_index(large.num_layers, prune_layer) < 1:
            skipped.append(
                {
                    "method": "fastv",
                    "preset": preset,
                    "n_visual": n_visual,
                    "skipped": "K = 0: FastV needs K >= 1",
                }
            )
            continue
        settings = SGLSettings(method="fastv", prune_layer=prune_layer, keep_ratio=keep_ratio)
        configs[f"fastv/{preset}"] = (SGLPipeline(large, None, settings), ATTENTION_NAME)

    def run(pipeline: SGLPipeline, attention: str):
        set_text_attention(large, attention)
        synchronize()
        start = time.perf_counter()
        record = pipeline.generate([sample], gen)[0]
        synchronize()
        return time.perf_counter() - start, record

    measured = interleaved({name: (lambda p=p, a=a: run(p, a)) for name, (p, a) in configs.items()}, rounds)
    rows = []
    for name, (pipeline, attention) in configs.items():
        method, _, preset = name.partition("/")
        record = measured[name][-1][1]
        pass_flops = record.extra.get("consistency_flops", 0.0)
        runs = [(t, r, r.extra.get("consistency_seconds", 0.0)) for t, r in measured[name]]
        set_text_attention(large, attention)
        activations = peak_tensor_memory(
            lambda pipeline=pipeline: pipeline.generate([sample], gen), large.device
        )
        weights = weight_bytes(large.model, guide.model if pipeline.guide is not None else None)
        rows.append(
            {
                "method": method,
                "preset": float(preset) if preset else None,
                "n_visual": n_visual,
                # without the consistency pass (no exit); an exit rate adds the consistency_* back
                "seconds": statistics.median(t - c for t, _, c in runs),
                "guide_seconds": statistics.median(r.guide_seconds - c for _, r, c in runs),
                "large_seconds": statistics.median(r.large_seconds for _, r, _ in runs),
                "consistency_seconds": statistics.median(c for _, _, c in runs),
                "flops": record.flops - pass_flops,
                "guide_flops": record.extra.get("guide_flops", 0.0) - pass_flops,
                "consistency_flops": pass_flops,
                "flops_large_alone": record.flops_large_alone,
                "token_ratio": record.token_ratio,
                "prompt_text_tokens": record.input_tokens - record.total_visual,
                "weights_mb": weights / 2**20,
                "activation_peak_mb": activations / 2**20,
                "footprint_mb": (weights + activations) / 2**20,
            }
        )
    set_text_attention(large, "sdpa")
    return rows + skipped


@dataclass
class Plan:
    specs_name: str
    visual_counts: tuple[int, ...]
    new_tokens: int
    rounds: int


def run_all(plan: Plan, setup: Setup | None = None) -> dict:
    specs = SMOKE if plan.specs_name == "smoke" else FULL
    specs = setup.specs(specs) if setup is not None else specs
    torch.set_num_threads(2)
    guide, large = load_pair(specs, setup)
    results: dict = {
        "machine": machine(),
        **({"setup": setup.as_dict()} if setup is not None else {}),
        "plan": plan.__dict__,
        "recording": {},
        "pruning": {},
        "end_to_end": [],
    }
    settings = [(0.0, 1.0), *sorted(PAPER_PRESETS.values(), reverse=True), (0.0, 0.2), (0.5, 0.2)]
    for n in plan.visual_counts:
        results["recording"][n] = bench_recording(guide, n, plan.new_tokens, plan.rounds)
        results["pruning"][n] = bench_pruning(large, n, settings, plan.rounds)
        results["end_to_end"] += bench_end_to_end(guide, large, n, plan.new_tokens, plan.rounds)
    from lmms_sgl.benchmarks.drafting import bench_drafting

    tokens, rounds = (32, 1) if plan.specs_name == "smoke" else (256, 3)
    results["drafting"] = bench_drafting(specs, tokens, rounds, setup=setup)
    results["guide_to_large_flops"] = {
        n: cost.generation_flops(text_shape(specs["guide"]), n + 20, plan.new_tokens)
        / cost.generation_flops(text_shape(specs["large"]), n + 20, plan.new_tokens)
        for n in plan.visual_counts
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.md"))
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round (seconds)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the report from the saved JSON next to --out (every section; no measuring)",
    )
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    from lmms_sgl.benchmarks.report import write_report

    if args.render:
        raw = args.out.with_suffix(".json")
        if not raw.exists():
            parser.error(f"--render: {raw} is missing; measure first (lmms-sgl-benchmark --out {args.out})")
        results = json.loads(raw.read_text())
        write_report(results, args.out, results.get("command") or f"lmms-sgl-benchmark --out {args.out}")
        print(args.out)
        return
    setup = setup_from(parser, args)
    torch.set_num_threads(2)
    plan = Plan("smoke", (256,), 4, 1) if args.smoke else Plan("full", (256, 1792), 10, 5)
    results = run_all(plan, setup)
    options = " ".join(part for part in ("--smoke" if args.smoke else "", setup.arguments()) if part)
    results["command"] = "lmms-sgl-benchmark" + (f" {options}" if options else "") + f" --out {args.out}"
    write_report(results, args.out, results["command"])
    print(args.out)


if __name__ == "__main__":
    main()
