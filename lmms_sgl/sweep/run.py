"""Evaluate a sweep's points (cached on disk) and turn each point and task into a row.

Every point is one stock lmms-eval evaluation (``lmms_eval.evaluator.simple_evaluate`` with
``log_samples=True``) written as the CLI writes it (``EvaluationTracker``: ``*_results.json`` and
``*_samples_<task>.jsonl``) under ``<output_path>/points/<label>-<key>/``. The key hashes the point's
full ``--model_args``, the tasks, ``--limit``, the batch size, the lmms-eval / lmms-sgl versions and
the checkpoints' identity (for a local folder: its path and the sizes and modification times of its
config, index and weight files; for a hub id: the cached snapshot's commit). ``point.json`` is written
last, so a point without it was interrupted and is evaluated again; a point with it is never
recomputed.

Exit thresholds are not run: each is replayed from the no-exit SGL point's records and the task's own
scoring of the guide's answers (:mod:`lmms_sgl.calibration`), exactly as a real run at that threshold
counts it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from lmms_sgl.calibration.runs import read_rows, results_file, sample_records
from lmms_sgl.lmms.args import split_model_args
from lmms_sgl.reporting.paired import mean_stderr
from lmms_sgl.reporting.stats import Totals
from lmms_sgl.sweep import SweepError
from lmms_sgl.sweep.grid import SweepPoint, point_model_args

CHECKPOINT_FILES = (".json", ".safetensors", ".bin")


def checkpoint_identity(source: str) -> dict:
    """Cheap identity of a checkpoint (no weights read): a local folder's path and the size and
    mtime of its config, index and weight files; a hub id's cached snapshot (its commit)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_FILES))
        return {
            "path": str(path.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 -- not a hub id either: the name alone
        found = None
    return {"hub": source, "snapshot": Path(found).parent.name if isinstance(found, str) else None}


def point_key(
    model: str, model_args: str, tasks: list[str], limit, batch_size: int, force_simple: bool = False
) -> str:
    entries = split_model_args(model_args)
    values = dict(e.partition("=")[::2] for e in entries)
    identity = {
        "model": model,
        "model_args": sorted(entries),
        "tasks": sorted(tasks),
        "limit": limit,
        "batch_size": batch_size,
        "force_simple": force_simple,
        "versions": [metadata.version("lmms-eval"), metadata.version("lmms-sgl")],
        "checkpoints": [
            checkpoint_identity(values[k].strip()) for k in ("pretrained", "guide") if k in values
        ],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


@dataclass
class Evaluated:
    """A finished point: where lmms-eval wrote it, and its arguments."""

    point: SweepPoint
    model_args: str  # as evaluated (:func:`point_model_args` with ``evaluated=True``)
    folder: Path
    seconds: float
    cached: bool

    @property
    def user_model_args(self) -> str:
        """The ``--model_args`` a user runs this point with (no ``record_exit_score``)."""
        own = split_model_args(point_model_args("", self.point, evaluated=True))
        shared = [e for e in split_model_args(self.model_args) if e not in own]
        return ",".join([*shared, *split_model_args(point_model_args("", self.point))])

    @property
    def results(self) -> dict:
        return json.loads(results_file(self.folder).read_text())

    def samples(self, task: str) -> list[dict]:
        results_path = results_file(self.folder)
        prefix = results_path.name[: -len("_results.json")]
        return read_rows(results_path.parent / f"{prefix}_samples_{task}.jsonl")


@dataclass
class Settings:
    """What every point shares: the command's arguments."""

    model: str
    model_args: str
    tasks: list[str]
    include_paths: list[str]
    limit: int | None
    batch_size: int
    output_path: Path
    bootstrap_iters: int = 0
    force_simple: bool = False  # lmms-eval's --force_simple (multiple choice reaches simple models only)
    use_cache: Path | None = None  # one lmms-eval response cache per point under it (--use_cache)


def evaluate(settings: Settings, model_args: str, folder: Path, cache: Path | None = None) -> dict | None:
    """One lmms-eval evaluation, written as ``lmms-eval --log_samples --output_path folder`` does;
    returns lmms-eval's results with their ``samples`` (``None`` on ranks other than 0). The one
    evaluation engine: the sweep's points and the proving study's (:mod:`lmms_sgl.proving.points`)."""
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    from lmms_sgl.calibration.scoring import task_manager

    tracker = EvaluationTracker(output_path=str(folder))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    results = simple_evaluate(
        model=settings.model,
        model_args=model_args,
        tasks=list(settings.tasks),
        batch_size=settings.batch_size,
        limit=settings.limit,
        log_samples=True,
        bootstrap_iters=settings.bootstrap_iters,
        force_simple=settings.force_simple,
        task_manager=task_manager(settings.include_paths, settings.tasks, settings.model),
        evaluation_tracker=tracker,
        verbosity="WARNING",
        distributed_executor_backend="torchrun" if distributed else "accelerate",  # as the CLI chooses
        use_cache=None if cache is None else str(cache),
    )
    if results is None:  # ranks other than 0
        return None
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=get_datetime_str())
    for task in results["configs"]:  # the tracker pops and rewrites keys: it gets copies
        tracker.save_results_samples(task_name=task, samples=[dict(s) for s in samples[task]])
    return {**results, "samples": samples}


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under ``accelerate launch`` / ``torchrun`` (their
    environment), ``(0, 1)`` otherwise. Every rank evaluates each point together (lmms-eval shards
    the documents); only rank 0 writes a point's files and marker, and the report."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return process_rank()[0] == 0


def start_processes() -> None:
    """Under ``accelerate launch``, join the process group before the first evaluation, as the
    lmms-eval CLI does (its long timeout: a point can take hours), so every point runs lmms-eval's
    ``torchrun`` path; nothing to do in a single process."""
    import torch

    if process_rank()[1] == 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60000))])
    rank, world = process_rank()
    say(f"process {rank} of {world}: evaluating every point together, rank 0 writes")


def wait_for_everyone() -> None:
    """A barrier across the launched processes (none in a single process)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def say(message: str) -> None:
    """Progress on stderr (lmms-eval resets loguru's level to its ``verbosity`` at every evaluation)."""
    print(f"lmms-sgl-sweep: {message}", file=sys.stderr, flush=True)


def run_point(settings: Settings, point: SweepPoint, place: str = "") -> Evaluated:
    """The point's evaluation: from its folder when finished, else evaluated now."""
    model_args = point_model_args(settings.model_args, point, evaluated=True)
    key = point_key(
        settings.model, model_args, settings.tasks, settings.limit, settings.batch_size, settings.force_simple
    )
    folder = settings.output_path / "points" / f"{_slug(point.label)}-{key}"
    marker = folder / "point.json"
    # Every rank reads the same markers: a marker is written only after an evaluation that needs
    # every rank, so all of them take the same branch.
    if marker.exists():
        done = json.loads(marker.read_text())
        if is_main_process():
            say(f"point {place}{point.label}: finished earlier ({folder})")
        return Evaluated(point, model_args, folder, done["seconds"], True)
    main = is_main_process()
    if main:
        if folder.exists():  # interrupted: lmms-eval's partial output is not reused
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        say(f"point {place}{point.label}: --model {settings.model} --model_args {model_args}")
    # the point's response cache lives outside its folder, which an interrupted point loses
    cache = None if settings.use_cache is None else settings.use_cache / folder.name
    start = time.perf_counter()
    evaluate(settings, model_args, folder, cache)
    seconds = time.perf_counter() - start
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    if not main:  # rank 0 writes the results and the marker
        wait_for_everyone()
        return Evaluated(point, model_args, folder, seconds, False)
    payload = {"label": point.label, "point": asdict(point), "model_args": model_args, "seconds": seconds}
    tmp = folder / "point.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(marker)  # last: the point is finished
    wait_for_everyone()  # every rank sees the marker before the next point
    return Evaluated(point, model_args, folder, seconds, False)


# -- rows ------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One point (or one replayed exit threshold) on one task."""

    task: str
    label: str
    method: str
    ratio: str  # "35 %", "K at 0.2, keep 0.2", "" (unpruned)
    selection: str | None
    layout: dict
    exit_threshold: float | None
    replayed: bool
    metric: str
    value: float
    stderr: float | None
    n: int
    token_ratio: float | None
    exit_rate: float | None
    large_call_rate: float | None
    flops_ratio: float | None
    seconds: float | None  # guide + large model seconds on this task, from the records
    model_args: str
    folder: str
    higher_is_better: bool = True
    real_flops_ratio: float | None = None
    on_frontier: bool = False
    on_real_frontier: bool = False
    scores: dict = field(default_factory=dict)  # doc id -> metric value (numeric metrics)
    schedule: dict = field(default_factory=dict)  # {"budget": B, "layer_k": K} of a shared schedule

    def as_dict(self) -> dict:
        return asdict(self)


def metric_key(results: dict, task: str, metric: str | None) -> tuple[str, str]:
    """``(metric, "metric,filter")`` of a task: ``metric`` or the task's first, first filter."""
    scored = results["results"][task]
    names = [k for k in scored if "," in k and "_stderr" not in k.split(",")[0]]
    if not names:
        raise SweepError(f"task {task}: lmms-eval reported no metric")
    available = list(dict.fromkeys(k.split(",")[0] for k in names))
    chosen = metric or available[0]
    for key in names:
        if key.split(",")[0] == chosen:
            return chosen, key
    raise SweepError(f"--metric {metric}: task {task} reports {', '.join(available)}")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def per_doc(rows: list[dict], metric: str) -> dict[str, float]:
    """Doc id -> numeric metric value (first logged filter); empty when the values are not numbers."""
    out: dict[str, float] = {}
    for row in rows:
        doc = str(row["doc_id"])
        if doc in out:
            continue
        value = _number(row.get(metric))
        if value is None:
            return {}
        out[doc] = value
    return out


def without_exit_scoring(logged: list[dict]) -> dict:
    """``flops_ratio`` and ``guide_seconds`` of a task's records without the guide's consistency pass,
    which the sweep runs only to record exit scores (``record_exit_score=true``) and a user's run
    without an exit threshold skips; empty when no record ran it (the run's own figures stand)."""
    records, seen = [], set()
    for row in logged:
        if row["doc_id"] in seen:  # logged once per filter
            continue
        seen.add(row["doc_id"])
        records += [r for r in sample_records(row) if r is not None]
    if not any((r.get("extra") or {}).get("consistency_flops") for r in records):
        return {}
    totals = Totals()
    for record in records:
        extra = record.get("extra") or {}
        totals.add(
            {
                **record,
                "flops": record["flops"] - (extra.get("consistency_flops") or 0.0),
                "guide_seconds": record["guide_seconds"] - (extra.get("consistency_seconds") or 0.0),
            }
        )
    summary = totals.summary()
    return {"flops_ratio": summary["flops_ratio"], "guide_seconds": summary["guide_seconds"]}


def measured_rows(evaluated: Evaluated, metric: str | None) -> list[Row]:
    """One row per task of a measured point: lmms-eval's value and standard error, the pipeline's
    statistics of that task (``results["throughput"]["avg_sgl.<task>.*"]``)."""
    results = evaluated.results
    out = []
    for task in results["results"]:
        if task not in results.get("configs", {}):
            continue  # a group's own line
        name, key = metric_key(results, task, metric)
        value = _number(results["results"][task][key])
        if value is None:
            raise SweepError(f"task {task}: {key} is {results['results'][task][key]!r}, not a number")
        filt = key.split(",", 1)[1]
        stderr = None
        for candidate in (f"{name}_stderr,{filt}", f"{name}_stderr_clt,{filt}"):
            stderr = _number(results["results"][task].get(candidate))
            if stderr is not None:
                break
        scores = per_doc(evaluated.samples(task), name)
        if stderr is None and scores and math.isclose(sum(scores.values()) / len(scores), value):
            stderr = mean_stderr(list(scores.values()))[1]
        stats = {
            k.split(".")[-1]: v
            for k, v in results.get("throughput", {}).items()
            if k.startswith(f"avg_sgl.{task}.")
        }
        stats.update(without_exit_scoring(evaluated.samples(task)))
        seconds = (stats.get("guide_seconds") or 0.0) + (stats.get("large_seconds") or 0.0)
        point = evaluated.point
        out.append(
            Row(
                task=task,
                label=point.label,
                method=point.method,
                ratio=point.ratio_label,
                selection=point.selection,
                layout=dict(point.layout),
                schedule=dict(point.schedule),
                exit_threshold=None,
                replayed=False,
                metric=name,
                value=value,
                stderr=stderr,
                n=int(
                    results.get("n-samples", {}).get(task, {}).get("effective", len(scores)) or len(scores)
                ),
                token_ratio=stats.get("visual_token_ratio"),
                exit_rate=stats.get("exit_rate"),
                large_call_rate=stats.get("large_call_rate"),
                flops_ratio=stats.get("flops_ratio"),
                seconds=seconds if stats else None,
                model_args=evaluated.user_model_args,
                folder=str(evaluated.folder),
                higher_is_better=bool(results.get("higher_is_better", {}).get(task, {}).get(name, True)),
                scores=scores,
            )
        )
    return out


def exit_rows(
    evaluated: Evaluated, thresholds, settings: Settings, metrics: dict[str, str]
) -> tuple[list[Row], list[str]]:
    """The no-exit SGL point with each exit threshold, replayed per task from its records
    (:func:`lmms_sgl.calibration.replay.replay`); ``thresholds`` is a list or ``"deciles"``.
    Returns the rows and notes on tasks that cannot exit (multiple choice)."""
    from lmms_sgl.calibration import CalibrationError
    from lmms_sgl.calibration.calibrate import pick_metric, replay_samples
    from lmms_sgl.calibration.cli import _quiet_lmms_eval
    from lmms_sgl.calibration.replay import deciles, exits_at, replay
    from lmms_sgl.calibration.runs import load_run
    from lmms_sgl.calibration.scoring import build_scorer, task_manager

    try:
        run = load_run(evaluated.folder)
    except CalibrationError as error:
        return [], [f"{evaluated.point.label}: no exit replay ({error})"]
    notes = [f"{task}: {why}; no exit replay" for task, why in run.skipped.items()]
    manager = task_manager(settings.include_paths, list(run.tasks), settings.model)
    point = evaluated.point
    out = []
    for task, log in run.tasks.items():
        scorer = build_scorer(task, run, manager)
        with _quiet_lmms_eval():
            metric = pick_metric(scorer, log, metrics[task])
            samples = replay_samples(scorer, log, metric, evaluated.folder / "sgl_calibration_cache")
            higher = scorer.task.higher_is_better().get(metric, True)
            wanted = deciles(samples) if thresholds == "deciles" else list(thresholds)
            for threshold in wanted:
                replayed = replay(samples, threshold, scorer.aggregate(metric))
                exits = exits_at(samples, threshold)
                values = [
                    s.guide_value if leave else s.final_value for s, leave in zip(samples, exits, strict=True)
                ]
                numeric = [_number(v) for v in values]
                scores = (
                    {str(s.doc_id): v for s, v in zip(samples, numeric, strict=True)}
                    if None not in numeric
                    else {}
                )
                stderr = None
                if scores and math.isclose(sum(scores.values()) / len(scores), replayed.accuracy):
                    stderr = mean_stderr(list(scores.values()))[1]
                records = [s.record for s in log.samples]
                given = processed = seconds = 0.0
                for record, leave in zip(records, exits, strict=True):
                    seconds += record.get("guide_seconds") or 0.0
                    if leave:
                        continue
                    seconds += record.get("large_seconds") or 0.0
                    if record.get("reached_large") and record.get("token_ratio") is not None:
                        given += record["total_visual"] or 0
                        processed += record["token_ratio"] * (record["total_visual"] or 0)
                out.append(
                    Row(
                        task=task,
                        label=f"{point.label}, exit >= {threshold:.6g}",
                        method=point.method,
                        ratio=point.ratio_label,
                        selection=point.selection,
                        layout=dict(point.layout),
                        schedule=dict(point.schedule),
                        exit_threshold=threshold,
                        replayed=True,
                        metric=metric,
                        value=float(replayed.accuracy),
                        stderr=stderr,
                        n=replayed.samples,
                        token_ratio=processed / given if given else None,
                        exit_rate=replayed.exit_rate,
                        large_call_rate=replayed.large_call_rate,
                        flops_ratio=replayed.flops_ratio,
                        seconds=seconds,
                        model_args=f"{evaluated.user_model_args},exit_threshold={threshold!r}",
                        folder=str(evaluated.folder),
                        higher_is_better=bool(higher),
                        scores=scores,
                    )
                )
    return out, notes


def check_tasks(settings: Settings) -> None:
    """Every task is known to lmms-eval (with the include paths) before any model loads."""
    from lmms_sgl.calibration.scoring import task_manager

    manager = task_manager(settings.include_paths, settings.tasks, settings.model)
    unknown = [t for t in settings.tasks if t not in manager.all_tasks]
    if unknown:
        raise SweepError(
            f"--tasks {', '.join(unknown)}: not known to lmms-eval; for a local task pass --include_path DIR"
        )


def run_sweep(settings: Settings, grid, metric: str | None) -> tuple[list[Row], list[str], list[Evaluated]]:
    """Every point (resuming at the first unfinished one), then the exit replays. Under
    ``accelerate launch`` every rank evaluates the points; only rank 0 returns rows (the others
    return none)."""
    evaluated, rows = [], []
    main = is_main_process()
    for number, point in enumerate(grid.points, 1):
        evaluated.append(run_point(settings, point, f"{number}/{len(grid.points)} "))
        if main:
            rows += measured_rows(evaluated[-1], metric)  # a bad --metric stops after the first point
    if not main:
        return [], [], evaluated
    metrics = {r.task: r.metric for r in rows}
    notes: list[str] = []
    if grid.exit_thresholds:
        for done in evaluated:
            if done.point.guided:
                replayed, said = exit_rows(done, grid.exit_thresholds, settings, metrics)
                rows += replayed
                notes += said
    return rows, notes, evaluated
