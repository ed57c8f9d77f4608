"""W&B that cannot hang an evaluation: checked before lmms-eval opens its run.

lmms-eval's CLI calls ``wandb.init`` (``--wandb_args``) before it loads the model or any task, and in
online mode with a configured key but no network that call does not return (measured: still waiting
after 180 s, nothing evaluated). Our entry point runs when lmms-eval imports its model registry,
before it parses its command line, so it looks first: online mode (``mode=online`` or no mode, and
``WANDB_MODE`` not offline) needs an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the
server) and a server that accepts a TCP connection within a few seconds and answers an HTTP request
(any status) within a few more: a server that accepts and never answers makes ``wandb.init`` retry
for 90 s, raise, and leave the process hanging. If either is missing, the
run falls back to offline W&B (``mode=offline`` written into ``--wandb_args``) with a warning that
says so and how to sync later; the evaluation itself is not touched.
"""

from __future__ import annotations

import netrc
import os
import socket
from urllib.parse import urlparse

from loguru import logger

from lmms_sgl.lmms.command_line import flag_position

DEFAULT_SERVER = "https://api.wandb.ai"
OFFLINE_MODES = ("offline", "disabled", "dryrun")
CONNECT_SECONDS = 3.0
ANSWER_SECONDS = 5.0  # wandb.init retries a silent server for 90 s, then leaves the process hanging


def _parse(value: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in value.split(",") if "=" in item)
    return {key.strip(): item.strip() for key, item in pairs}


def _has_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def online_problem(mode: str | None, server: str, timeout: float = CONNECT_SECONDS) -> str | None:
    """Why online W&B would fail or hang here (no key, server unreachable), or ``None``."""
    mode = (mode or os.environ.get("WANDB_MODE") or "online").lower()
    if mode in OFFLINE_MODES:
        return None
    url = urlparse(server)
    host = url.hostname or ""
    if not _has_key(host):
        return f"no W&B API key for {host} (neither WANDB_API_KEY nor a ~/.netrc entry)"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        return f"the W&B server {server} is not reachable ({type(error).__name__}: {error})"
    return silent_server(server, ANSWER_SECONDS)


def silent_server(server: str, timeout: float) -> str | None:
    """Why a server that accepts connections would still hang ``wandb.init`` (it never answers an
    HTTP request within ``timeout``), or ``None`` when it answers at all (any status will do)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(server, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # an answer, if not a 200: the server is alive
        return None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return (
            f"the W&B server {server} accepted the connection but did not answer an HTTP request "
            f"within {timeout:g} s ({type(reason).__name__}: {reason})"
        )


def fall_back_to_offline(argv: list[str]) -> str | None:
    """Rewrite ``argv``'s ``--wandb_args`` to ``mode=offline`` when online W&B would fail or hang;
    return the warning given (``None`` when nothing changed)."""
    found = flag_position(argv, "--wandb_args")
    if found is None:
        return None
    index, value = found
    args = _parse(value)
    server = args.get("base_url") or os.environ.get("WANDB_BASE_URL") or DEFAULT_SERVER
    problem = online_problem(args.get("mode"), server)
    if problem is None:
        return None
    args["mode"] = "offline"
    rewritten = ",".join(f"{key}={item}" for key, item in args.items())
    argv[index] = rewritten if argv[index] == value else f"--wandb_args={rewritten}"
    message = (
        f"W&B: {problem}; this run logs to W&B offline instead (mode=offline; upload it later with "
        "`wandb sync <run dir>`). Pass mode=offline in --wandb_args to skip this check."
    )
    logger.warning(message)
    return message
