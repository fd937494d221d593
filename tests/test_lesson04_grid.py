"""Lesson 04's fidelity-vs-budget grid (scripts/experiments_04.py): the committed JSON has its
provenance and schema and was measured on the shipped teacher, the notebook's live student lands
within the grid's seeds, and ``--quick`` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _committed import load_committed

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "results" / "04_fidelity_grid.json"                 # committed by `make experiments`
LESSON = ROOT / "results" / "04_black_box_distillation.json"      # saved by the executed notebook
METRICS = ("top1_agreement", "kl", "tv", "greedy_exact_match", "score")


def _load(path: Path) -> dict:
    return load_committed(path, "run `python scripts/experiments_04.py` and execute "
                                "solutions/04_black_box_distillation.ipynb")


def _check_schema(grid: dict, *, min_seeds: int) -> None:
    prov = grid["provenance"]
    for key in ("command", "date", "git_commit", "machine", "cpu", "wall_seconds"):
        assert prov[key], key
    assert "experiments_04.py" in prov["command"]
    settings = grid["settings"]
    expected = {(s, g, q, seed) for s in settings["steps"] for g in settings["granularities"]
                for q in settings["budgets"] for seed in settings["seeds"]}
    assert {
        (r["steps"], r["granularity"], r["queries"], r["seed"]) for r in grid["runs"]
    } == expected
    assert len(grid["runs"]) == len(expected)  # no duplicates
    for run in grid["runs"]:
        assert all(0 <= run[m] <= 1 for m in METRICS if m != "kl") and run["kl"] >= 0
        assert run["train_seconds"] > 0 and run["student_params"] == grid["student"]["params"]
    for row in grid["summary"]:
        assert len(row["seeds"]) >= min_seeds
        mine = [
            r
            for r in grid["runs"]
            if (r["steps"], r["granularity"], r["queries"])
            == (row["steps"], row["granularity"], row["queries"])
        ]
        assert (
            abs(row["top1_agreement_mean"] - sum(r["top1_agreement"] for r in mine) / len(mine))
            < 1e-12
        )
    assert [h["seed"] for h in grid["harvests"]] == settings["seeds"]
    assert all(h["queries"] == max(settings["budgets"]) for h in grid["harvests"])


def test_committed_grid_has_provenance_schema_and_three_seeds():
    grid = _load(GRID)
    assert grid["provenance"]["quick"] is False, "the committed grid is a --quick smoke run"
    _check_schema(grid, min_seeds=3)
    assert len(grid["settings"]["budgets"]) >= 4 and set(grid["settings"]["granularities"]) == {
        "text",
        "topk",
    }
    assert grid["student"]["params"] * 10 < grid["teacher"]["params"]


def test_committed_grid_was_measured_on_the_shipped_teacher():
    from utils.extraction import teacher_fingerprint

    grid = _load(GRID)
    now = teacher_fingerprint()
    for key in ("teacher_sha256", "tokenizer_sha256", "data_manifest_sha256"):
        assert grid["teacher"][key] == now[key], (
            f"the committed grid is stale ({key} changed): "
            "re-run `python scripts/experiments_04.py`"
        )


def test_the_live_student_lands_within_the_grid_seeds():
    grid, lesson = _load(GRID), _load(LESSON)
    live = lesson["live"]
    assert lesson["fidelity_grid"]["same_teacher"] is True
    seeds = [r for r in grid["runs"] if (r["queries"], r["granularity"], r["steps"])
             == (live["queries"], live["granularity"], live["steps"])]
    assert seeds, f"the grid has no run of the live configuration {live}"
    slack = 0.02  # CPU kernels may differ a little between machines
    for metric in ("top1_agreement", "score"):
        values = [r[metric] for r in seeds]
        assert min(values) - slack <= live[metric] <= max(values) + slack, (
            metric,
            live[metric],
            values,
        )
    assert abs(lesson["teacher_score"] - grid["teacher"]["score"]) < 1e-9


def test_lesson_results_report_the_grid_means():
    grid, lesson = _load(GRID), _load(LESSON)
    rows = {(r["steps"], r["granularity"], r["queries"]): r for r in lesson["fidelity_vs_budget"]}
    assert len(rows) == len(grid["summary"])
    for row in grid["summary"]:
        mine = rows[(row["steps"], row["granularity"], row["queries"])]
        assert mine["source"] == "grid" and mine["seeds"] == row["seeds"]
        assert abs(mine["top1_agreement"] - row["top1_agreement_mean"]) < 1e-12


@pytest.mark.slow
def test_quick_grid_runs_end_to_end(tmp_path):
    out = tmp_path / "grid.json"
    env = {**os.environ, "DD_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "experiments_04.py"),
        "--quick",
        "--budgets",
        "3",
        "5",
        "--steps",
        "1",
        "--n-eval",
        "4",
        "--jobs",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grid = json.loads(out.read_text())
    _check_schema(grid, min_seeds=2)
    assert grid["provenance"]["quick"] is True and grid["eval"]["n"] == 4
    assert len(grid["runs"]) == 2 * 2 * 2 and len(grid["summary"]) == 4
    # one harvest per seed served every budget: the API answered max(budgets) queries per seed
    assert [h["queries"] for h in grid["harvests"]] == [5, 5]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic write


def test_the_script_rejects_a_single_seed_and_bad_budgets():
    script = str(ROOT / "scripts" / "experiments_04.py")
    proc = subprocess.run(
        [sys.executable, script, "--seeds", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "at least two different seeds" in proc.stderr
    proc = subprocess.run(
        [sys.executable, script, "--budgets", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "must be positive" in proc.stderr
