"""Starting JupyterLab on ``lessons/`` (``make lab``), headless-friendly.

``python -m utils.lab`` starts the server on 127.0.0.1 and prints the URL with its token, so
it works on a laptop (a browser opens when one is available) and over SSH alike. Before it
starts, and at ``make install`` (``python -m utils.lab --write-settings``), it turns off
JupyterLab's news pop-up and update check for this environment only (:func:`write_lab_overrides`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.io import atomic_write_json
from utils.paths import repo_root

# Defaults for JupyterLab's own settings in this environment (a learner's choices in
# Settings > Settings Editor still win). The news toast covered lesson outputs on every load;
# the update check asks a website about versions the course pins anyway. Keys checked against
# jupyterlab 4.6's schema (share/jupyter/lab/schemas/@jupyterlab/apputils-extension/
# notification.json) by tests/test_lab.py.
LAB_OVERRIDES: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",  # a string in the schema: "true" / "false" / "none" (ask)
        "checkForUpdates": False,
    },
}


def lab_settings_dir() -> Path:
    """JupyterLab's settings folder of the running environment: ``$JUPYTERLAB_DIR/settings``,
    else ``<sys.prefix>/share/jupyter/lab/settings`` (where JupyterLab reads ``overrides.json``)."""
    app_dir = os.environ.get("JUPYTERLAB_DIR") or Path(sys.prefix) / "share" / "jupyter" / "lab"
    return Path(app_dir) / "settings"


def write_lab_overrides(settings_dir: str | os.PathLike | None = None,
                        overrides: Mapping[str, Mapping[str, Any]] = LAB_OVERRIDES) -> Path:
    """Merge ``overrides`` into ``<settings_dir>/overrides.json`` and return its path.

    Other plugins and other keys already in the file are kept; the file is rewritten only when
    something changes, so running it twice is the same as running it once.
    """
    path = Path(settings_dir or lab_settings_dir()) / "overrides.json"
    current: dict[str, Any] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text(encoding="utf-8") or "{}")
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): fix or delete it, then run "
                             "`python -m utils.lab --write-settings` again.") from exc
        if not isinstance(current, dict):
            raise ValueError(f"{path} should hold a JSON object, found {type(current).__name__}")
    merged = {plugin: dict(keys) for plugin, keys in current.items()}
    for plugin, keys in overrides.items():
        merged.setdefault(plugin, {}).update(keys)
    if merged != current or not path.exists():
        atomic_write_json(path, merged)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lab_command(port: int = 8888, *, token: str | None = None, browser: bool = True,
                root_dir: str | None = None) -> list[str]:
    """The argv that starts JupyterLab on ``lessons/`` bound to 127.0.0.1."""
    cmd = [sys.executable, "-m", "jupyter", "lab",
           f"--ServerApp.root_dir={root_dir or repo_root() / 'lessons'}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=20"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    if not browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Containers and CI often run as root; Jupyter refuses that unless told it is on purpose.
        cmd.append("--ServerApp.allow_root=True")
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.lab", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8888)))
    parser.add_argument("--no-browser", action="store_true",
                        help="never try to open a browser (default when there is no display)")
    parser.add_argument("--write-settings", action="store_true",
                        help="only turn off JupyterLab's news and update check in this "
                             "environment (make install runs it), then exit")
    args = parser.parse_args(argv)
    if args.write_settings:
        print(f"JupyterLab news and update check off: {write_lab_overrides()}")
        return 0
    try:
        write_lab_overrides()  # also here: an environment made without `make install` (conda)
    except (OSError, ValueError) as exc:  # a read-only environment: start JupyterLab anyway
        print(f"note: JupyterLab's news pop-up stays on ({exc})", file=sys.stderr)
    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    browser = not (args.no_browser or headless)
    cmd = lab_command(args.port, browser=browser)
    print("Starting JupyterLab on lessons/ at http://127.0.0.1 (the URL with its token is "
          "printed below; Ctrl-C stops it).", flush=True)
    return subprocess.call(cmd, cwd=repo_root())


if __name__ == "__main__":
    sys.exit(main())
