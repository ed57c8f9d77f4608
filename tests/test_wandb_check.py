"""Online W&B with no reachable server or no key falls back to offline before lmms-eval's wandb.init
(which otherwise hangs before the evaluation starts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sgl.lmms.wandb_check import fall_back_to_offline


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return url


def test_unreachable_server_falls_back_to_offline(unreachable, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    argv = ["lmms-eval", "--model", "x", "--wandb_args", "project=p,mode=online,name=n"]
    message = fall_back_to_offline(argv)
    assert message is not None and f"the W&B server {unreachable} is not reachable" in message
    assert "mode=offline" in message and "wandb sync" in message
    assert argv[-1] == "project=p,mode=offline,name=n"
    equals_form = ["lmms-eval", "--wandb_args=project=p"]  # no mode: online by default
    assert fall_back_to_offline(equals_form) is not None
    assert equals_form[-1] == "--wandb_args=project=p,mode=offline"


def test_missing_key_gets_the_same_message(unreachable, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    argv = ["lmms-eval", "--wandb_args", "project=p"]
    message = fall_back_to_offline(argv)
    assert "no W&B API key for 127.0.0.1" in message and "mode=offline" in message
    assert argv[-1] == "project=p,mode=offline"


def test_offline_and_reachable_runs_are_left_alone(unreachable, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    offline = ["lmms-eval", "--wandb_args", "project=p,mode=offline"]
    assert fall_back_to_offline(offline) is None and offline[-1] == "project=p,mode=offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert fall_back_to_offline(["lmms-eval", "--wandb_args", "project=p"]) is None
    monkeypatch.delenv("WANDB_MODE")
    with answering_server() as url:  # a server that answers (here 404): online stays online
        monkeypatch.setenv("WANDB_BASE_URL", url)
        online = ["lmms-eval", "--wandb_args", "project=p"]
        assert fall_back_to_offline(online) is None and online[-1] == "project=p"
    assert fall_back_to_offline(["lmms-eval", "--model", "x"]) is None


def test_a_server_that_accepts_and_never_answers_falls_back_in_seconds(unreachable, monkeypatch):
    """The silent listener (loopback only, closed by the test): wandb.init would retry it for 90 s
    and leave the process hanging; the check gives up after its answer timeout."""
    import time

    from lmms_sgl.lmms import wandb_check

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wandb_check, "ANSWER_SECONDS", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # accepts into the backlog, never reads or answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        argv = ["lmms-eval", "--wandb_args", "project=p"]
        start = time.monotonic()
        message = fall_back_to_offline(argv)
        assert time.monotonic() - start < 10
    assert f"the W&B server {url} accepted the connection but did not answer" in message
    assert argv[-1] == "project=p,mode=offline"


class answering_server:
    """A loopback HTTP server answering 404 to everything, in a thread, for one ``with`` block."""

    def __enter__(self) -> str:
        import http.server
        import threading

        class Quiet(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- the handler's API
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_cli_with_unreachable_server_evaluates_offline(
    tmp_path, models_dir, tasks_dir, unreachable, monkeypatch
):
    """Through the lmms-eval CLI: without the check wandb.init would wait on the closed port before
    any evaluation; with it the run finishes, logged to an offline W&B run, and says why."""
    env = {**os.environ, "WANDB_API_KEY": "k" * 40, "OMP_NUM_THREADS": "1"}  # tiny model: one thread
    env.pop("WANDB_MODE", None)
    exe = Path(sys.executable).with_name("lmms-eval")
    command = [
        str(exe),
        "--model",
        "sgl_llava",
        "--model_args",
        f"pretrained={models_dir / 'llava-large'},method=large_only",
        "--tasks",
        "sgl_smoke",
        "--include_path",
        str(tasks_dir),
        "--limit",
        "1",
        "--output_path",
        str(tmp_path / "out"),
        "--wandb_args",
        f"project=lmms-sgl-test,dir={tmp_path}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert f"the W&B server {unreachable} is not reachable" in output, output[-3000:]
    assert sorted((tmp_path / "out").rglob("*_results.json")), output[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*")), output[-3000:]
