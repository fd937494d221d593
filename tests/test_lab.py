"""`make lab` starts a JupyterLab that answers on 127.0.0.1, and leaves nothing running."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

import utils.lab as lab
from utils.lab import free_port, lab_command
from utils.paths import repo_root

START_TIMEOUT_S = 60


def test_makefile_lab_target_runs_utils_lab():
    makefile = (repo_root() / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^lab:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, "the Makefile has no `lab` target"
    assert "$(PY) -m utils.lab" in match.group(1), match.group(1)


def test_main_runs_lab_command(monkeypatch, capsys):
    # `python -m utils.lab` (what `make lab` runs) starts exactly lab_command's argv.
    seen = {}

    def fake_call(cmd, cwd=None):
        seen["cmd"], seen["cwd"] = cmd, cwd
        return 0

    monkeypatch.setattr(lab.subprocess, "call", fake_call)
    assert lab.main(["--port", "8123", "--no-browser"]) == 0
    assert seen["cmd"] == lab_command(8123, browser=False)
    assert seen["cwd"] == repo_root()
    assert "--ServerApp.ip=127.0.0.1" in seen["cmd"]
    assert "Starting JupyterLab" in capsys.readouterr().out


def _answers(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_lab_server_answers_on_localhost(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    cmd = lab_command(port=port, token=token, browser=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log = open(tmp_path / "lab.log", "w+b")
    # A new session: the server and anything it starts can be stopped as one group.
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/lab?token={token}"
    status = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            status = _answers(url)
            if status == 200:
                break
            time.sleep(0.5)
        log.seek(0)
        output = log.read().decode(errors="replace")[-3000:]
        assert proc.poll() is None, f"JupyterLab exited with {proc.returncode}:\n{output}"
        assert status == 200, f"no HTTP 200 from {url} within {START_TIMEOUT_S} s " \
                              f"(last status {status}):\n{output}"
        # The token matters: without it the server does not hand out the lab page.
        assert _answers(f"http://127.0.0.1:{port}/api/sessions") == 403
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the group is left
    assert not _port_open(port), f"port {port} still answers after the server stopped"
