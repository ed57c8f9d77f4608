"""Score the guide's answers with the task's own code, as lmms-eval scored the run's answers.

The task is rebuilt from its name (lmms-eval's ``TaskManager`` / ``get_task_dict``, with the run's
and the user's include paths, so local tasks work). Each guide answer goes through the same steps
as a response in lmms-eval's evaluator: the task's first filter ensemble, reasoning-tag stripping as
configured for the run, then ``task.process_results(doc, [response])`` on the document with the
logged doc id. A guide answer equal to the run's scored answer reuses the logged metric values.

Tasks scored by an LLM judge (``lmms_eval.llm_judge``, e.g. mmvet) are detected from their
configuration before any data is loaded; without a configured judge calibration stops with the
variables to set. Judged scores are cached on disk, one JSON line per answer, so a rerun (or an
interrupted one) does not pay again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.calibration.runs import Run, TaskLog

# What each lmms-eval judge provider (API_TYPE) needs from the environment; any one tuple suffices.
JUDGE_ENV = {
    "openai": (("OPENAI_API_KEY",),),
    "async_openai": (("OPENAI_API_KEY",),),
    "azure": (("AZURE_API_KEY", "AZURE_ENDPOINT"),),
    "async_azure": (("AZURE_API_KEY", "AZURE_ENDPOINT"),),
    "local": (("LLM_JUDGE_URL",),),
    "bedrock": (("AWS_BEARER_TOKEN_BEDROCK",), ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
    "dummy": ((),),
}
_JUDGE_MARKERS = ("lmms_eval.llm_judge", "OPENAI_API_KEY", "import openai", "from openai")


def task_manager(include_paths: list[str], names: list[str], model_name: str | None = None):
    """lmms-eval's task index; only the include paths when they hold every task in ``names``
    (indexing lmms-eval's hundreds of built-in tasks takes seconds)."""
    if include_paths:
        local = _index(tuple(include_paths), False, model_name)
        if all(name in local.all_tasks for name in names):
            return local
    return _index(tuple(include_paths), True, model_name)


@functools.lru_cache(maxsize=4)
def _index(include_paths: tuple[str, ...], include_defaults: bool, model_name: str | None):
    """One index per process and set of paths (it only reads YAML files; tasks are built fresh)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(
        "WARNING",
        include_path=list(include_paths) or None,
        include_defaults=include_defaults,
        model_name=model_name,
    )


def task_yaml(name: str, manager) -> str:
    """The YAML file of task ``name`` (a clear error for unknown names, groups and tags)."""
    if name not in manager.all_tasks:
        raise CalibrationError(
            f"task {name!r} is not known to lmms-eval: for a local task pass --include-path DIR "
            "(the folder given to lmms-eval's --include_path)"
        )
    entry = manager.task_index[name]
    if entry.get("type") != "task" or not isinstance(entry.get("yaml_path"), str):
        raise CalibrationError(f"task {name!r} is a {entry.get('type')}; calibrate its tasks one by one")
    return entry["yaml_path"]


def _function_source(reference, yaml_path: str) -> str:
    """Source text of the module a ``!function module.name`` entry points at, without importing it
    (MM-Vet's module builds its judge client at import and fails without credentials)."""
    import importlib.util

    text = getattr(reference, "value", reference)
    if not isinstance(text, str) or "." not in text:
        return ""
    module = text.rsplit(".", 1)[0]
    where = getattr(getattr(reference, "start_mark", None), "name", None)
    base = Path(where).parent if where and Path(where).exists() else Path(yaml_path).parent
    path = base / f"{module}.py"
    if not path.exists():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return ""
        path = Path(spec.origin) if spec is not None and spec.origin else None
    return path.read_text() if path is not None and path.exists() else ""


def judged_by_llm(name: str, manager) -> bool:
    """Whether the task's ``process_results`` lives in a module that calls an LLM judge, read from
    its YAML and source text (nothing imported, no data loaded)."""
    from lmms_eval.utils import load_yaml_config

    yaml_path = task_yaml(name, manager)
    config = load_yaml_config(yaml_path, mode="simple")
    reference = config.get("process_results")
    if reference is None:
        return False
    return any(marker in _function_source(reference, yaml_path) for marker in _JUDGE_MARKERS)


def judge_identity() -> dict:
    """The judge this environment selects, as lmms-eval's judged tasks read it."""
    return {"api_type": os.getenv("API_TYPE", "openai").lower(), "model": os.getenv("MODEL_VERSION", "")}


def check_judge(task: str) -> dict:
    """Fail before any work when the judge a judged task would use is not configured."""
    identity = judge_identity()
    options = JUDGE_ENV.get(identity["api_type"])
    if options is None:
        raise CalibrationError(
            f"task {task} is scored by an LLM judge; API_TYPE={identity['api_type']!r} is not one of "
            f"{', '.join(JUDGE_ENV)}"
        )
    if not any(all(os.getenv(name) for name in names) for names in options):
        wanted = " or ".join("+".join(names) for names in options)
        raise CalibrationError(
            f"task {task} is scored by an LLM judge (lmms-eval's llm_judge, API_TYPE="
            f"{identity['api_type']}) and no judge is configured: set {wanted} (optionally MODEL_VERSION), "
            "or choose another judge with API_TYPE=azure (AZURE_API_KEY, AZURE_ENDPOINT) or API_TYPE=local "
            "(LLM_JUDGE_URL of an OpenAI-compatible server). Nothing was scored or written."
        )
    return identity


class JudgeCache:
    """Per-answer metric values on disk, keyed by task, document, answer and judge."""

    def __init__(self, path: Path, judge: dict):
        self.path, self.judge = path, judge
        self.entries: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interrupted write: judge it again
                        logger.warning(f"{path}: ignoring an unreadable cache line")
                        continue
                    self.entries[entry["key"]] = entry["metrics"]

    def key(self, task: str, doc_id: int, response: Any) -> str:
        payload = json.dumps([task, doc_id, response, self.judge], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, metrics: dict) -> None:
        self.entries[key] = metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "metrics": metrics}, default=str) + "\n")


@dataclass
class TaskScorer:
    """A rebuilt lmms-eval task that scores single responses as the evaluator does."""

    name: str
    task: Any
    docs: Any
    reasoning_tags: list | None
    judged: bool

    @property
    def metrics(self) -> list[str]:
        return list(self.task.aggregation().keys())

    def aggregate(self, metric: str) -> Callable[[list], float]:
        return self.task.aggregation()[metric]

    def response(self, text: str, doc_id: int) -> Any:
        """``text`` after the task's first filter ensemble and the run's reasoning-tag stripping."""
        from lmms_eval.api.instance import Instance
        from lmms_eval.api.reasoning import strip_reasoning_tags

        instance = Instance(
            "generate_until", (), 0, {"task": self.name, "doc_id": doc_id, "repeats": 1}, resps=[text]
        )
        filters = getattr(self.task, "_filters", None) or []
        if filters:
            filters[0].apply([instance], self.docs)
            value = next(iter(instance.filtered_resps.values()))
        else:
            value = text
        if self.reasoning_tags is not None:
            if isinstance(value, str):
                value = strip_reasoning_tags(value, self.reasoning_tags)
            elif isinstance(value, list):
                value = [
                    strip_reasoning_tags(v, self.reasoning_tags) if isinstance(v, str) else v for v in value
                ]
        return value

    def score(self, doc_id: int, response: Any) -> dict:
        return self.task.process_results(self.docs[doc_id], [response])


def build_scorer(name: str, run: Run, manager) -> TaskScorer:
    """Rebuild ``name`` (checking a judge first, if the task needs one) with the run's settings."""
    from lmms_eval.api.reasoning import parse_reasoning_tags_config
    from lmms_eval.tasks import get_task_dict

    judged = judged_by_llm(name, manager)
    if judged:
        check_judge(name)
    try:
        tasks = get_task_dict([name], manager)
    except Exception as error:  # noqa: BLE001 -- re-raised with the task named
        raise CalibrationError(
            f"task {name}: lmms-eval could not build it ({type(error).__name__}: {error})"
        ) from error
    task = tasks.get(name)
    if task is None or isinstance(task, dict):
        raise CalibrationError(f"task {name!r} is a group; calibrate its tasks one by one")
    with_media = bool(run.cli_args.get("process_with_media", False))
    docs = task.eval_docs if with_media else task.eval_docs_no_media
    tags = parse_reasoning_tags_config(
        cli_value=run.cli_args.get("reasoning_tags"), task_value=getattr(task.config, "reasoning_tags", None)
    )
    return TaskScorer(name, task, docs, tags, judged)


def _logged_response(row: dict) -> Any:
    value = row.get("filtered_resps")
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def guide_metrics(scorer: TaskScorer, log: TaskLog, cache_dir: Path) -> dict[int, dict]:
    """Per document, the task's metric values for the guide's answer (samples that can exit only)."""
    cache = JudgeCache(cache_dir / f"{log.name}.jsonl", judge_identity()) if scorer.judged else None
    out: dict[int, dict] = {}
    pending = []
    for sample in log.samples:
        if not sample.can_exit:
            continue
        response = scorer.response(sample.record["guide_answer"], sample.doc_id)
        if response == _logged_response(sample.row):  # the run already scored this very answer
            out[sample.doc_id] = {m: sample.row[m] for m in scorer.metrics if m in sample.row}
            if len(out[sample.doc_id]) == len(scorer.metrics):
                continue
        pending.append((sample.doc_id, response))
    desc = f"judging guide answers ({log.name})" if scorer.judged else f"scoring guide answers ({log.name})"
    judged_now = 0
    for doc_id, response in tqdm(pending, desc=desc, disable=not pending or not scorer.judged):
        if cache is not None:
            key = cache.key(log.name, doc_id, response)
            cached = cache.get(key)
            if cached is not None:
                out[doc_id] = cached
                continue
        metrics = scorer.score(doc_id, response)
        if cache is not None:
            cache.put(key, metrics)
            judged_now += 1
        out[doc_id] = metrics
    if cache is not None:
        logger.info(
            f"{log.name}: {judged_now} guide answers judged now, "
            f"{len(pending) - judged_now} from the cache {cache.path}"
        )
    return out
