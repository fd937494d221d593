"""Helpers for tests/test_browser.py: JupyterLab on 127.0.0.1 driven in Debian's chromium.

The browser is the system's ``chromium`` (``make browser`` installs it with apt), started by
Playwright for Python through ``executable_path``; Playwright's own browser download
(``playwright install``) is never used. Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.lab import free_port, lab_command

# Debian's chromium; DD_CHROMIUM points at another Chromium-family binary.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (the lab runs as root in CI), and nothing that phones home: on a closed
# network chromium's background connections are refused, many at a time, without these.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = ("run `make browser` (Debian's chromium with apt, as root or with sudo, and "
                "Playwright for Python from the optional `browser` extra)")
LAB_START_TIMEOUT_S = 90

# What JupyterLab 4 shows in a code cell's prompt: "[ ]:", "[*]:" (queued or running), "[12]:".
PROMPT = re.compile(r"\[\s*(\*|\d*)\s*\]")


def chromium_path() -> str | None:
    """The chromium binary to drive: ``DD_CHROMIUM``, else /usr/bin/chromium, else ``chromium``
    on PATH; None when there is none."""
    wanted = os.environ.get("DD_CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    if os.access(DEFAULT_CHROMIUM, os.X_OK):
        return DEFAULT_CHROMIUM
    return shutil.which("chromium")


def unavailable_reason() -> str | None:
    """Why the browser test cannot run here (one line naming the fix), or None when it can."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python is not installed")
    if chromium_path() is None:
        where = os.environ.get("DD_CHROMIUM") or DEFAULT_CHROMIUM
        missing.append(f"no chromium at {where} (nor `chromium` on PATH)")
    if not missing:
        return None
    return f"{' and '.join(missing)}: {INSTALL_HINT}"


def _get(url: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, b""


@dataclass
class Lab:
    """A running JupyterLab: where it serves, its token, and the folder it serves."""

    base: str
    token: str
    root: Path
    log: Path

    def url(self, path: str, query: str = "") -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}{'&' + query if query else ''}"

    def api(self, path: str) -> Any:
        status, body = _get(self.url(f"api/{path}"), timeout=10)
        if status != 200:
            raise RuntimeError(f"JupyterLab answered {status} to api/{path}")
        return json.loads(body)

    def kernel_state(self, notebook: str) -> str | None:
        """The execution state ("starting", "idle", "busy") of ``notebook``'s kernel, if any."""
        for session in self.api("sessions"):
            if session.get("path") == notebook:
                return (session.get("kernel") or {}).get("execution_state")
        return None

    def shut_down_kernels(self) -> int:
        """End every session (and its kernel), as File > Shut Down would; return how many."""
        sessions = self.api("sessions")
        for session in sessions:
            request = urllib.request.Request(f"{self.base}/api/sessions/{session['id']}",
                                             method="DELETE",
                                             headers={"Authorization": f"token {self.token}"})
            with urllib.request.urlopen(request, timeout=30):
                pass
        return len(sessions)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM to its process group
    (jupyter_server shuts its kernels down before it exits), SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def running_lab(root: Path, token: str, env: dict[str, str]) -> Iterator[Lab]:
    """JupyterLab serving ``root`` on 127.0.0.1 at a free port; stopped (its whole process
    group: server and kernels) on exit."""
    port = free_port()
    log = root.parent / "lab.log"
    cmd = lab_command(port=port, token=token, browser=False, root_dir=str(root))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    lab = Lab(base=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}")
            if _get(lab.url("api/status"))[0] == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer on {lab.base} within "
                                   f"{LAB_START_TIMEOUT_S} s:\n{lab.log_tail()}")
            time.sleep(0.5)
        yield lab
    finally:
        stop_process_group(proc)
        # Kernels run in sessions of their own (jupyter_client), so a killpg above does not
        # reach them: find any kernel of this server still alive by its JPY_PARENT_PID.
        for pid in kernels_of(proc.pid):
            os.kill(pid, signal.SIGKILL)


def kernels_of(server_pid: int) -> list[int]:
    """Live processes started by the Jupyter server ``server_pid`` (JPY_PARENT_PID in their
    environment): its kernels."""
    marker = f"JPY_PARENT_PID={server_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def code_cell_count(notebook: Path) -> int:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(c["cell_type"] == "code" for c in cells)


def open_exercises(notebook: Path) -> list[tuple[str, str, bool]]:
    """(label, function name, whether a later cell falls back through ``use_answer``) of each
    open exercise, read from the lesson's own cells."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    used = set(re.findall(r"use_answer\(\s*(\w+)", source))
    return [(label, name, name in used) for label, name
            in re.findall(r'NotImplementedError\("Exercise (\d+\.\d+): (\w+)', source)]


def prompts(page: Any) -> list[str]:
    """What each code cell's prompt shows: "" (never run), "*" (queued/running) or a number."""
    texts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_text_contents()
    out = []
    for text in texts:
        match = PROMPT.search(text)
        out.append(match.group(1) if match else "")
    return out


def error_outputs(page: Any, limit: int = 2000) -> str:
    """Text of the notebook's stderr and error outputs (for a failure message)."""
    selector = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
    return "\n".join(page.locator(selector).all_text_contents())[-limit:]


def open_notebook(page: Any, lab: Lab, name: str, n_code_cells: int, timeout_s: float) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel is idle and every code cell is in
    the page (so the DOM checks below see the whole notebook)."""
    # `reset`: a fresh workspace, so no notebook of an earlier test is restored beside it
    page.goto(lab.url(f"lab/tree/{name}", "reset"), wait_until="domcontentloaded")
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(state="attached",
                                                              timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while True:
        cells = page.locator(".jp-Notebook .jp-CodeCell").count()
        state = lab.kernel_state(name)
        if cells == n_code_cells and state == "idle":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: after {timeout_s:.0f} s the page shows {cells} of "
                                 f"{n_code_cells} code cells and the kernel is {state!r}\n"
                                 f"{lab.log_tail()}")
        time.sleep(0.5)


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells, through the menu bar as a learner does."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^\s*Run All Cells\s*$")).click()


def wait_until_run_all_done(page: Any, lab: Lab, name: str, timeout_s: float) -> list[str]:
    """Wait until no cell is queued or running and the kernel is idle; return the prompts.

    Run All stops at a failing cell and clears the prompts of the cells queued after it, so a
    prompt left empty afterwards means a cell raised.
    """
    deadline = time.monotonic() + timeout_s
    started = False
    while True:
        shown = prompts(page)
        running = "*" in shown
        # lessons/ carry no outputs, so a number in a prompt is from this run
        started = started or running or any(p.isdigit() for p in shown)
        if started and not running and lab.kernel_state(name) == "idle":
            return shown
        if time.monotonic() > deadline:
            done = sum(p.isdigit() for p in shown)
            raise AssertionError(f"{name}: Run All Cells had not finished after {timeout_s:.0f}"
                                 f" s ({done} of {len(shown)} cells run)\n{error_outputs(page)}")
        time.sleep(1.0)


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(interval_s)
