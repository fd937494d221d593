"""Where the course keeps things: the repository root, data, results and the model cache."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout that holds ``utils/`` (the package is installed editable)."""
    return Path(__file__).resolve().parent.parent


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository when inside it (for provenance and messages)."""
    path = Path(path).resolve()
    root = repo_root().resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def data_dir() -> Path:
    """Committed, generated data (``data/``)."""
    return repo_root() / "data"


def results_dir() -> Path:
    """Where notebooks *save* their headline numbers (``utils.results.save_results``).

    ``DD_RESULTS_DIR`` when it is set: ``make execute`` points it at the committed
    ``results/``, ``make notebooks`` at a temporary folder. Otherwise a scratch folder that git
    ignores, :func:`scratch_results_dir`, so a learner's run never changes a tracked file.
    """
    override = os.environ.get("DD_RESULTS_DIR")
    return Path(override) if override else scratch_results_dir()


def scratch_results_dir() -> Path:
    """A learner's own results: ``.cache/distill-deploy/results/`` (follows ``DD_CACHE_DIR``)."""
    return cache_dir() / "results"


def committed_results_dir() -> Path:
    """The tracked ``results/``: written by ``make execute`` and ``make experiments``; the
    grids and headline numbers the lessons, tests and docs *read* live here."""
    return repo_root() / "results"


def cache_dir() -> Path:
    """Models built on first use; ``DD_CACHE_DIR`` overrides ``.cache/distill-deploy``."""
    return Path(os.environ.get("DD_CACHE_DIR", repo_root() / ".cache" / "distill-deploy"))
