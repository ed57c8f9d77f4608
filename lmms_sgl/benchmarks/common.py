"""What every benchmark shares: the scaled-down InternVL 2B/26B-shaped pair, the image and question,
and the measuring rules (interleaved rounds after a warm-up, medians, the machine's description).

Shared by :mod:`.run` and :mod:`.resolution` so that their figures compare like with like.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import psutil
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from lmms_sgl.factory.build import build_model
from lmms_sgl.factory.specs import ModelSpec, TextSpec, VisionSpec
from lmms_sgl.families import InternVLFamily, LoadedVLM, Prompt
from lmms_sgl.method import cost
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


# -- where, in what precision, on which models (every benchmark's --device / --dtype / --real-dims) --
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")
# the real pair the benchmark pairs stand for; --real-dims builds random-weight models of its dimensions
REAL_PAIR = {"guide": "InternVL2-2B", "large": "InternVL2-26B"}


@dataclass(frozen=True)
class Setup:
    """Where a benchmark runs and on which models (``real_specs``: ``--real-dims``, else ``None``)."""

    device: torch.device
    dtype: torch.dtype
    real_specs: dict[str, ModelSpec] | None = None
    scale: float = 1.0
    max_layers: int | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def specs(self, default: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        return self.real_specs or default

    def arguments(self) -> str:
        """The command-line options that reproduce this setup (empty for the default)."""
        parts = []
        if self.device.type != "cpu":
            parts.append(f"--device {self.device}")
        if self.dtype != torch.float32:
            parts.append(f"--dtype {self.dtype_name}")
        if self.real_specs:
            parts.append("--real-dims")
            parts += [f"--scale {self.scale:g}"] if self.scale != 1.0 else []
            parts += [f"--max-layers {self.max_layers}"] if self.max_layers is not None else []
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": device_name(self.device),
            "dtype": self.dtype_name,
            "real_dims": self.real_specs is not None,
            "scale": self.scale,
            "max_layers": self.max_layers,
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type.upper()


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device and models")
    group.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default cpu)")
    group.add_argument(
        "--dtype", default="float32", help=f"weights and activations: {', '.join(DTYPES)} (default float32)"
    )
    group.add_argument(
        "--real-dims",
        action="store_true",
        help=f"random-weight models with the dimensions of {REAL_PAIR['guide']} -> {REAL_PAIR['large']} "
        "(bundled configs) instead of the scaled-down pair; attention is SDPA as in every row",
    )
    group.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="with --real-dims: heads and MLP widths times this factor, head size kept, in (0, 1] "
        "(smoke runs)",
    )
    group.add_argument(
        "--max-layers",
        type=int,
        help="with --real-dims: at most this many layers per model part (smoke runs)",
    )


def setup_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Setup:
    """The validated setup of a benchmark's arguments (``parser.error`` names argument, value and
    what is allowed; the real pair's weights are checked against the device's free memory)."""
    device = check_device(parser, args.device)
    if args.dtype not in DTYPES:
        parser.error(f"--dtype={args.dtype!r}: allowed: {', '.join(DTYPES)}")
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        parser.error(
            "--dtype=float16 on --device=cpu: CPU half-precision kernels are partial and slow, so the "
            "timings would measure fallbacks; allowed on cpu: float32, bfloat16"
        )
    if not args.real_dims:
        for name in ("scale", "max_layers"):
            default = 1.0 if name == "scale" else None
            if getattr(args, name) != default:
                option = "--" + name.replace("_", "-")
                parser.error(
                    f"{option}={getattr(args, name)} shrinks the --real-dims models: give --real-dims"
                )
        return Setup(device, dtype)
    if not 0.0 < args.scale <= 1.0:
        parser.error(f"--scale={args.scale}: allowed: a factor in (0, 1]")
    if args.max_layers is not None and args.max_layers < 1:
        parser.error(f"--max-layers={args.max_layers}: allowed: an integer >= 1")
    specs = real_dims_specs(args.scale, args.max_layers)
    needed, free = sum(weight_bytes_of(spec, dtype) for spec in specs.values()), free_memory(device)
    if free is not None and needed * 1.2 > free:
        parser.error(
            f"--real-dims: the pair's weights need {needed / 2**30:.1f} GiB in {args.dtype} (plus "
            f"activations) and --device={args.device} has {free / 2**30:.1f} GiB free; allowed: a device "
            "with more memory, or --scale / --max-layers to shrink the models"
        )
    return Setup(device, dtype, specs, args.scale, args.max_layers)


def check_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device={text!r} is not a torch device; allowed: {', '.join(DEVICE_TYPES)} (cuda:N)")
    if device.type not in DEVICE_TYPES:
        parser.error(f"--device={text!r}: allowed device types: {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                f"--device={text!r}: this machine has no CUDA device (torch {torch.__version__}); "
                "allowed: cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(
                f"--device={text!r}: allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1} on this machine"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device={text!r}: MPS is not available on this machine; allowed: cpu")
    return device


def _scaled_heads(heads: int, kv_heads: int, scale: float) -> tuple[int, int]:
    """Head counts times ``scale`` (at least 1), the key/value heads dividing the query heads."""
    scaled = max(1, round(heads * scale))
    kv = max(1, min(scaled, round(kv_heads * scale)))
    while scaled % kv:
        kv -= 1
    return scaled, kv


def real_dims_specs(scale: float = 1.0, max_layers: int | None = None) -> dict[str, ModelSpec]:
    """Factory specs with the real pair's dimensions (the bundled ``config.json`` files): widths times
    ``scale`` with the head size kept, layer counts at most ``max_layers``. The vocabulary stays the
    factory tokenizer's (the LM head is one position per step, far below 0.1 % of a request)."""
    from lmms_sgl.costs.sources import read_checkpoint

    def layers(count: int) -> int:
        return count if max_layers is None else min(count, max_layers)

    specs = {}
    for seed, (role, name) in enumerate(REAL_PAIR.items(), start=61):
        config = read_checkpoint(name, "--real-dims").config
        text, vision = config.text_config, config.vision_config
        heads, kv = _scaled_heads(text.num_attention_heads, text.num_key_value_heads, scale)
        head = text.hidden_size // text.num_attention_heads
        vision_heads, _ = _scaled_heads(vision.num_attention_heads, vision.num_attention_heads, scale)
        vision_head = vision.hidden_size // vision.num_attention_heads
        specs[role] = ModelSpec(
            f"real-dims-{name}" + (f"-x{scale:g}" if scale != 1.0 else ""),
            "internvl",
            role,
            TextSpec(
                heads * head,
                layers(text.num_hidden_layers),
                heads,
                kv,
                max(1, round(text.intermediate_size * scale)),
            ),
            VisionSpec(
                vision_heads * vision_head,
                layers(vision.num_hidden_layers),
                vision_heads,
                max(1, round(vision.intermediate_size * scale)),
            ),
            seed=seed,
        )
    return specs


def weight_bytes_of(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of a spec's weights in ``dtype``, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForImageTextToText

    from lmms_sgl.factory.build import build_config, build_tokenizer

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(build_config(spec, build_tokenizer(spec.family)))
    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def synchronize(device: torch.device | None = None) -> None:
    """Wait for queued GPU work, so that wall-clock stamps measure it (no-op on CPU)."""
    if (
        torch.cuda.is_available()
        and torch.cuda.is_initialized()
        and (device is None or device.type == "cuda")
    ):
        torch.cuda.synchronize()


def spec_of(data: dict) -> ModelSpec:
    """A spec saved with ``dataclasses.asdict`` (benchmark results keep the specs they ran)."""
    return ModelSpec(**{**data, "text": TextSpec(**data["text"]), "vision": VisionSpec(**data["vision"])})


def saved_specs(results: dict, default: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    return {role: spec_of(data) for role, data in results["specs"].items()} if "specs" in results else default


def text_shape(spec: ModelSpec) -> cost.TransformerShape:
    """The language-model shape of a factory spec (its tokenizer's 600-entry vocabulary)."""
    t = spec.text
    return cost.TransformerShape(
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.hidden_size // t.num_attention_heads,
        t.intermediate_size,
        True,
        600,
    )


# -- measuring ------------------------------------------------------------------------------
def peak_tensor_memory(fn, device: torch.device | str = "cpu") -> float:
    """Peak bytes of live tensor memory allocated during ``fn()``: the profiler's CPU memory events,
    or on a GPU the allocator's peak above what was allocated before the call."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
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
        synchronize(scores.device)
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
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def generate(model, inputs, new_tokens: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
        )


def prefill_and_decode(model, inputs) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) from one timestamped generate call."""
    clock = StepClock()
    synchronize()
    start = time.perf_counter()
    generate(model, inputs, DECODE_STEPS + 1, logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=False)]
    return clock.stamps[0] - start, statistics.median(steps)


# -- models ---------------------------------------------------------------------------------
def load_pair(specs: dict[str, ModelSpec], setup: Setup | None = None) -> tuple[LoadedVLM, LoadedVLM]:
    """The guide and large model of ``specs`` at 6 tiles, built on the setup's device in its dtype."""
    device, dtype = (setup.device, setup.dtype) if setup is not None else ("cpu", torch.float32)
    family = InternVLFamily(max_tiles=6)
    loaded = []
    for role in ("guide", "large"):
        model, processor = build_model(specs[role], device, dtype)
        model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})
        processor.tokenizer.padding_side = "left"
        loaded.append(LoadedVLM(family, model.eval(), processor, specs[role].name))
    return loaded[0], loaded[1]


def set_text_attention(loaded: LoadedVLM, name: str) -> None:
    loaded.model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})


def at_tiles(loaded: LoadedVLM, tiles: int) -> LoadedVLM:
    """The same model tiling images into at most ``tiles`` tiles (``max_tiles`` / ``guide_max_tiles``)."""
    if tiles == loaded.family.tiles:
        return loaded
    return LoadedVLM(
        InternVLFamily(max_tiles=tiles), loaded.model, loaded.processor, f"{loaded.path} ({tiles} tiles)"
    )


def prompt_text_tokens(n_visual: int = 256) -> int:
    """The benchmark prompt's text tokens (chat template, question, image markers): its request,
    as the real pair's pricing takes it (factory tokenizer; processor only, no model)."""
    from lmms_sgl.factory.build import build_processor

    processor = build_processor(SMOKE["large"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", IMAGES[n_visual], (90, 140, 200))
    ids = processor(images=[image], text=[text], max_patches=6, return_tensors="pt").input_ids[0]
    image_token = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return int((ids != image_token).sum())


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
        synchronize()
        start = time.perf_counter()
        record = pipeline.generate([sample], gen)[0]
        synchronize()
        return time.perf_counter() - start, record

    load_before = os.getloadavg()[0]
    measured = interleaved({name: (lambda p=p: run(p)) for name, p in pipelines.items()}, rounds)
    return measured, (load_before, os.getloadavg()[0])
