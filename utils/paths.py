"""Where the course keeps things: the repository root, data, results and the model cache."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout that holds ``utils/`` (the package is installed editable)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Committed, generated data (``data/``)."""
    return repo_root() / "data"


def results_dir() -> Path:
    """Headline numbers saved by notebooks; ``DD_RESULTS_DIR`` overrides ``results/``."""
    return Path(os.environ.get("DD_RESULTS_DIR", repo_root() / "results"))


def cache_dir() -> Path:
    """Models built on first use; ``DD_CACHE_DIR`` overrides ``.cache/distill-deploy``."""
    return Path(os.environ.get("DD_CACHE_DIR", repo_root() / ".cache" / "distill-deploy"))
