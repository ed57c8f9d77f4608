"""What every benchmark shares: the scaled-down InternVL 2B/26B-shaped pair, the image and question,
and the measuring rules (interleaved rounds after a warm-up, medians, the machine's description).

Shared by :mod:`.run` and :mod:`.resolution` so that their figures compare like with like.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import psutil
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from lmms_sgl.factory.build import build_model
from lmms_sgl.factory.specs import ModelSpec, TextSpec, VisionSpec
from lmms_sgl.families import InternVLFamily, LoadedVLM, Prompt
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.pipeline import GenerationSettings, Sample, SampleRecord, SGLPipeline

# InternVL2-2B's LM is 24 x 2048 and 26B's 48 x 6144 (about 1/12 the FLOPs per token). These keep
# that ratio (about 1/10) at a size a 2-core CPU runs in seconds; the large model has 24 layers so
# that the paper's presets give its K at 9 % (K = 1) and close values at 35 % and 64 %.
FULL = {
    "guide": ModelSpec(
        "bench-guide", "internvl", "guide", TextSpec(320, 8, 5, 1, 896), VisionSpec(128, 2, 4, 512), seed=31
    ),
    "large": ModelSpec(
        "bench-large",
        "internvl",
        "large",
        TextSpec(640, 24, 10, 2, 1792),
        VisionSpec(256, 4, 4, 1024),
        seed=32,
    ),
}
SMOKE = {
    "guide": ModelSpec(
        "smoke-guide", "internvl", "guide", TextSpec(64, 2, 4, 2, 128), VisionSpec(32, 1, 2, 64), seed=41
    ),
    "large": ModelSpec(
        "smoke-large", "internvl", "large", TextSpec(128, 8, 8, 2, 256), VisionSpec(64, 2, 4, 128), seed=42
    ),
}
IMAGES = {256: (448, 448), 1792: (1344, 896)}  # 1 tile; 6 tiles + thumbnail with max_tiles=6
QUESTION = "What color is the small circle next to the large square? Answer with a single word."
DECODE_STEPS = 16


# -- measuring ------------------------------------------------------------------------------
def peak_tensor_memory(fn) -> float:
    """Peak bytes of live CPU tensor memory allocated during ``fn()`` (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return float(peak)


def weight_bytes(*models) -> float:
    return float(sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters()))


class StepClock(LogitsProcessor):
    """Timestamps every generation step of one ``generate`` call."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def interleaved(functions: dict, rounds: int) -> dict[str, list]:
    """Each function once per round, round-robin, after a warm-up round; results per function."""
    for fn in functions.values():
        fn()
    results: dict[str, list] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            results[name].append(fn())
    return results


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generate(model, inputs, new_tokens: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
        )


def prefill_and_decode(model, inputs) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) from one timestamped generate call."""
    clock = StepClock()
    start = time.perf_counter()
    generate(model, inputs, DECODE_STEPS + 1, logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=False)]
    return clock.stamps[0] - start, statistics.median(steps)


# -- models ---------------------------------------------------------------------------------
def load_pair(specs: dict[str, ModelSpec]) -> tuple[LoadedVLM, LoadedVLM]:
    family = InternVLFamily(max_tiles=6)
    loaded = []
    for role in ("guide", "large"):
        model, processor = build_model(specs[role])
        model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})
        processor.tokenizer.padding_side = "left"
        loaded.append(LoadedVLM(family, model.eval(), processor, specs[role].name))
    return loaded[0], loaded[1]


def set_text_attention(loaded: LoadedVLM, name: str) -> None:
    loaded.model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})


def inputs_for(loaded: LoadedVLM, n_visual: int) -> dict:
    image = Image.new("RGB", IMAGES[n_visual], (90, 140, 200))
    inputs = loaded.family.build_batch(loaded, [Prompt(QUESTION, [image])])
    assert int((inputs["input_ids"] == loaded.image_token_id).sum()) == n_visual
    return inputs


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def timed_generations(
    pipelines: dict[str, SGLPipeline], sample: Sample, gen: GenerationSettings, rounds: int
) -> tuple[dict[str, list[tuple[float, SampleRecord]]], tuple[float, float]]:
    """Each pipeline answers ``sample`` once per round, interleaved after a warm-up round:
    ``(seconds, record)`` per run, and the load average before and after (a loaded machine's
    ratios say little, so the reports print it)."""

    def run(pipeline: SGLPipeline) -> tuple[float, SampleRecord]:
        start = time.perf_counter()
        record = pipeline.generate([sample], gen)[0]
        return time.perf_counter() - start, record

    load_before = os.getloadavg()[0]
    measured = interleaved({name: (lambda p=p: run(p)) for name, p in pipelines.items()}, rounds)
    return measured, (load_before, os.getloadavg()[0])
