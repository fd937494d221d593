"""Headline numbers of a notebook, saved as JSON with their provenance.

Every notebook ends by saving what it measured to ``results/NN_topic.json``; the docs are
generated from these files (``make results-doc``), never typed in.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from utils.io import atomic_write_json
from utils.paths import repo_root, results_dir


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Where and when a number was measured: machine, versions, date, git commit."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(),
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` atomically, adding a ``provenance`` entry."""
    if not name or "/" in name or name.endswith(".json"):
        raise ValueError(f"name should look like '01_distillation_theory', got {name!r}")
    payload = dict(results)
    payload["provenance"] = provenance()
    path = results_dir() / f"{name}.json"
    # Round-trip through JSON now so a non-serialisable value fails before anything is written.
    json.loads(json.dumps(payload))
    return atomic_write_json(path, payload)


def load_results(name: str) -> dict[str, Any]:
    """Read ``results/<name>.json``; a clear error says which notebook makes it."""
    path = results_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist yet: run solutions/{name}.ipynb (or `make execute`) first."
        )
    return json.loads(path.read_text(encoding="utf-8"))
