"""`make lab` starts a JupyterLab that answers on 127.0.0.1, and leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import utils.lab as lab
from tests.browser_lab import stop_process_group
from utils.doctor import KERNEL_DISPLAY, KERNEL_NAME
from utils.lab import LAB_OVERRIDES, free_port, lab_command, lab_settings_dir, write_lab_overrides
from utils.paths import repo_root

START_TIMEOUT_S = 60


def test_makefile_lab_target_runs_utils_lab():
    makefile = (repo_root() / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^lab:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, "the Makefile has no `lab` target"
    assert "$(PY) -m utils.lab" in match.group(1), match.group(1)


def _recipe(target: str) -> str:
    makefile = (repo_root() / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, f"the Makefile has no `{target}` rule"
    return match.group(1)


def test_makefile_install_shows_progress_and_registers_inside_the_venv():
    install = _recipe("$(STAMP)") + _recipe("$(PY)")
    steps = re.findall(r"\[(\d)/4\]", install)
    assert sorted(steps) == ["1", "2", "3", "4"], steps  # one progress line per step
    # torch first, pinned and explicit, then the course's pins
    assert install.index("torch==2.13.0") < install.index('-e ".[dev]"')
    assert "--sys-prefix" in install and "--user" not in install
    assert "--name $(KERNEL)" in install and "utils.lab --write-settings" in install
    makefile = (repo_root() / "Makefile").read_text(encoding="utf-8")
    assert f"KERNEL := {KERNEL_NAME}" in makefile and f'"{KERNEL_DISPLAY}"' in install


def test_kernel_spec_lands_in_the_environment_and_jupyter_finds_it_there(tmp_path):
    """`ipykernel install --sys-prefix` writes <prefix>/share/jupyter/kernels/<name>, which
    Jupyter started from that environment searches before the per-user folder."""
    from ipykernel.kernelspec import install
    from jupyter_core.paths import jupyter_data_dir, jupyter_path

    where = install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=str(tmp_path))
    assert where == str(tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME)
    spec = json.loads((Path(where) / "kernel.json").read_text(encoding="utf-8"))
    assert spec["argv"][0] == sys.executable and spec["display_name"] == KERNEL_DISPLAY
    search = jupyter_path("kernels")
    ours = os.path.join(sys.prefix, "share", "jupyter", "kernels")
    assert ours in search
    user = os.path.join(jupyter_data_dir(), "kernels")
    if sys.prefix != sys.base_prefix and user in search:  # a venv: its kernels win
        assert search.index(ours) < search.index(user)


def test_overrides_turn_off_news_and_keys_exist_in_jupyterlabs_schema():
    schemas = lab_settings_dir().parent / "schemas"
    for plugin, keys in LAB_OVERRIDES.items():
        package, name = plugin.split(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text(encoding="utf-8"))
        for key, value in keys.items():
            prop = schema["properties"][key]  # a renamed key would silently do nothing
            allowed = [c["const"] for c in prop.get("oneOf", [])] or [True, False]
            assert value in allowed, (plugin, key, value, allowed)
    assert LAB_OVERRIDES["@jupyterlab/apputils-extension:notification"] == {
        "fetchNews": "false", "checkForUpdates": False}


def test_write_lab_overrides_merges_and_is_idempotent(tmp_path):
    path = write_lab_overrides(tmp_path)
    assert path == tmp_path / "overrides.json"
    assert json.loads(path.read_text()) == LAB_OVERRIDES
    stamp = path.stat().st_mtime_ns
    assert write_lab_overrides(tmp_path) == path and path.stat().st_mtime_ns == stamp  # no rewrite
    # an existing file: other plugins and other keys of our plugin are kept, ours are set
    notification = "@jupyterlab/apputils-extension:notification"
    path.write_text(json.dumps({
        "@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
        notification: {"doNotDisturbMode": True, "fetchNews": "true"},
    }))
    write_lab_overrides(tmp_path)
    merged = json.loads(path.read_text())
    assert merged["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}
    assert merged[notification] == {"doNotDisturbMode": True, "fetchNews": "false",
                                    "checkForUpdates": False}
    once = path.read_text()
    write_lab_overrides(tmp_path)
    assert path.read_text() == once
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_lab_overrides(tmp_path)


def test_settings_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JUPYTERLAB_DIR", raising=False)
    assert lab_settings_dir() == Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    monkeypatch.setenv("JUPYTERLAB_DIR", str(tmp_path))
    assert lab_settings_dir() == tmp_path / "settings"


def test_write_settings_flag_only_writes(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("JUPYTERLAB_DIR", str(tmp_path))
    monkeypatch.setattr(lab.subprocess, "call", lambda *a, **k: pytest.fail("started a server"))
    assert lab.main(["--write-settings"]) == 0
    assert json.loads((tmp_path / "settings" / "overrides.json").read_text()) == LAB_OVERRIDES
    assert "overrides.json" in capsys.readouterr().out


def test_main_runs_lab_command(monkeypatch, capsys, tmp_path):
    # `python -m utils.lab` (what `make lab` runs) starts exactly lab_command's argv.
    monkeypatch.setenv("JUPYTERLAB_DIR", str(tmp_path))  # its settings write lands here
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
    assert (tmp_path / "settings" / "overrides.json").exists()  # news off before it starts


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
        # The lessons' kernel (registered inside .venv by make install) is offered, and it runs
        # this environment's Python.
        api = f"http://127.0.0.1:{port}/api/kernelspecs?token={token}"
        with urllib.request.urlopen(api, timeout=10) as response:
            specs = json.load(response)["kernelspecs"]
        assert KERNEL_NAME in specs, f"JupyterLab does not offer {KERNEL_NAME!r}: {sorted(specs)}"
        assert specs[KERNEL_NAME]["spec"]["argv"][0] == sys.executable, "run `make install`"
    finally:
        stop_process_group(proc)
        log.close()
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the group is left
    assert not _port_open(port), f"port {port} still answers after the server stopped"
