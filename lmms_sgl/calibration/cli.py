"""``lmms-sgl-calibrate``: the exit threshold for a task and a budget, from one no-exit SGL run.

    lmms-sgl-calibrate OUTPUT_DIR [--task T ...] [--include-path DIR ...]
        [--target-exit-rate R | --max-drop P | --flops-budget F] [--json out.json] [--plot out.png]
    lmms-sgl-calibrate OTHER_RUN_DIR --apply out.json [--json applied.json]

Errors (bad input, an unreachable target, a judge that is not configured) print one line naming the
argument and what is allowed, exit with status 2 and write nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loguru import logger

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.calibration.apply import chosen_for, read_calibration, realised_from_run
from lmms_sgl.calibration.calibrate import TaskCalibration, calibrate_task, pick_metric, replay_samples
from lmms_sgl.calibration.replay import Target, replay
from lmms_sgl.calibration.report import (
    accuracy_text,
    json_writer,
    payload,
    plot_writer,
    task_text,
    threshold_text,
    write_all,
)
from lmms_sgl.calibration.runs import Run, load_run
from lmms_sgl.calibration.scoring import build_scorer, check_judge, judged_by_llm, task_manager


def _fraction(value: str, name: str, low: float, high: float | None) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} {value!r}: not a number") from None
    if not low <= number or (high is not None and number > high):
        allowed = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise argparse.ArgumentTypeError(f"{name} {value}: must be {allowed}")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmms-sgl-calibrate",
        description="Choose SGL's exit_threshold per task from one lmms-eval run made with --log_samples, "
        "no exit and record_exit_score=true: every threshold is replayed from the logged guide answers, "
        "exit scores and costs.",
    )
    p.add_argument("output_dir", type=Path, help="lmms-eval --output_path of the run (or its *_results.json)")
    p.add_argument("--task", action="append", help="calibrate only this task (repeatable); default: all")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="folder of local task YAMLs, as lmms-eval's --include_path (repeatable; the run's own is added)",
    )
    p.add_argument("--metric", help="the task metric to calibrate on (default: the task's first metric)")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-exit-rate",
        type=lambda v: _fraction(v, "--target-exit-rate", 0.0, 1.0),
        metavar="R",
        help="share of samples the guide should answer, in [0, 1]",
    )
    target.add_argument(
        "--max-drop",
        type=lambda v: _fraction(v, "--max-drop", 0.0, None),
        metavar="P",
        help="most metric points lost against no exit (percent points for 0-1 metrics)",
    )
    target.add_argument(
        "--flops-budget",
        type=lambda v: _fraction(v, "--flops-budget", 0.0, None),
        metavar="F",
        help="FLOPs as a fraction of the large model alone, e.g. 0.5",
    )
    p.add_argument("--json", type=Path, help="write every number (and the recommendation) here")
    p.add_argument("--plot", type=Path, help="PNG: accuracy vs large-model calls and vs FLOPs")
    p.add_argument("--apply", type=Path, metavar="CALIBRATION_JSON", help="check a calibration on this run")
    p.add_argument("--source-task", help="with --apply: which calibrated task's threshold to apply")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where LLM-judge scores of guide answers are cached (default: sgl_calibration_cache/ next "
        "to the run's results)",
    )
    return p


def _target(args: argparse.Namespace) -> Target | None:
    if args.target_exit_rate is None and args.max_drop is None and args.flops_budget is None:
        return None
    return Target(args.target_exit_rate, args.max_drop, args.flops_budget)


def include_paths(run: Run, extra: list[str]) -> list[str]:
    """The user's folders, then the run's own ``--include_path`` when it exists from here."""
    paths = []
    for path in extra:
        if not Path(path).is_dir():
            raise CalibrationError(f"--include-path {path}: not a folder")
        paths.append(str(Path(path).resolve()))
    logged = run.cli_args.get("include_path")
    for path in [logged] if isinstance(logged, str) else logged or []:
        if path and Path(path).is_dir() and str(Path(path).resolve()) not in paths:
            paths.append(str(Path(path).resolve()))
    return paths


def checked_manager(run: Run, paths: list[str]):
    """lmms-eval's task index, after checking (before any scoring) that every task is known and
    that judged tasks have a judge."""
    manager = task_manager(paths, list(run.tasks), run.model or None)
    for name in run.tasks:
        if judged_by_llm(name, manager):
            check_judge(name)
    return manager


def calibrate(args: argparse.Namespace) -> list[TaskCalibration]:
    run = load_run(args.output_dir, args.task)
    manager = checked_manager(run, include_paths(run, args.include_path))
    cache_dir = args.cache_dir or run.results_path.parent / "sgl_calibration_cache"
    target = _target(args)
    results = []
    for name, log in run.tasks.items():
        scorer = build_scorer(name, run, manager)
        with _quiet_lmms_eval():
            results.append(calibrate_task(scorer, log, args.metric, target, cache_dir))
    for result in results:
        print(task_text(result, run) + "\n")
    for name, why in run.skipped.items():
        print(f"{name}: skipped ({why})")
    outputs = []
    if args.json:
        outputs.append((args.json, json_writer(payload(run, results))))
    if args.plot:
        outputs.append((args.plot, plot_writer(results)))
    write_all(outputs)
    for path, _ in outputs:
        logger.info(f"wrote {path}")
    return results


def apply(args: argparse.Namespace) -> dict:
    """Predicted (calibration run) versus realised (this run) exit rate, calls, accuracy, FLOPs."""
    chosen = read_calibration(args.apply)
    run = load_run(args.output_dir, args.task)
    comparisons = {}
    # A run without exits gets the threshold replayed; a run with exits is compared as it is.
    replay_needed = run.exit_threshold is None and not any(log.exited for log in run.tasks.values())
    manager = checked_manager(run, include_paths(run, args.include_path)) if replay_needed else None
    for name, log in run.tasks.items():
        choice = chosen_for(name, chosen, args.source_task)
        if replay_needed:
            scorer = build_scorer(name, run, manager)
            with _quiet_lmms_eval():
                metric = pick_metric(scorer, log, choice.metric if choice.metric in scorer.metrics else None)
                cache_dir = args.cache_dir or run.results_path.parent / "sgl_calibration_cache"
                samples = replay_samples(scorer, log, metric, cache_dir)
                realised = {
                    **replay(samples, choice.threshold, scorer.aggregate(metric)).as_dict(),
                    "metric": metric,
                    "source": "replayed on this run (it has no exits)",
                }
        else:
            realised = realised_from_run(run, log, choice)
        if realised["metric"] != choice.metric:
            logger.warning(
                f"{name} is scored by {realised['metric']}, the calibration by {choice.metric}: "
                "compare exit rates and FLOPs, not the two metrics"
            )
        comparisons[name] = {
            "calibrated_on": choice.source_task,
            "metric": choice.metric,
            "fraction": choice.fraction,
            "threshold": choice.threshold,
            "predicted": choice.predicted,
            "realised": realised,
        }
    print(apply_text(comparisons))
    if args.json:
        write_all([(args.json, json_writer({"run": str(run.results_path), "tasks": comparisons}))])
        logger.info(f"wrote {args.json}")
    return comparisons


def apply_text(comparisons: dict) -> str:
    lines = []
    for task, c in comparisons.items():
        unit = " %" if c["fraction"] else ""
        lines += [
            f"## exit_threshold={threshold_text(c['threshold'])} from {c['calibrated_on']} applied to {task}",
            "",
            f"| | exit rate % | large-model calls % | {c['metric']}{unit} (realised: "
            f"{c['realised']['metric']}) | FLOPs % of large alone |"
            if c["realised"]["metric"] != c["metric"]
            else f"| | exit rate % | large-model calls % | {c['metric']}{unit} | FLOPs % of large alone |",
            "|---|---|---|---|---|",
        ]
        for label, point in (
            (f"predicted ({c['calibrated_on']})", c["predicted"]),
            (f"realised ({c['realised']['source']})", c["realised"]),
        ):
            flops = "-" if point["flops_ratio"] is None else f"{100 * point['flops_ratio']:.1f}"
            lines.append(
                f"| {label} | {100 * point['exit_rate']:.1f} | {100 * point['large_call_rate']:.1f} | "
                f"{accuracy_text(point['accuracy'], c['fraction'])} | {flops} |"
            )
        lines.append("")
    return "\n".join(lines)


class _quiet_lmms_eval:
    """Silence lmms-eval's own logging while its aggregation runs once per replayed threshold."""

    def __enter__(self):
        logger.disable("lmms_eval")

    def __exit__(self, *exc):
        logger.enable("lmms_eval")


def check_writable(path: Path, option: str) -> None:
    """``path`` can be written: not a folder itself, and its nearest existing folder is writable
    (missing folders in between are created at the end). Checked before any calibration work, so
    an unwritable ``--json`` / ``--plot`` fails at once instead of after the whole replay."""
    if path.is_dir():
        raise CalibrationError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise CalibrationError(f"{option} {path}: the file exists and is not writable")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CalibrationError(f"{option} {path}: {folder} is a file, not a folder; choose a writable folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CalibrationError(
            f"{option} {path}: the folder {folder} is not writable; choose a writable folder"
        )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import lmms_eval.models  # noqa: F401 -- replaces loguru's handlers when imported: before ours

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "INFO"))
    if args.apply is not None and (_target(args) is not None or args.plot is not None):
        print(
            "error: --apply takes its threshold from the calibration JSON and draws no plot; "
            "drop --target-exit-rate / --max-drop / --flops-budget / --plot",
            file=sys.stderr,
        )
        return 2
    try:
        for option, path in (("--json", args.json), ("--plot", args.plot)):
            if path is not None:
                check_writable(path, option)
        apply(args) if args.apply is not None else calibrate(args)
    except CalibrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
