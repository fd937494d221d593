"""Reading a committed result file in a test, or skipping with the command that makes it.

Results that take minutes to an hour to produce (``make experiments``, executed notebooks) are
committed; a checkout without one skips the tests that read it and says how to produce it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.paths import repo_root


def load_committed(path: Path, fix: str) -> dict:
    """The JSON at ``path``; skip the calling test, naming ``fix``, when it is not there."""
    if not path.is_file():
        try:
            shown = path.relative_to(repo_root())
        except ValueError:
            shown = path
        pytest.skip(f"{shown} is not committed yet: {fix}")
    return json.loads(path.read_text(encoding="utf-8"))
