"""Read an lmms-eval output folder of an SGL run: its results.json and per-task samples logs.

lmms-eval writes ``<output_path>/<model>/<timestamp>_results.json`` and, with ``--log_samples``,
``<timestamp>_samples_<task>.jsonl`` next to it; each logged row carries our per-sample record under
``token_counts[i]["sgl"]`` and the task's per-sample metric values at its top level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.lmms.args import split_model_args
from lmms_sgl.lmms.registry import MODELS

SGL_MODELS = tuple(MODELS)  # sgl_internvl2, sgl_llava, sgl_qwen2_vl: the same per-sample records


@dataclass
class LoggedSample:
    """One document of a generation task: the run's scored answer and our SGL record."""

    doc_id: int
    row: dict  # the samples-log row (metric values at its top level)
    record: dict  # token_counts[0]["sgl"]

    @property
    def can_exit(self) -> bool:
        """Only a sample with a guide answer and an exit score can be answered by the guide."""
        return self.record.get("guide_answer") is not None and self.record.get("exit_score") is not None


@dataclass
class TaskLog:
    name: str
    samples: list[LoggedSample]
    path: Path

    @property
    def exited(self) -> list[LoggedSample]:
        return [s for s in self.samples if s.record.get("exited")]


@dataclass
class Run:
    """One lmms-eval evaluation: its configuration, results and the generation tasks it logged."""

    results_path: Path
    results: dict
    tasks: dict[str, TaskLog] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it cannot be calibrated

    @property
    def config(self) -> dict:
        return self.results.get("config", {})

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))

    @property
    def model_args(self) -> str:
        return str(self.config.get("model_args") or "")

    @property
    def cli_args(self) -> dict:
        return self.config.get("resolved_cli_args") or {}

    def model_arg(self, name: str) -> str | None:
        """The value of one ``--model_args`` entry as written on the command line, or ``None``."""
        for part in split_model_args(self.model_args):
            key, _, value = part.partition("=")
            if key.strip() == name:
                return value.strip()
        return None

    @property
    def exit_threshold(self) -> float | None:
        value = self.model_arg("exit_threshold")
        if value is None or value.lower() in ("none", "null", ""):
            return None
        return float(value)


# Arguments of the calibrated run that a recommended run replaces or no longer needs (with a
# threshold the exit score is computed anyway; without one nothing reads it).
CALIBRATION_ARGS = ("exit_threshold", "record_exit_score")


def without_calibration_args(model_args: str) -> list[str]:
    return [p for p in split_model_args(model_args) if p.partition("=")[0].strip() not in CALIBRATION_ARGS]


def with_exit_threshold(model_args: str, threshold: float | None) -> str:
    """The run's ``--model_args`` with ``exit_threshold`` set to ``threshold`` (exact float repr;
    ``None``: left out) and ``record_exit_score`` left out."""
    kept = without_calibration_args(model_args)
    return ",".join(kept if threshold is None else [*kept, f"exit_threshold={threshold!r}"])


def results_file(path: Path) -> Path:
    if not path.exists():
        raise CalibrationError(f"OUTPUT_DIR={str(path)!r} does not exist")
    if path.is_file():
        if path.name.endswith("_results.json"):
            return path
        raise CalibrationError(
            f"OUTPUT_DIR={str(path)!r} is a file; pass the lmms-eval --output_path folder "
            "(or its *_results.json)"
        )
    found = sorted(path.rglob("*_results.json"), key=lambda p: p.name)
    if not found:
        raise CalibrationError(
            f"no lmms-eval results (*_results.json) under {str(path)!r}: "
            "pass the --output_path of a finished run"
        )
    if len(found) > 1:
        logger.warning(
            f"{len(found)} lmms-eval runs under {path}; using the newest, {found[-1]} "
            "(pass its folder or *_results.json to choose another)"
        )
    return found[-1]


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CalibrationError(
                    f"{path}:{number} is not JSON ({error}); is the samples log complete?"
                ) from None
    return rows


def sample_records(row: dict) -> list[dict | None]:
    return [
        (entry or {}).get("sgl") if isinstance(entry, dict) else None
        for entry in row.get("token_counts") or []
    ]


def load_task_log(task: str, path: Path) -> tuple[TaskLog | None, str | None]:
    """The task's logged samples, or ``(None, reason)`` when the task cannot exit at all."""
    by_doc: dict[int, LoggedSample] = {}
    for row in read_rows(path):
        records = sample_records(row)
        if not records or any(r is None for r in records):
            raise CalibrationError(
                f"{path.name}: document {row.get('doc_id')} has no SGL record (token_counts[i]['sgl']); "
                f"this is not a run of {' / '.join(SGL_MODELS)}"
            )
        if len(records) > 1 or row_is_loglikelihood(row):
            return None, "multiple-choice (log-likelihood) requests never exit"
        doc_id = int(row["doc_id"])
        # With several filter ensembles lmms-eval logs a document once per filter; the first is the
        # task's first ensemble, the one calibration scores.
        by_doc.setdefault(doc_id, LoggedSample(doc_id, row, records[0]))
    samples = [by_doc[k] for k in sorted(by_doc)]
    if not samples:
        raise CalibrationError(f"{path} holds no samples")
    return TaskLog(task, samples, path), None


def row_is_loglikelihood(row: dict) -> bool:
    """A log-likelihood answer is logged as a ``[logprob, is_greedy]`` pair, not a string."""
    value = row.get("filtered_resps")
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], bool)


def load_run(path: Path, tasks: list[str] | None = None) -> Run:
    """The run under ``path``; ``tasks`` restricts it (each must have been logged)."""
    results_path = results_file(Path(path))
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as error:
        raise CalibrationError(f"{results_path} is not valid JSON ({error})") from None
    run = Run(results_path, results)
    prefix = results_path.name[: -len("_results.json")]
    logs = {
        p.name[len(f"{prefix}_samples_") : -len(".jsonl")]: p
        for p in results_path.parent.glob(f"{prefix}_samples_*.jsonl")
    }
    if not logs:
        raise CalibrationError(
            f"{results_path.parent} has results but no samples logs ({prefix}_samples_<task>.jsonl): "
            "rerun lmms-eval with --log_samples"
        )
    if run.model and run.model not in SGL_MODELS:
        raise CalibrationError(
            f"{results_path.name} is a run of --model {run.model}; calibration needs an SGL run "
            f"(--model {' or '.join(SGL_MODELS)} with method=sgl)"
        )
    method = run.model_arg("method")
    if method not in (None, "sgl"):
        raise CalibrationError(
            f"the run used method={method}; calibration needs method=sgl (guide answers and exit scores "
            "next to the large model's answers)"
        )
    wanted = tasks or sorted(logs)
    missing = [t for t in wanted if t not in logs]
    if missing:
        raise CalibrationError(
            f"--task {', '.join(missing)}: not logged in this run; logged tasks: {', '.join(sorted(logs))}"
        )
    for name in wanted:
        log, reason = load_task_log(name, logs[name])
        if log is None:
            if tasks:
                raise CalibrationError(f"--task {name}: cannot be calibrated ({reason})")
            run.skipped[name] = reason
            logger.info(f"skipping {name}: {reason}")
        else:
            run.tasks[name] = log
    if not run.tasks:
        raise CalibrationError(
            "no task of this run can exit: " + "; ".join(f"{t}: {why}" for t, why in run.skipped.items())
        )
    return run
