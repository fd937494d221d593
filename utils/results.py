"""Headline numbers of a notebook, saved as JSON with their provenance.

Every notebook ends by saving what it measured to ``NN_topic.json`` in
:func:`utils.paths.results_dir`. A learner's run writes a scratch copy that git ignores
(``.cache/distill-deploy/results/``); ``make execute`` writes the committed ``results/``, from
which the docs are generated (``make results-doc``), never typed in.
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
from utils.paths import committed_results_dir, repo_root, results_dir, scratch_results_dir


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


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (what a learner can find)."""
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def save_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``<results_dir()>/<name>.json`` atomically, adding a ``provenance`` entry.

    Without ``DD_RESULTS_DIR`` (a learner's run) the file goes to the scratch folder and one
    line says where; ``make execute`` sets ``DD_RESULTS_DIR`` to the committed ``results/``.
    """
    if not name or "/" in name or name.endswith(".json"):
        raise ValueError(f"name should look like '01_distillation_theory', got {name!r}")
    payload = dict(results)
    payload["provenance"] = provenance()
    path = results_dir() / f"{name}.json"
    # Round-trip through JSON now so a non-serialisable value fails before anything is written.
    json.loads(json.dumps(payload))
    atomic_write_json(path, payload)
    if path.parent == scratch_results_dir():
        print(f"results of this run: {_shown(path)} (your copy, ignored by git; the committed "
              f"results/{name}.json is rewritten only by `make execute`)")
    return path


def load_results(name: str) -> dict[str, Any]:
    """Read ``<name>.json`` from :func:`results_dir`, else the committed ``results/`` copy.

    A lesson that reads what an earlier one saved sees the learner's own run when there is one
    (the scratch folder) and the committed numbers otherwise.
    """
    candidates = [results_dir() / f"{name}.json", committed_results_dir() / f"{name}.json"]
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"{candidates[0]} does not exist yet: run solutions/{name}.ipynb (or `make execute`) "
        "first."
    )
