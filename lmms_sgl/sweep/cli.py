"""``lmms-sgl-sweep``: methods x ratios x exit thresholds on any lmms-eval task, resumable, with the frontier.

    lmms-sgl-sweep --model sgl_internvl2 --model_args pretrained=LARGE,guide=GUIDE --tasks gqa \\
        --grid paper --output_path sweeps/gqa [--limit N] [--batch_size B] [--include_path DIR] \\
        [--metric M] [--price-at internvl|llava] [--wandb_args project=...]

Errors in the arguments or the grid print one line naming the point and what is allowed, exit with
status 2 and load no model.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from loguru import logger

from lmms_sgl.sweep import SweepError
from lmms_sgl.sweep.grid import NAMED

PRICED = ("internvl", "llava")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmms-sgl-sweep",
        description="Evaluate a grid of methods, ratios and exit thresholds with lmms-eval (one stock "
        "evaluation per point, cached, resumable) and write the report, JSON and plots.",
    )
    p.add_argument("--model", required=True, help="sgl_internvl2, sgl_llava or sgl_qwen2_vl")
    p.add_argument(
        "--model_args",
        required=True,
        help="the pair and shared arguments, as for lmms-eval (pretrained=...,guide=...); the grid sets "
        "method, token_ratio / prune_layer / keep_ratio, selection and exit_threshold",
    )
    p.add_argument("--tasks", required=True, help="lmms-eval tasks, comma-separated")
    p.add_argument(
        "--include_path", action="append", default=[], help="folder of extra task YAMLs (repeatable)"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents per task")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument(
        "--output_path",
        type=Path,
        required=True,
        help="where the points (lmms-eval's own output, the cache), sweep.md, sweep.json and plots go",
    )
    p.add_argument("--metric", default=None, help="the metric to report (default: each task's first)")
    p.add_argument(
        "--grid",
        default="paper",
        help=f"a named grid ({', '.join(NAMED)}) or a YAML file (see docs/sweep.md); default: paper",
    )
    p.add_argument(
        "--bootstrap_iters",
        type=int,
        default=0,
        help="lmms-eval's bootstrap for standard errors (default 0: the closed form of mean metrics)",
    )
    p.add_argument(
        "--force_simple",
        action="store_true",
        help="as lmms-eval's: the simple model interface (multiple-choice tasks need it)",
    )
    p.add_argument(
        "--use_cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="as lmms-eval's --use_cache, one response cache per point under DIR: a point interrupted "
        "midway resumes at its first unanswered batch",
    )
    p.add_argument(
        "--price-at",
        choices=PRICED,
        default=None,
        help="add each point's FLOPs priced at a real pair (InternVL2-2B→26B or LLaVA-OV 0.5B→72B)",
    )
    p.add_argument(
        "--wandb_args", default=None, help="log the summary tables to one W&B run (lmms-eval's format)"
    )
    return p


def command_text(argv: list[str]) -> str:
    return "lmms-sgl-sweep " + " ".join(shlex.quote(a) for a in argv)


def sweep(args: argparse.Namespace, argv: list[str]) -> Path | None:
    from lmms_sgl.lmms.output_check import check_output_path
    from lmms_sgl.sweep import grid as grids
    from lmms_sgl.sweep import report
    from lmms_sgl.sweep.run import Settings, check_tasks, is_main_process, run_sweep, start_processes

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SweepError("--tasks: give at least one lmms-eval task")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise SweepError(f"--include_path {path}: not a folder")
    if args.limit is not None and args.limit < 1:
        raise SweepError(f"--limit {args.limit}: must be >= 1")
    if args.batch_size < 1:
        raise SweepError(f"--batch_size {args.batch_size}: must be >= 1")
    settings = Settings(
        model=args.model,
        model_args=args.model_args,
        tasks=tasks,
        include_paths=[str(Path(p).resolve()) for p in args.include_path],
        limit=args.limit,
        batch_size=args.batch_size,
        output_path=args.output_path,
        bootstrap_iters=args.bootstrap_iters,
        force_simple=args.force_simple,
        use_cache=args.use_cache,
    )
    grid = grids.build(args.grid, args.model, args.model_args, args.batch_size)  # before any model loads
    check_tasks(settings)
    try:  # an unwritable --output_path fails now, not after the first evaluation
        check_output_path(["--output_path", str(args.output_path)])
    except ValueError as error:
        raise SweepError(str(error)) from None
    for label, why in grid.skipped:
        logger.warning(f"grid point {label} skipped: {why}")
    logger.info(f"sweep: {len(grid.points)} points x {len(tasks)} task(s) in {args.output_path}")
    start_processes()  # under accelerate launch: the process group, as lmms-eval's CLI joins it
    rows, notes, _ = run_sweep(settings, grid, args.metric)
    if not is_main_process():  # rank 0 writes the report
        return None
    header = {
        "command": command_text(argv),
        "grid": grid.name,
        "tasks": tasks,
        "model": args.model,
        "model_args": args.model_args,
        "limit": args.limit,
        "skipped": grid.skipped,
        "notes": notes,
        "points": [asdict(p) for p in grid.points],
    }
    path, data = report.finish(rows, args.output_path, header, args.price_at)
    if args.wandb_args:
        report.log_wandb(args.wandb_args, data, args.output_path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    import lmms_eval.models  # noqa: F401 -- replaces loguru's handlers when imported: before ours

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "INFO"))
    try:
        path = sweep(args, argv)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
