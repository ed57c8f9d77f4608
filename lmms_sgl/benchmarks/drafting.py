"""Decode-bound row: speculative decoding (``draft=guide``) against plain decoding.

The benchmark pair's large model answers 256 scripted tokens; its guide agrees with each next token
with probability 0, 0.5 or 0.9 (``lmms_sgl.factory.scripted_pairs``; weights are scripted, compute
is the full models'). ``method=large_only`` with and without ``draft=guide``, interleaved: large-model
forwards per answer token, the drafting policy's rounds and pauses, the large step's seconds (its
decode or verification forwards and the guide's drafting, on demand) and the whole sample's (plus
the guide's prefill), and whether the answers are identical. Ratios are medians of the per-round
ratios (plain and drafted run back to back in each round, so load drifts cancel).
``python -m lmms_sgl.benchmarks.drafting`` runs this row alone and merges it into an existing report.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from loguru import logger
from PIL import Image

from lmms_sgl.benchmarks.common import (
    FULL,
    IMAGES,
    QUESTION,
    SMOKE,
    Setup,
    add_setup_arguments,
    interleaved,
    load_pair,
    setup_from,
    synchronize,
)
from lmms_sgl.benchmarks.report import drafting_section
from lmms_sgl.factory.scripted_pairs import script_pair
from lmms_sgl.families import Prompt
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline

AGREEMENTS = (0.0, 0.5, 0.9)


def bench_drafting(
    specs: dict,
    new_tokens: int,
    rounds: int,
    draft_tokens: int = 4,
    agreements: tuple[float, ...] = AGREEMENTS,
    setup: Setup | None = None,
) -> list[dict]:
    rows = []
    sample = Sample("bench", 0, Prompt(QUESTION, [Image.new("RGB", IMAGES[256], (90, 140, 200))]))
    gen = GenerationSettings(max_new_tokens=new_tokens + 1)  # the scripted answer: new_tokens + EOS
    for agreement in agreements:
        draws = random.Random(int(agreement * 100))
        pattern = [draws.random() < agreement for _ in range(new_tokens + 1)]
        guide, large = load_pair(specs, setup)
        script_pair(
            (guide.model, guide.processor), (large.model, large.processor), new_tokens, pattern.__getitem__
        )
        pipelines = {
            "plain": SGLPipeline(large, None, SGLSettings(method="large_only")),
            "drafted": SGLPipeline(
                large, guide, SGLSettings(method="large_only", draft="guide", draft_tokens=draft_tokens)
            ),
        }

        def run(pipeline: SGLPipeline):
            synchronize()
            start = time.perf_counter()
            record = pipeline.generate([sample], gen)[0]
            synchronize()
            return time.perf_counter() - start, record

        measured = interleaved({name: (lambda p=p: run(p)) for name, p in pipelines.items()}, rounds)
        plain, drafted = (measured[name] for name in ("plain", "drafted"))
        record = drafted[-1][1]
        stats = record.extra["drafting"]
        pairs = list(zip(plain, drafted, strict=True))  # (seconds, record) of each round, plain first
        large_ratio = statistics.median(b.large_seconds / a.large_seconds for (_, a), (_, b) in pairs)
        total_ratio = statistics.median(b / a for (a, _), (b, _) in pairs)
        rows.append(
            {
                "rounds": rounds,
                "agreement": agreement,
                "new_tokens": record.output_tokens,
                "draft_tokens": draft_tokens,
                "acceptance_rate": stats["accepted"] / max(stats["drafted"], 1),
                "large_forwards_per_token_plain": 1.0,
                "large_forwards_per_token_drafted": stats["large_forwards"] / record.output_tokens,
                # the guide's drafting forwards inside the large step (after its own answer)
                "guide_forwards_per_token": stats["guide_forwards"] / record.output_tokens,
                "draft_rounds": stats["rounds"],
                "pauses": stats["pauses"],
                "paused_steps": stats["paused_steps"],
                "large_seconds_plain": statistics.median(r.large_seconds for _, r in plain),
                "large_seconds_drafted": statistics.median(r.large_seconds for _, r in drafted),
                "large_ratio": large_ratio,
                "seconds_plain": statistics.median(t for t, _ in plain),
                "seconds_drafted": statistics.median(t for t, _ in drafted),
                "total_ratio": total_ratio,
                "guide_prefill_seconds": statistics.median(r.guide_seconds for _, r in drafted),
                "identical_answers": all(
                    d.answer == p.answer and d.output_tokens == p.output_tokens
                    for (_, d), (_, p) in zip(drafted, plain, strict=True)
                ),
                "flops_ratio": record.flops / record.flops_large_alone,
            }
        )
        logger.info(f"drafting benchmark row: {rows[-1]}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.md"))
    parser.add_argument("--smoke", action="store_true", help="tiny models, 32 tokens, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 on a machine shared with other jobs: two threads on a busy core stall "
        "at every forward, which penalises whichever side makes more forwards)",
    )
    parser.add_argument(
        "--agreements",
        type=float,
        nargs="+",
        default=list(AGREEMENTS),
        help="rows to measure (others already in the report are kept)",
    )
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    if any(not 0 <= a <= 1 for a in args.agreements):
        parser.error(f"--agreements {args.agreements}: each must lie in [0, 1]")
    setup = setup_from(parser, args)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    specs, tokens, rounds = (SMOKE, 32, 1) if args.smoke else (FULL, 256, args.rounds)
    specs = setup.specs(specs)
    raw = args.out.with_suffix(".json")
    results = json.loads(raw.read_text()) if raw.exists() else None
    if results is None:
        raise SystemExit(f"{raw} is missing: run lmms-sgl-benchmark first, then this row")
    rows = [
        {**row, "threads": args.threads}
        for row in bench_drafting(specs, tokens, rounds, agreements=tuple(args.agreements), setup=setup)
    ]
    kept = {row["agreement"]: row for row in results.get("drafting", [])}  # rows measured earlier
    kept.update({row["agreement"]: row for row in rows})
    rows = [kept[a] for a in sorted(kept)]
    results["drafting"] = rows
    command = (
        "python -m lmms_sgl.benchmarks.drafting"
        + (" --smoke" if args.smoke else f" --rounds {args.rounds}")
        + (f" {setup.arguments()}" if setup.arguments() else "")
        + ("" if args.threads == 2 else f" --threads {args.threads}")
        + f" --agreements {' '.join(f'{a:g}' for a in args.agreements)} --out {args.out}"
    )
    results["drafting_command"] = command
    from lmms_sgl.benchmarks.report import write_report

    write_report(results, args.out, results.get("command") or f"lmms-sgl-benchmark --out {args.out}")
    print("\n".join(drafting_section(rows, command)))


if __name__ == "__main__":
    main()
