"""Lesson 03's experiment grid: the committed JSON has provenance and the expected schema, the
notebook's live point falls within the grid's seed spread for the same configuration, and
``scripts/experiments_03.py --quick`` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _committed import load_committed

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "results" / "03_grid.json"       # committed by `make experiments`
LESSON = ROOT / "results" / "03_white_box_distillation.json"  # saved by the executed notebook
RUN_KEYS = {"size", "method", "seed", "steps", "student_params", "score", "token_accuracy",
            "perplexity", "train_seconds"}
SUMMARY_KEYS = {"size", "method", "student_params", "steps", "seeds", "scores", "score_mean",
                "score_std", "token_accuracy_mean", "train_seconds"}


def _load(path: Path) -> dict:
    return load_committed(path, "run `make experiments` (scripts/experiments_03.py) and execute "
                                "solutions/03_white_box_distillation.ipynb")


def _check_grid_schema(grid: dict, *, min_seeds: int) -> None:
    prov = grid["provenance"]
    for key in (
        "command",
        "machine",
        "cpu",
        "date",
        "git_commit",
        "torch",
        "jobs",
        "threads_per_job",
    ):
        assert prov.get(key) not in (None, ""), f"provenance lacks {key}"
    assert "experiments_03.py" in prov["command"]
    assert {"score", "eval_subset", "teacher", "settings", "runs", "summary"} <= set(grid)
    assert 0 < grid["teacher"]["score"] <= 1 and grid["teacher"]["params"] > 0
    for run in grid["runs"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert 0 <= run["score"] <= 1 and 0 <= run["token_accuracy"] <= 1
        assert run["steps"] == grid["settings"]["steps"] and run["train_seconds"] > 0
    for row in grid["summary"]:
        assert SUMMARY_KEYS <= set(row), SUMMARY_KEYS - set(row)
        assert len(row["seeds"]) >= min_seeds and len(row["scores"]) == len(row["seeds"])
        assert min(row["scores"]) <= row["score_mean"] <= max(row["scores"])


def test_committed_grid_has_provenance_and_the_expected_schema():
    grid = _load(GRID)
    assert grid["provenance"]["quick"] is False, "the committed grid is a --quick smoke run"
    assert not grid["provenance"].get("partial"), (
        f"the committed grid is partial ({grid['provenance']['command']}; missing: "
        f"{grid.get('missing')}): run the full `python scripts/experiments_03.py`")
    _check_grid_schema(grid, min_seeds=3)
    configs = {(r["size"], r["method"]) for r in grid["summary"]}
    assert {("student-xs", m) for m in ("sft", "forward_kl", "reverse_kl", "on_policy")} <= configs
    assert len({r["size"] for r in grid["summary"]}) >= 3  # the frontier needs three sizes
    params = {r["size"]: r["student_params"] for r in grid["summary"]}
    assert params["student-xs"] * 8 <= grid["teacher"]["params"]


def test_the_live_point_falls_within_the_grid_seed_spread():
    grid, lesson = _load(GRID), _load(LESSON)
    live = lesson["live"]
    assert abs(lesson["teacher_score"] - grid["teacher"]["score"]) < 1e-9, (
        "the lesson and the grid were scored against different teachers: re-run "
        "`make experiments`, then re-execute the notebook")
    row = next(
        (r for r in grid["summary"] if r["size"] == live["size"] and r["method"] == live["method"]),
        None,
    )
    assert row is not None, f"the grid has no {live['size']} {live['method']} runs"
    assert live["steps"] == row["steps"], "the live run and the grid use different step budgets"
    slack = 1.0 / grid["eval_subset"]["n"]  # one answer: CPU kernels may differ between machines
    assert min(row["scores"]) - slack <= live["score_mean"] <= max(row["scores"]) + slack, (
        f"live score {live['score_mean']:.3f} is outside the grid's seeds {row['scores']}")
    tok = [r["token_accuracy"] for r in grid["runs"]
           if r["size"] == live["size"] and r["method"] == live["method"]]
    assert min(tok) - 0.01 <= live["token_accuracy_mean"] <= max(tok) + 0.01


def test_lesson_results_runs_schema():
    lesson = _load(LESSON)
    assert 0 < lesson["teacher_score"] <= 1
    for run in lesson["runs"]:
        assert {"student_params", "method", "score_mean", "score_std", "seeds",
                "train_seconds"} <= set(run)
    assert sum(r["source"] == "live" for r in lesson["runs"]) == 1
    targets = lesson["targets"]
    assert isinstance(targets["student_1_8_keeps_90pct"]["met"], bool)
    for metric in ("exact_match", "token_accuracy"):  # None only when no grid was committed
        assert targets["distillation_beats_sft_by_more_than_seed_spread"][metric]["met"] in (
            True,
            False,
            None,
        )


@pytest.mark.slow
def test_quick_grid_runs_end_to_end(tmp_path):
    out = tmp_path / "grid.json"
    env = {**os.environ, "DD_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "experiments_03.py"), "--quick", "--steps", "1",
           "--sizes", "student-xxs", "--n-eval", "10", "--jobs", "1", "--out", str(out),
           "--ship", "--ship-dir", str(tmp_path / "students")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grid = json.loads(out.read_text())
    _check_grid_schema(grid, min_seeds=2)
    assert grid["provenance"]["quick"] is True and "--quick" in grid["provenance"]["command"]
    assert {(r["size"], r["method"]) for r in grid["summary"]} == {("student-xxs", "sft"),
                                                                   ("student-xxs", "forward_kl")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic write
    # --ship: each configuration's first seed, loadable as a plain folder, with a card
    shipped = sorted(p.name for p in (tmp_path / "students").iterdir())
    assert shipped == ["student-xxs-forward-kl", "student-xxs-sft"]
    from utils.models import load_model, verify_folder

    for name in shipped:
        folder = tmp_path / "students" / name
        assert verify_folder(folder) is None
        card = json.loads((folder / "model_card.json").read_text())
        assert card["seed"] == 0 and card["steps"] == 1 and card["metrics"]["n_records"] == 60
        assert (card["teacher_sha256"] is None) == (card["method"] == "sft")
        assert "shipped student" in (folder / "model_card.md").read_text().lower()
        model, _ = load_model(folder, verbose=False)
        assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_the_script_rejects_a_single_seed():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "experiments_03.py"), "--seeds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "at least two different seeds" in proc.stderr


LONG_GRID = ROOT / "results" / "03_grid_long.json"  # committed by `make students`


def test_committed_long_grid_compares_sft_and_forward_kl_over_three_seeds():
    grid = _load(LONG_GRID)
    assert grid["provenance"]["quick"] is False and "--ship" in grid["provenance"]["command"]
    _check_grid_schema(grid, min_seeds=3)
    assert {(r["size"], r["method"]) for r in grid["summary"]} == {("student-xs", "sft"),
                                                                   ("student-xs", "forward_kl")}
    assert (
        grid["settings"]["steps"] > _load(GRID)["settings"]["steps"]
    )  # longer than the lesson's grid
    assert grid["teacher"]["score"] == pytest.approx(
        _load(GRID)["teacher"]["score"]
    )  # the same teacher


def test_the_lesson_reproduces_the_shipped_students_scores():
    lesson, grid = _load(LESSON), _load(LONG_GRID)
    shipped = lesson["shipped_students"]
    assert set(shipped) == {"student-xs-sft", "student-xs-forward-kl"}
    slack = 1.0 / grid["eval_subset"]["n"]
    for name, s in shipped.items():
        assert abs(s["live_score"] - s["card_score"]) <= slack, name
        method = "sft" if name.endswith("sft") else "forward_kl"
        seed0 = next(r for r in grid["runs"] if r["method"] == method and r["seed"] == 0)
        assert s["card_score"] == pytest.approx(seed0["score"]), name
    assert sum(r["source"] == "grid-long" for r in lesson["runs"]) == 2


FRONTIER = ROOT / "results" / "03_frontier_long.json"  # committed by `make frontier`


def test_committed_frontier_adds_the_other_sizes_at_the_long_budget():
    grid, long_grid = _load(FRONTIER), _load(LONG_GRID)
    assert grid["provenance"]["quick"] is False
    _check_grid_schema(grid, min_seeds=2)
    assert {(r["size"], r["method"]) for r in grid["summary"]} == {
        (size, method) for size in ("student-xxs", "student-s") for method in ("sft", "forward_kl")}
    # the same budget, recipe, teacher and evaluation subset as the long grid of student-xs
    assert grid["settings"] == {**long_grid["settings"], "seeds": grid["settings"]["seeds"]}
    assert grid["teacher"] == long_grid["teacher"]
    assert grid["eval_subset"] == long_grid["eval_subset"]
    params = {r["size"]: r["student_params"] for r in grid["summary"] + long_grid["summary"]}
    assert params["student-xxs"] < params["student-xs"] < params["student-s"]


def test_the_lessons_frontier_is_the_committed_grids():
    lesson = _load(LESSON)
    points = lesson["frontier_long"]["points"]
    rows = {(r["size"], r["method"]): r for g in (_load(FRONTIER), _load(LONG_GRID))
            for r in g["summary"]}
    assert {(p["size"], p["method"]) for p in points} == set(rows)
    for p in points:
        r = rows[(p["size"], p["method"])]
        assert p["kept_mean"] == pytest.approx(r["score_mean"] / lesson["teacher_score"])
    gaps = lesson["frontier_long"]["kd_minus_sft_kept"]
    assert set(gaps) == {"student-xxs", "student-xs", "student-s"}
