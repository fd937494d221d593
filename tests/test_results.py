"""Where notebooks save their numbers: a learner's run never changes the tracked results/.

``save_results`` writes to a scratch folder that git ignores unless ``DD_RESULTS_DIR`` is set
(``make execute`` sets it to ``results/``, ``make notebooks`` to a temporary folder); reading
falls back to the committed file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from utils.paths import (
    cache_dir,
    committed_results_dir,
    repo_root,
    results_dir,
    scratch_results_dir,
)
from utils.results import load_results, save_results

LESSON = "00_setup_and_map"  # a real lesson name whose results/ file is committed


def _fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_default_is_a_scratch_folder_that_git_ignores(monkeypatch):
    monkeypatch.delenv("DD_RESULTS_DIR", raising=False)
    monkeypatch.delenv("DD_CACHE_DIR", raising=False)
    expected = repo_root() / ".cache" / "distill-deploy" / "results"
    assert results_dir() == scratch_results_dir() == expected
    assert committed_results_dir() == repo_root() / "results"
    probe = expected.relative_to(repo_root()) / f"{LESSON}.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=repo_root())
    assert ignored.returncode == 0, f"{probe} is not ignored by git: a learner's run would show"
    monkeypatch.setenv("DD_RESULTS_DIR", "")  # empty counts as unset
    assert results_dir() == expected
    monkeypatch.setenv("DD_RESULTS_DIR", "/somewhere/else")
    assert str(results_dir()) == "/somewhere/else"


def test_a_learners_run_leaves_the_committed_results_alone(tmp_path, monkeypatch, capsys):
    """What the last cell of lesson 00 does, with the environment `make lab` gives a kernel."""
    committed = committed_results_dir() / f"{LESSON}.json"
    assert committed.exists(), f"{committed} should be committed"
    before = committed.read_bytes(), _fingerprint(committed)
    monkeypatch.delenv("DD_RESULTS_DIR", raising=False)
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))  # not the learner's real cache
    try:
        path = save_results(LESSON, {"checks_passed": 3, "seconds": 1.5})
        assert _fingerprint(committed) == before[1], "save_results rewrote the tracked results/"
    finally:
        if committed.read_bytes() != before[0]:  # restore it so one failure does not dirty git
            committed.write_bytes(before[0])
    assert path == tmp_path / "cache" / "results" / f"{LESSON}.json"
    assert path.parent == cache_dir() / "results"
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["checks_passed"] == 3 and "provenance" in saved
    out = capsys.readouterr().out
    assert str(path) in out and "make execute" in out  # the learner is told where it went
    # A later lesson reading it sees the learner's own run.
    assert load_results(LESSON)["checks_passed"] == 3


def test_an_explicit_results_dir_is_used_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DD_RESULTS_DIR", str(tmp_path))  # make execute / make notebooks
    path = save_results(LESSON, {"x": 1})
    assert path == tmp_path / f"{LESSON}.json" and path.exists()
    assert capsys.readouterr().out == ""


def test_load_falls_back_to_the_committed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_RESULTS_DIR", str(tmp_path / "empty"))
    committed = json.loads((committed_results_dir() / f"{LESSON}.json").read_text("utf-8"))
    assert load_results(LESSON) == committed
    with pytest.raises(FileNotFoundError, match="make execute"):
        load_results("99_no_such_lesson")
