"""Tell a chat model's user, before the weights load, that a multiple-choice task needs
``--force_simple``.

lmms-eval resolves ``--model sgl_*`` to the chat interface, whose tasks are generation-only: a
multiple-choice (log-likelihood) task then stops with "Currently messages is used for generation
only" while the requests are built, after both models have loaded. The chat models read the
command line they run under, look the requested tasks up in lmms-eval's own task index (local
``--include_path`` first, the installed tasks only when a name is not found there) and read each
task's ``output_type`` from its YAML (includes resolved, ``!function`` tags not imported).
"""

from __future__ import annotations

import sys

from loguru import logger

from lmms_sgl.lmms.command_line import flag_value

LOG_LIKELIHOOD = ("multiple_choice", "loglikelihood")


def output_types(names: list[str], include_path: str | None) -> dict[str, str]:
    """``{task: output_type}`` for the tasks (groups expanded) that lmms-eval's index knows."""
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    managers = []
    if include_path:
        managers.append(TaskManager("ERROR", include_path=include_path, include_defaults=False))
    if not managers or any(not managers[0]._name_is_registered(n) for n in names):
        managers.append(TaskManager("ERROR", include_path=include_path))
    found: dict[str, str] = {}

    def visit(name: str, manager, depth: int = 0) -> None:
        entry = manager.task_index.get(name)
        if entry is None or depth > 5:
            return
        if entry["type"] in ("group", "tag"):
            for member in entry.get("task", []) if isinstance(entry.get("task"), list) else []:
                visit(member if isinstance(member, str) else member.get("task", ""), manager, depth + 1)
            return
        if entry.get("yaml_path", -1) == -1:
            return
        config = load_yaml_config(entry["yaml_path"], mode="simple")
        found[name] = str(config.get("output_type", ""))

    for name in names:
        manager = next((m for m in managers if m._name_is_registered(name)), None)
        if manager is not None:
            visit(name, manager)
    return found


def check_chat_tasks(argv: list[str] | None = None) -> None:
    """Refuse a chat model run on a multiple-choice task (``--force_simple`` missing)."""
    argv = sys.argv if argv is None else argv
    tasks = flag_value(argv, "--tasks")
    if not tasks or "--force_simple" in argv:
        return
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    try:
        kinds = output_types(names, flag_value(argv, "--include_path"))
    except Exception as error:  # noqa: BLE001 -- advisory: lmms-eval's own task loading reports real problems
        logger.warning(
            f"could not read the output types of --tasks {tasks} ({type(error).__name__}: {error})"
        )
        return
    choice = sorted(name for name, kind in kinds.items() if kind in LOG_LIKELIHOOD)
    if choice:
        raise ValueError(
            f"task(s) {choice} are multiple-choice (output_type {kinds[choice[0]]!r}): lmms-eval sends "
            "their log-likelihood requests to simple models only, and --model sgl_* is the chat "
            "interface; add --force_simple"
        )
