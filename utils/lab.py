"""Starting JupyterLab on ``lessons/`` (``make lab``), headless-friendly.

``python -m utils.lab`` starts the server on 127.0.0.1 and prints the URL with its token, so
it works on a laptop (a browser opens when one is available) and over SSH alike.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from utils.paths import repo_root


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
    args = parser.parse_args(argv)
    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    browser = not (args.no_browser or headless)
    cmd = lab_command(args.port, browser=browser)
    print("Starting JupyterLab on lessons/ at http://127.0.0.1 (the URL with its token is "
          "printed below; Ctrl-C stops it).", flush=True)
    return subprocess.call(cmd, cwd=repo_root())


if __name__ == "__main__":
    sys.exit(main())
