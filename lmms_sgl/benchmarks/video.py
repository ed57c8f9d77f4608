"""Video benchmark on the tiny factory pairs: visual tokens, FLOPs ratio and time ratio of SGL at the
9 % preset (and K = 0 with frame skipping) against the large model alone, on the ``sgl_video`` clips.

Ratios only, measured in one run on one machine (the tiny models say nothing about real-pair
speed; ``lmms-sgl-cost`` gives the real pairs' analytic FLOPs). Writes a Markdown table:

    python -m lmms_sgl.benchmarks.video --out reports/video_benchmark.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmms_sgl.benchmarks.common import Setup, add_setup_arguments, device_name, setup_from, synchronize
from lmms_sgl.factory import build as factory
from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt, QwenVLFamily
from lmms_sgl.families.video import open_video
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline

VIDEOS = Path(__file__).resolve().parents[2] / "tasks" / "sgl_video" / "data" / "videos"
# 32 frames each (lmms-eval's default). InternVL has 256 tokens per frame: 32 frames need more than
# the factory's 8,192 positions, so its benchmark pair is widened to 16,384 (``widen_positions``).
PAIRS = {
    "qwen2.5-vl": (QwenVLFamily, {"min_pixels": 3136, "max_pixels": 12544}, 32),
    "llava-ov-video": (LlavaFamily, {}, 32),
    "internvl": (InternVLFamily, {}, 32),
}
WIDE_POSITIONS = {"internvl": 16384}


def widen_positions(folder: Path, positions: int) -> None:
    """A factory checkpoint with ``positions`` text positions (RoPE has no learned table, so only
    the config's and tokenizer's limits change; the weights are the factory's)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["max_position_embeddings"] = positions
    config_file.write_text(json.dumps(config, indent=2))
    tokenizer_file = folder / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["model_max_length"] = positions
    tokenizer_file.write_text(json.dumps(tokenizer, indent=2))


METHODS = {
    "large only": SGLSettings(method="large_only"),
    "SGL token_ratio=0.09 (paper preset)": SGLSettings.from_token_ratio(0.09),
    "SGL K = 0, keep 9 %, frame skipping": SGLSettings(prune_layer=0.0, keep_ratio=0.09),
}


def run(models: Path, clips: int, setup: Setup | None = None) -> list[str]:
    rows = [
        "| pair | frames | method | visual tokens (kept / all, mean) | frames encoded"
        " | FLOPs ratio | time ratio |"
    ]
    rows.append("|---|---|---|---|---|---|---|")
    gen = GenerationSettings(max_new_tokens=8)
    paths = sorted(VIDEOS.glob("*.mp4"))[:clips]
    for name, (family_class, kwargs, frames) in PAIRS.items():
        family = family_class(**kwargs)
        family.num_frames = frames
        device, dtype = (str(setup.device), setup.dtype) if setup is not None else ("cpu", torch.float32)
        load = {"dtype": dtype, "device_map": device}
        large = family.load(str(models / f"{name}-large"), text_attention="sdpa", **load)
        guide = family.load(str(models / f"{name}-guide"), text_attention=ATTENTION_NAME, **load)
        samples = [
            Sample("v", i, Prompt("Which way does the square move?", [], [open_video(str(p))]))
            for i, p in enumerate(paths)
        ]
        baseline = None
        for label, settings in METHODS.items():
            synchronize()
            start = time.perf_counter()
            records = [SGLPipeline(large, guide, settings).generate([s], gen)[0] for s in samples]
            synchronize()
            seconds = time.perf_counter() - start
            baseline = baseline or seconds
            kept = sum(r.kept_visual for r in records) / len(records)
            total = sum(r.total_visual for r in records) / len(records)
            flops = sum(r.flops for r in records) / sum(r.flops_large_alone for r in records)
            units = [(r.vision_units_encoded, r.vision_units) for r in records if r.vision_units]
            encoded = f"{sum(u[0] for u in units) / len(units):.1f} / {units[0][1]}" if units else "all"
            rows.append(
                f"| {name} | {frames} | {label} | {kept:.0f} / {total:.0f} | {encoded} | {flops:.3f} | "
                f"{seconds / baseline:.2f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/video_benchmark.md"))
    parser.add_argument("--clips", type=int, default=8)
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    if args.real_dims:
        parser.error(
            "--real-dims: the video benchmark runs the factory's Qwen2.5-VL, LLaVA-OneVision and InternVL "
            "pairs; allowed here: --device and --dtype (the image benchmarks take --real-dims)"
        )
    setup = setup_from(parser, args)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        built = factory.build_all(Path(folder), [f"{n}-{r}" for n in PAIRS for r in ("guide", "large")])
        for name, positions in WIDE_POSITIONS.items():
            for role in ("guide", "large"):
                widen_positions(built[f"{name}-{role}"], positions)
        rows = run(Path(folder), args.clips, setup)
    options = f" {setup.arguments()}" if setup.arguments() else ""
    command = (
        f"python -m lmms_sgl.benchmarks.video --clips {args.clips}{options} --out reports/video_benchmark.md"
    )
    text = "\n".join(
        [
            f"# Video benchmark (tiny factory pairs, {setup.dtype_name}, {device_name(setup.device)})",
            "",
            f"`{command}` ({args.clips} `sgl_video` clips, one at a time, 8 new tokens). Ratios against the",
            "large model alone in the same run; the tiny models' time says little about real pairs.",
            "InternVL's pair is the factory's with 16,384 text positions (32 frames x 256 tokens).",
            "",
            *rows,
            "",
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
