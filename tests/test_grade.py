"""The instructor's grader (``python -m utils.grade``) on small hand-made notebooks.

Five learners: one who did both exercises, one who did none, one whose notebook raises and
then hangs, one who handed in a file that is not a notebook, and one whose kernel dies. One
grading run executes them all (a kernel per notebook, a few seconds each); the other tests
read its rows.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from utils import grade as g
from utils.paths import repo_root

CHECK_DOUBLE = ('run_check("1.1", "double", double, '
                'lambda f: expect(f(2) == 4, "double(2) should be 4"))')
CHECK_SQUARE = ('run_check("1.2", "square", square, '
                'lambda f: expect(f(3) == 9, "square(3) should be 9: did you double?"))')
TIMEOUT = 6.0  # seconds per notebook: the hanging one is stopped after this


def _notebook(double_body: str, square_body: str, extra: list[str] | None = None):
    cells = [
        new_markdown_cell("# A tiny lesson"),
        new_code_cell("from utils.checks import expect, run_check, summary"),
        new_code_cell(f"# Exercise 1.1: double\ndef double(x):\n    {double_body}"),
        new_code_cell(CHECK_DOUBLE),
        new_code_cell(f"# Exercise 1.2: square\ndef square(x):\n    {square_body}"),
        new_code_cell(CHECK_SQUARE),
        *[new_code_cell(s) for s in (extra or [])],
        new_code_cell("print(summary())"),
    ]
    return new_notebook(cells=cells)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    todo = 'raise NotImplementedError("Exercise 1.1: double")'
    books = {
        "alice": _notebook("return 2 * x", "return x * x"),
        "bob": _notebook(todo, 'raise NotImplementedError("Exercise 1.2: square")'),
        # a wrong answer, a syntax error in exercise 1.2, then a cell that never ends
        "carol": _notebook("return x + 3", "return x *", extra=["1 / 0", "while True:\n    pass",
                                                               "print('never reached')"]),
    }
    # the kernel dies between the two exercises (as when memory runs out)
    gus = _notebook("return 2 * x", "return x * x")
    gus.cells.insert(4, new_code_cell("import os\nos._exit(1)"))
    books["gus"] = gus
    for who, nb in books.items():
        (root / who).mkdir()
        nbformat.write(nb, root / who / "tiny.ipynb")
    (root / "dave").mkdir()
    (root / "dave" / "tiny.ipynb").write_text("this is my essay, not a notebook\n")
    (root / "alice" / ".ipynb_checkpoints").mkdir()
    (root / "alice" / ".ipynb_checkpoints" / "tiny-checkpoint.ipynb").write_text("{}")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    start = time.monotonic()
    rows = g.grade([root], timeout=TIMEOUT)
    seconds = time.monotonic() - start
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return {"rows": rows, "seconds": seconds, "unchanged": before == after, "root": root}


def _by(rows, learner):
    return {r.exercise or r.name: r for r in rows if r.learner == learner}


def test_done_notebook_passes(graded):
    alice = _by(graded["rows"], "alice")
    assert alice["1.1"].status == "passed" and alice["1.1"].name == "double"
    assert alice["1.2"].status == "passed"
    assert alice[g.NOTEBOOK_ROW].status == "ran"
    assert alice[g.SUMMARY_ROW].status == "2/2 passed"


def test_not_done_notebook(graded):
    bob = _by(graded["rows"], "bob")
    assert bob["1.1"].status == "not done" and bob["1.2"].status == "not done"
    assert bob[g.NOTEBOOK_ROW].status == "ran"  # NotImplementedError is caught by the checks
    assert bob[g.SUMMARY_ROW].status == "0/2 passed"
    assert "not done 2" in bob[g.SUMMARY_ROW].detail


def test_raising_and_hanging_notebook(graded):
    carol = _by(graded["rows"], "carol")
    assert carol["1.1"].status == "failed"
    assert "double(2) should be 4" in carol["1.1"].detail
    # the syntax error leaves `square` undefined: the exercise is failed with the first error
    assert carol["1.2"].status == "failed"
    assert "SyntaxError" in carol["1.2"].detail, carol["1.2"]
    nb_row = carol[g.NOTEBOOK_ROW]
    assert nb_row.status == "timeout" and f"{TIMEOUT:g} s" in nb_row.detail
    assert carol[g.SUMMARY_ROW].status == "0/2 passed"
    assert "timeout 1" in carol[g.SUMMARY_ROW].detail


def test_dead_kernel_is_reported_and_later_exercises_not_run(graded):
    gus = _by(graded["rows"], "gus")
    assert gus[g.NOTEBOOK_ROW].status == "kernel died", gus[g.NOTEBOOK_ROW]
    assert "cell 4" in gus[g.NOTEBOOK_ROW].detail
    assert gus["1.1"].status == "passed"
    assert gus["1.2"].status == "not run" and "kernel died" in gus["1.2"].detail


def test_not_a_notebook_gets_a_row(graded):
    dave = _by(graded["rows"], "dave")
    assert dave[g.NOTEBOOK_ROW].status == "not a notebook"
    assert "Jupyter notebook" in dave[g.NOTEBOOK_ROW].detail
    assert dave[g.SUMMARY_ROW].status == "0/0 passed"


def test_grading_is_bounded_and_touches_nothing(graded):
    rows = graded["rows"]
    assert [r.learner for r in rows if r.name == g.SUMMARY_ROW] == ["alice", "bob", "carol",
                                                                     "dave", "gus"]
    assert not any("checkpoint" in r.notebook for r in rows)  # checkpoints are skipped
    assert graded["unchanged"]  # the learners' files are executed in a copy
    assert graded["seconds"] < 5 * TIMEOUT + 60, graded["seconds"]


def test_csv_round_trip(graded, tmp_path):
    out = g.write_csv(graded["rows"], tmp_path / "grades.csv")
    with out.open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["learner", "notebook", "exercise", "name", "status", "detail"]
    assert len(table) == len(graded["rows"])
    assert {r["status"] for r in table if r["name"] not in (g.NOTEBOOK_ROW, g.SUMMARY_ROW)} \
        <= set(g.EXERCISE_STATUSES)


def test_check_lines_are_parsed_last_one_wins():
    nb = new_notebook(cells=[new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output(
        "stream", name="stdout",
        text="[FAIL] Exercise 2.1 (mask_labels): the prompt is not masked\n"
             "noise\n[PASS] Exercise 2.1 (mask_labels): all checks passed.\n"
             "  [ERROR] Exercise 2.2 (ppl): your function raised KeyError: 'x'\n")]
    found = g.check_results(nb)
    assert found["2.1"][0] == "passed"
    assert found["2.2"] == ("failed", "ppl", "error: your function raised KeyError: 'x'")


def test_expected_exercises_come_from_the_solution():
    lesson = repo_root() / "lessons" / "01_distillation_theory.ipynb"
    expected = g.expected_exercises(lesson.name, nbformat.read(lesson, as_version=4))
    assert [e.label for e in expected] == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert expected[1].name == "kd_loss"
    assert expected[4].name == "choose_distillation_settings"  # the open experiment


def test_open_experiments_are_take_home_in_the_agenda():
    lessons = {lt.number: lt for lt in g.lesson_times()}
    lesson01 = lessons["01"]
    assert (lesson01.exercises, lesson01.experiments) == (4, 1)  # 1.5 is counted apart
    assert f"| {lesson01.title} |" in g.schedule_markdown()
    assert "4 + 1 take-home" in g.schedule_markdown()


def test_missing_path_gets_a_row(tmp_path):
    rows = g.grade([tmp_path / "nobody" / "01.ipynb"], timeout=5)
    assert rows[0].status == "not found"


def test_cli_writes_the_csv(tmp_path):
    (tmp_path / "erin").mkdir()
    (tmp_path / "erin" / "bad.ipynb").write_text(json.dumps({"cells": "not a list"}))
    out = tmp_path / "grades.csv"
    proc = subprocess.run([sys.executable, "-m", "utils.grade", str(tmp_path / "erin"),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "erin: 0/0 passed" in proc.stdout
    assert "not a notebook" in out.read_text()
    proc = subprocess.run([sys.executable, "-m", "utils.grade"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "give the notebooks" in proc.stderr


@pytest.mark.slow
def test_real_lesson_smoke(tmp_path):
    """Lesson 00 as a learner hands it in (its exercise not done), 10-25 s."""
    (tmp_path / "frank").mkdir()
    src = repo_root() / "lessons" / "00_setup_and_map.ipynb"
    (tmp_path / "frank" / src.name).write_bytes(src.read_bytes())
    rows = _by(g.grade([tmp_path / "frank"], timeout=120), "frank")
    assert rows[g.NOTEBOOK_ROW].status == "ran", rows[g.NOTEBOOK_ROW]
    assert rows["0.1"].status == "not done" and rows["0.1"].name == "bytes_for"
    assert not (tmp_path / "frank" / "results").exists()


def test_schedule_fits_and_cites_the_timings():
    lessons = g.lesson_times()
    assert lessons and all(lt.low_minutes < lt.high_minutes for lt in lessons)
    assert all(lt.low_minutes > lt.run_seconds / 60 * g.RUN_FACTOR[0] for lt in lessons)
    text = g.schedule_markdown()
    assert "docs/TIMINGS.md" in text and "**Two days**" in text and "**One day**" in text
    for lt in lessons:
        assert lt.title in text
    slots = g.plan_days(lessons, 2)
    assert [s[3] for s in slots][0] == lessons[0].notebook
    with pytest.raises(ValueError, match="do not fit"):
        g.plan_days(lessons * 5, 1)


def _section(text: str, begin: str, end: str) -> str:
    assert begin in text and end in text, f"docs/INSTRUCTORS.md lost its markers {begin!r}"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_committed_instructors_doc_is_the_generated_one():
    doc = (repo_root() / "docs" / "INSTRUCTORS.md").read_text(encoding="utf-8")
    fix = "run `python -m utils.grade --instructors-doc --write`"
    assert _section(doc, g.DOCTOR_BEGIN, g.DOCTOR_END) == _section(
        g.doctor_markdown(), g.DOCTOR_BEGIN, g.DOCTOR_END), f"utils/doctor.py changed: {fix}"
    if _section(doc, g.SCHEDULE_BEGIN, g.SCHEDULE_END) != _section(
            g.schedule_markdown(), g.SCHEDULE_BEGIN, g.SCHEDULE_END):
        pytest.skip(f"docs/TIMINGS.md changed since the agenda was generated: {fix}")


def test_doctor_problems_cover_every_check_that_can_fail():
    rows = g.doctor_problems()
    assert {r.status for r in rows} == {"fail", "warn"} and all(r.fix for r in rows)
    checked = {r.check.split()[0] for r in rows}
    for label in ("Python", "package", "torch", "CPU", "RAM", "disk", "tiny", "offline",
                  "Jupyter", "course", "teacher"):
        assert label in checked, label


def test_write_instructors_doc_needs_its_markers(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "INSTRUCTORS.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        g.write_instructors_doc(tmp_path)


def test_timings_parser_rejects_garbage():
    with pytest.raises(ValueError, match="make execute"):
        g.parse_timings("nothing here")
    assert g.parse_timings("| `01_x.ipynb` | 1 min 31 s | warm | 2026-01-01 | abc | m |\n") \
        == {"01_x.ipynb": (91.0, "2026-01-01")}
    assert Path(g.__file__).name == "grade.py"
