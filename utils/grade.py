"""Grade learners' notebooks: run each one and record which exercises pass their checks.

    python -m utils.grade submissions/ --out grades.csv          # one folder per learner
    python -m utils.grade alice/01_distillation_theory.ipynb --timeout 300
    python -m utils.grade --instructors-doc [--write]            # docs/INSTRUCTORS.md's tables

Each notebook is copied to a temporary folder and executed there top to bottom with the
course's kernel, against a private course cache (``DD_CACHE_DIR``, a temporary folder unless
``--cache-dir``) and a scratch results folder, offline: nothing in the repository changes.
Every cell runs even after an error (a learner's later exercises still count). The grade of an
exercise is what its check cell printed (``[PASS]``, ``[TODO]``, ``[FAIL]``, ``[ERROR]``, see
:func:`utils.checks.run_check`); an exercise whose check never printed is ``failed`` when its
cell raised, else ``not run``. Which exercises a notebook should have comes from the solution of
the same name (:func:`utils.lessons.exercises_of`), from its ``# Exercise N.M`` comments, and
from the checks it printed.

The CSV has one row per notebook and exercise, one ``(notebook)`` row per notebook (ran, raised,
timeout, kernel died, not a notebook, ...) and one ``(summary)`` row per learner. The learner
is the name of the folder that holds the notebook. Grading is not a sandbox: the learner's code
runs with the instructor's rights, so grade on a machine (or account) you can afford to lose.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import nbformat

from utils.io import atomic_write_text
from utils.lessons import exercises_of
from utils.paths import repo_root

DEFAULT_TIMEOUT = 900.0  # seconds per notebook: the longest lesson runs in about 3 min cold
EXERCISE_STATUSES = ("passed", "not done", "failed", "not run")
NOTEBOOK_STATUSES = ("ran", "raised", "timeout", "kernel died", "not a notebook", "not found",
                     "error")
_CHECK_LINE = re.compile(
    r"^\s*\[(PASS|TODO|FAIL|ERROR)\] Exercise (\d+(?:\.\w+)*) \(([^)]*)\):\s?(.*)$")
_STATUS = {"PASS": "passed", "TODO": "not done", "FAIL": "failed", "ERROR": "failed"}
_EXERCISE_COMMENT = re.compile(r"^\s*#\s*Exercise\s+(\d+\.\d+)\s*:?\s*(\w+)?", re.MULTILINE)
_DEF = re.compile(r"^def\s+(\w+)\s*\(", re.MULTILINE)
NOTEBOOK_ROW = "(notebook)"
SUMMARY_ROW = "(summary)"


@dataclass(frozen=True)
class GradeRow:
    """One line of the grades CSV."""

    learner: str
    notebook: str
    exercise: str
    name: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class _Expected:
    label: str
    name: str


def _first_line(text: object, limit: int = 200) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- finding notebooks and their exercises ---------------------------------------------------

def find_notebooks(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The notebooks to grade: files as given (whatever their suffix, so a file that is not a
    notebook gets its row), folders searched for ``*.ipynb`` (checkpoints and hidden folders
    skipped). A path that does not exist is kept: it gets a ``not found`` row."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(
                f for f in p.rglob("*.ipynb")
                if not any(part.startswith(".") for part in f.relative_to(p).parts[:-1])
                and f.is_file())
        else:
            found.append(p)
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def learner_of(path: Path) -> str:
    """The learner a notebook belongs to: the name of its folder (one folder per learner)."""
    return path.resolve().parent.name or "."


def expected_exercises(name: str, nb: nbformat.NotebookNode | None = None,
                       solutions: Path | None = None) -> list[_Expected]:
    """Exercises a notebook called ``name`` should hold: the solution's, then any
    ``# Exercise N.M: fn`` comment in ``nb``'s code cells that the solution does not have."""
    solutions = solutions if solutions is not None else repo_root() / "solutions"
    out: list[_Expected] = []
    sol = solutions / name
    if sol.is_file():
        try:
            out = [_Expected(e.label, e.name) for e in exercises_of(sol)]
        except Exception:  # noqa: BLE001 - a broken solution must not stop the grading
            out = []
    labels = {e.label for e in out}
    for cell in (nb.cells if nb is not None else []):
        if cell.get("cell_type") != "code":
            continue
        source = str(cell.get("source", ""))
        for label, fn in _EXERCISE_COMMENT.findall(source):
            if label not in labels:
                defs = _DEF.findall(source)
                out.append(_Expected(label, fn or (defs[0] if defs else "")))
                labels.add(label)
    return out


# --- reading an executed notebook -----------------------------------------------------------

def check_results(nb: nbformat.NotebookNode) -> dict[str, tuple[str, str, str]]:
    """``{label: (status, name, message)}`` from the check lines the cells printed.

    The last line printed for an exercise wins (a learner who fixed an answer and re-ran its
    check, or the lesson's closing ``summary()``).
    """
    found: dict[str, tuple[str, str, str]] = {}
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") != "stream" or out.get("name") != "stdout":
                continue
            for line in str(out.get("text", "")).splitlines():
                if m := _CHECK_LINE.match(line):
                    mark, label, name, message = m.groups()
                    found[label] = (_STATUS[mark], name,
                                    message if mark == "PASS" else
                                    ("error: " if mark == "ERROR" else "") + message)
    return found


def _cell_error(cell: nbformat.NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename', 'Error')}: {_first_line(out.get('evalue', ''))}"
    return None


def _error_near(nb: nbformat.NotebookNode, fn: str, label: str) -> str | None:
    """The error of the cell that defines exercise ``label`` (function ``fn``) or of the code
    cell after it (its check), if either raised."""
    code = [(i, c) for i, c in enumerate(nb.cells) if c.get("cell_type") == "code"]
    for k, (_, cell) in enumerate(code):
        source = str(cell.get("source", ""))
        defines = (fn and re.search(rf"^\s*def\s+{re.escape(fn)}\s*\(", source, re.MULTILINE)) \
            or re.search(rf"#\s*Exercise\s+{re.escape(label)}\b", source)
        if not defines:
            continue
        for j, other in code[k:k + 2]:
            if err := _cell_error(other):
                return f"cell {j} raised {err}"
    return None


# --- running one notebook ---------------------------------------------------------------------

def _kernel_env(cache: Path, scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DD_CACHE_DIR": str(cache),             # private: never the instructor's own cache
        "DD_RESULTS_DIR": str(scratch / "results"),  # never the committed results/
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    return env


def grade_notebook(path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT,
                   cache_dir: str | os.PathLike | None = None, learner: str | None = None,
                   solutions: Path | None = None, executed_dir: Path | None = None,
                   kernel_name: str = "python3") -> list[GradeRow]:
    """Execute one notebook in a temporary copy and return its rows (never raises).

    ``timeout`` bounds the whole notebook (seconds, kernel start excluded); the cell running
    when it runs out is interrupted and the exercises after it are ``not run``.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    path = Path(path)
    who = learner if learner is not None else learner_of(path)

    def notebook_row(status: str, detail: str) -> GradeRow:
        return GradeRow(who, path.name, "", NOTEBOOK_ROW, status, detail)

    if not path.exists():
        return [notebook_row("not found", f"{path} does not exist")]
    try:
        nb = nbformat.read(path, as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("it has no list of cells")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not raised
        rows = [notebook_row("not a notebook",
                             f"could not read it as a Jupyter notebook: {type(exc).__name__}: "
                             f"{_first_line(exc)}")]
        return rows + [GradeRow(who, path.name, e.label, e.name, "not run",
                                "the file is not a readable notebook")
                       for e in expected_exercises(path.name, None, solutions)]
    expected = expected_exercises(path.name, nb, solutions)

    started = time.monotonic()
    clock: dict[str, float] = {}  # the deadline starts with the first cell, after kernel start
    current = {"index": None}
    outcome, detail = "ran", ""
    with tempfile.TemporaryDirectory(prefix="dd-grade-") as tmp:
        work = Path(tmp)
        private = Path(cache_dir) if cache_dir is not None else work / "cache"
        shutil.copy2(path, work / path.name)  # the learner's file itself is never touched

        def on_cell_start(cell: object, cell_index: int) -> None:
            current["index"] = cell_index
            clock.setdefault("deadline", time.monotonic() + timeout)

        def time_left(cell: object) -> int:
            left = clock.get("deadline", time.monotonic() + timeout) - time.monotonic()
            return max(1, math.ceil(left))

        client = NotebookClient(
            nb, kernel_name=kernel_name, allow_errors=True, shutdown_kernel="immediate",
            startup_timeout=120, record_timing=False, interrupt_on_timeout=False,
            timeout_func=time_left,
            on_cell_start=on_cell_start, resources={"metadata": {"path": str(work)}})
        try:
            # the kernel's own stderr (ZMQ notices, a learner's warnings) stays out of the
            # instructor's terminal; what a cell writes to stderr is in the notebook anyway
            client.execute(env=_kernel_env(private, work), stderr=subprocess.DEVNULL)
        except CellTimeoutError:
            outcome = "timeout"
            detail = (f"stopped after {timeout:g} s (the per-notebook limit) in cell "
                      f"{current['index']}: an endless loop, or raise --timeout")
        except DeadKernelError as exc:
            outcome = "kernel died"
            detail = (f"the kernel died in cell {current['index']} ({_first_line(exc)}): out of "
                      "memory, or the code exited the process")
        except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot start
            outcome = "error"
            detail = f"could not run it: {type(exc).__name__}: {_first_line(exc)}"
    seconds = time.monotonic() - started
    if executed_dir is not None:
        try:
            atomic_write_text(Path(executed_dir) / who / path.name, nbformat.writes(nb))
        except Exception:  # noqa: BLE001 - a copy for the instructor is optional
            pass

    errors = [(i, e) for i, c in enumerate(nb.cells) if c.get("cell_type") == "code"
              and (e := _cell_error(c))]
    if outcome == "ran" and errors:
        outcome = "raised"
        i, e = errors[0]
        detail = f"{len(errors)} cell(s) raised; first: cell {i} {e}"
    detail = f"{detail}; {seconds:.0f} s" if detail else f"{seconds:.0f} s"

    checked = check_results(nb)
    rows = [notebook_row(outcome, detail)]
    labels = [e.label for e in expected] + [k for k in checked if k not in
                                             {e.label for e in expected}]
    names = {e.label: e.name for e in expected}
    for label in labels:
        if label in checked:
            status, name, message = checked[label]
            rows.append(GradeRow(who, path.name, label, names.get(label) or name, status,
                                 "" if status == "passed" else _first_line(message)))
            continue
        name = names.get(label, "")
        if err := _error_near(nb, name, label):
            rows.append(GradeRow(who, path.name, label, name, "failed", err))
        elif outcome in ("timeout", "kernel died", "error"):
            rows.append(GradeRow(who, path.name, label, name, "not run",
                                 f"the notebook stopped first ({outcome})"))
        else:
            rows.append(GradeRow(who, path.name, label, name, "not run",
                                 "its check printed nothing: was the check cell removed?"))
    return rows


# --- many notebooks -----------------------------------------------------------------------

def summarize(rows: Sequence[GradeRow]) -> list[GradeRow]:
    """One ``(summary)`` row per learner: exercises passed out of those expected."""
    out = []
    for who in dict.fromkeys(r.learner for r in rows):
        mine = [r for r in rows if r.learner == who]
        ex = [r for r in mine if r.name not in (NOTEBOOK_ROW, SUMMARY_ROW)]
        nbs = [r for r in mine if r.name == NOTEBOOK_ROW]
        counts = ", ".join(f"{s} {n}" for s in EXERCISE_STATUSES
                           if (n := sum(r.status == s for r in ex)))
        trouble = ", ".join(f"{s} {n}" for s in NOTEBOOK_STATUSES[1:]
                            if (n := sum(r.status == s for r in nbs)))
        passed = sum(r.status == "passed" for r in ex)
        out.append(GradeRow(who, "(all)", "", SUMMARY_ROW, f"{passed}/{len(ex)} passed",
                            f"{counts or 'no exercises'}; {len(nbs)} notebook(s)"
                            + (f" ({trouble})" if trouble else "")))
    return out


def grade(paths: Iterable[str | os.PathLike], *, timeout: float = DEFAULT_TIMEOUT,
          cache_dir: str | os.PathLike | None = None, solutions: Path | None = None,
          executed_dir: Path | None = None, progress: bool = False) -> list[GradeRow]:
    """Grade every notebook under ``paths``: rows grouped by learner, each learner's
    ``(summary)`` row after their notebooks. One private cache serves the whole run."""
    notebooks = find_notebooks(paths)
    by_learner: dict[str, list[GradeRow]] = {}
    with tempfile.TemporaryDirectory(prefix="dd-grade-cache-") as shared:
        cache = Path(cache_dir) if cache_dir is not None else Path(shared)
        for k, nb_path in enumerate(notebooks, 1):
            who = learner_of(nb_path)
            if progress:
                print(f"[{k}/{len(notebooks)}] {who}/{nb_path.name} ...", flush=True)
            rows = grade_notebook(nb_path, timeout=timeout, cache_dir=cache, learner=who,
                                  solutions=solutions, executed_dir=executed_dir)
            if progress:
                print(f"    {rows[0].status}: {rows[0].detail}", flush=True)
            by_learner.setdefault(who, []).extend(rows)
    out: list[GradeRow] = []
    for who in sorted(by_learner):
        out += by_learner[who] + summarize(by_learner[who])
    return out


def write_csv(rows: Sequence[GradeRow], path: str | os.PathLike) -> Path:
    """Write the rows (with a header) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f.name for f in fields(GradeRow)])
    writer.writerows(astuple(r) for r in rows)
    return atomic_write_text(path, buf.getvalue())


# --- the workshop agenda from measured times --------------------------------------------------

READING_WPM = 200            # words of markdown read per minute (an assumption, not measured)
CODE_LINES_PER_MIN = 15      # lines of code read per minute (an assumption)
RUN_FACTOR = (3, 5)          # a learner runs the cells 3 to 5 times: re-runs, fixes, retries
MINUTES_PER_EXERCISE = (5, 10)
DOC_COMMAND = "python -m utils.grade --instructors-doc --write"
SCHEDULE_BEGIN = f"<!-- BEGIN GENERATED agenda: {DOC_COMMAND} -->"
SCHEDULE_END = "<!-- END GENERATED agenda -->"
DOCTOR_BEGIN = f"<!-- BEGIN GENERATED doctor: {DOC_COMMAND} -->"
DOCTOR_END = "<!-- END GENERATED doctor -->"
# A day: teaching blocks (start, end) with the breaks between them.
DAY_BLOCKS = (("09:00", "10:30"), ("10:45", "12:30"), ("13:30", "15:00"), ("15:15", "17:00"))
# One day: the lessons taught live (the rest is self-study). The shipped teacher and students
# make 03, 05 and 07 independent of 02, 04 and 06.
ONE_DAY_LIVE = ("00", "01", "03", "05", "07")
MIN_START_MINUTES = 20  # a lesson starts only with this much of the block left


@dataclass(frozen=True)
class LessonTime:
    """A lesson's measured run time and the learner-time estimate derived from it."""

    number: str
    notebook: str
    title: str
    run_seconds: float
    reading_minutes: float
    exercises: int
    low_minutes: float
    high_minutes: float
    experiments: int = 0  # open experiments among the exercises: take-home, not in the plan

    @property
    def plan_minutes(self) -> int:
        """The time to plan for: the middle of the estimate, rounded up to 5 minutes."""
        return int(5 * math.ceil((self.low_minutes + self.high_minutes) / 2 / 5))


def parse_timings(text: str) -> dict[str, tuple[float, str]]:
    """``{notebook: (seconds, date)}`` from docs/TIMINGS.md's table."""
    out = {}
    for m in re.finditer(r"^\| `(\d\d_[^`]+)` \| ([^|]+) \| [^|]+ \| ([^|]+) \|", text,
                         re.MULTILINE):
        t = m.group(2).strip()
        if mm := re.fullmatch(r"(\d+) min (\d+) s", t):
            seconds = 60 * int(mm.group(1)) + int(mm.group(2))
        elif mm := re.fullmatch(r"(\d+) s", t):
            seconds = int(mm.group(1))
        else:
            raise ValueError(f"docs/TIMINGS.md: cannot read the run time {t!r} of {m.group(1)}")
        out[m.group(1)] = (float(seconds), m.group(3).strip())
    if not out:
        raise ValueError("docs/TIMINGS.md has no timing rows: run `make execute` first")
    return out


def lesson_times(root: Path | None = None) -> list[LessonTime]:
    """Every timed lesson with its learner-time estimate.

    Estimate (minutes) = reading (markdown words / :data:`READING_WPM` + code lines /
    :data:`CODE_LINES_PER_MIN`) + run time x :data:`RUN_FACTOR` + exercises x
    :data:`MINUTES_PER_EXERCISE`, as a low-high range. Reading and exercises are counted in
    the lesson notebook; the run time is the measured cold first run in docs/TIMINGS.md.
    Open experiments (an exercise whose comment says "open experiment", one per lesson; see
    :mod:`utils.checks.experiment`) are counted apart and left out of the estimate: they are
    take-home work after the session.
    """
    root = root or repo_root()
    timings = parse_timings((root / "docs" / "TIMINGS.md").read_text(encoding="utf-8"))
    out = []
    for name, (seconds, _) in sorted(timings.items()):
        lesson = root / "lessons" / name
        nb = nbformat.read(lesson if lesson.exists() else root / "solutions" / name,
                           as_version=4)
        words = sum(len(str(c.source).split()) for c in nb.cells if c.cell_type == "markdown")
        lines = sum(len([x for x in str(c.source).splitlines() if x.strip()])
                    for c in nb.cells if c.cell_type == "code")
        reading = words / READING_WPM + lines / CODE_LINES_PER_MIN
        title = next((line.lstrip("# ").strip() for c in nb.cells if c.cell_type == "markdown"
                      for line in str(c.source).splitlines() if line.startswith("# ")), name)
        sol = root / "solutions" / name
        found = exercises_of(sol) if sol.exists() else []
        sol_cells = nbformat.read(sol, as_version=4).cells if found else []
        n_open = sum("open experiment" in str(sol_cells[e.cell_index].source) for e in found)
        n_ex = len(found) - n_open
        run = seconds / 60
        low = reading + RUN_FACTOR[0] * run + n_ex * MINUTES_PER_EXERCISE[0]
        high = reading + RUN_FACTOR[1] * run + n_ex * MINUTES_PER_EXERCISE[1]
        out.append(LessonTime(name[:2], name, title, seconds, reading, n_ex, low, high, n_open))
    return out


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return 60 * int(h) + int(m)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def plan_days(lessons: Sequence[LessonTime], days: int) -> list[tuple[int, str, str, str]]:
    """Lay lessons out over ``days`` days of :data:`DAY_BLOCKS`, in order.

    Returns ``(day, start, end, lesson notebook)`` slots; a lesson that does not fit in what is
    left of a block continues after the break, one that would start with less than
    :data:`MIN_START_MINUTES` left waits for the next block; the time left at the end is a slot
    with an empty notebook name. Raises ``ValueError`` when the lessons do not fit.
    """
    blocks = [(d, _minutes(a), _minutes(b)) for d in range(1, days + 1) for a, b in DAY_BLOCKS]
    slots: list[tuple[int, str, str, str]] = []
    k, clock = 0, blocks[0][1]
    for lesson in lessons:
        need = lesson.plan_minutes
        while need > 0:
            if k == len(blocks):
                raise ValueError(f"the lessons do not fit in {days} day(s): "
                                 f"{lesson.notebook} is left over")
            day, _, end = blocks[k]
            take = min(need, end - clock)
            if need == lesson.plan_minutes and take < min(need, MIN_START_MINUTES):
                take = 0  # too little left to start a lesson: the rest is for questions
                clock = end
            if take > 0:
                slots.append((day, _hhmm(clock), _hhmm(clock + take), lesson.notebook))
                clock += take
                need -= take
            if clock >= end:
                k += 1
                clock = blocks[k][1] if k < len(blocks) else clock
    if k < len(blocks) and clock < blocks[-1][2]:
        left = [(d, max(clock, a) if i == k else a, b) for i, (d, a, b) in enumerate(blocks)
                if i >= k]
        slots += [(d, _hhmm(a), _hhmm(b), "") for d, a, b in left if b - a > 0]
    return slots


def schedule_markdown(root: Path | None = None) -> str:
    """The generated part of docs/INSTRUCTORS.md: estimates per lesson and the two agendas."""
    root = root or repo_root()
    lessons = lesson_times(root)
    timings = parse_timings((root / "docs" / "TIMINGS.md").read_text(encoding="utf-8"))
    dates = sorted({d for _, d in timings.values()})
    by_nb = {lt.notebook: lt for lt in lessons}
    lines = [
        SCHEDULE_BEGIN,
        "",
        f"Run times: docs/TIMINGS.md (cold first runs, measured {', '.join(dates)}). Learner time "
        f"= reading (markdown at {READING_WPM} words/min, code at {CODE_LINES_PER_MIN} "
        f"lines/min) + the run time x {RUN_FACTOR[0]} to {RUN_FACTOR[1]} (re-runs while "
        f"working) + {MINUTES_PER_EXERCISE[0]} to {MINUTES_PER_EXERCISE[1]} min per exercise. "
        "The factors are assumptions, not measurements: time one participant and adjust. Each "
        "lesson's open experiment (choose settings, run them, meet a measured bar) is take-home "
        "work after the session and is not in the plan.",
        "",
        "| lesson | run time | reading | exercises | learner time | plan |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lt in lessons:
        run = (f"{lt.run_seconds / 60:.1f} min" if lt.run_seconds >= 60
               else f"{lt.run_seconds:.0f} s")
        exercises = f"{lt.exercises}" + (f" + {lt.experiments} take-home" if lt.experiments
                                         else "")
        lines.append(f"| {lt.title} | {run} | {lt.reading_minutes:.0f} min | {exercises} | "
                     f"{lt.low_minutes:.0f}-{lt.high_minutes:.0f} min | {lt.plan_minutes} min |")
    total = sum(lt.plan_minutes for lt in lessons)
    day_minutes = sum(_minutes(b) - _minutes(a) for a, b in DAY_BLOCKS)
    lines += ["", f"Planned total: {total} min; a day holds {day_minutes} min of teaching "
              f"({', '.join(f'{a}-{b}' for a, b in DAY_BLOCKS)}; coffee and lunch between).", ""]

    def table(slots: list[tuple[int, str, str, str]], with_day: bool) -> list[str]:
        head = "| day | time | lesson |" if with_day else "| time | lesson |"
        rows = [head, "| --- | --- | --- |" if with_day else "| --- | --- |"]
        seen: set[str] = set()
        for day, a, b, name in slots:
            what = ("*open: questions, the exercises, the self-study lessons*" if not name
                    else by_nb[name].title + (" (continued)" if name in seen else ""))
            seen.add(name)
            rows.append((f"| {day} " if with_day else "") + f"| {a}-{b} | {what} |")
        return rows

    try:
        two = plan_days(lessons, 2)
        lines += ["**Two days**: every lesson, in order.", ""] + table(two, True)
    except ValueError as exc:
        lines += [f"**Two days**: {exc}; trim the exercises or add a day."]
    live = [lt for lt in lessons if lt.number in ONE_DAY_LIVE]
    rest = [lt for lt in lessons if lt.number not in ONE_DAY_LIVE]
    while live:
        try:
            one = plan_days(live, 1)
            break
        except ValueError:
            rest = sorted([*rest, live.pop()], key=lambda lt: lt.notebook)
    lines += ["", "**One day**: " + ", ".join(lt.number for lt in live) + " live; "
              + (", ".join(lt.number for lt in rest) or "nothing") + " as self-study.", ""]
    if live:
        lines += table(one, False)
    lines += ["", SCHEDULE_END]
    return "\n".join(lines)


def doctor_problems() -> list:
    """The doctor's FAIL and WARN rows with their fixes, produced by running each check of
    :mod:`utils.doctor` on a machine state that trips it (too old a Python, 1 GB of RAM...)."""
    from utils import doctor as d

    class _NoKernels:
        def find_kernel_specs(self) -> dict:
            return {}

    def broken_step() -> dict:
        return {"seconds": 0.1, "loss": float("nan"), "grad_norm": 0.0, "parameters": 1e5}

    def slow_step() -> dict:
        return {"seconds": 2.0 * d.TRAIN_STEP_WARN_S, "loss": 4.0, "grad_norm": 1.0,
                "parameters": 1e5}

    with tempfile.TemporaryDirectory() as empty:
        rows = [
            d.check_python(version=(3, 10, 12)),
            *d.check_packages(pins=[("torch==2.13.0", "torch", True),
                                    ("pytest==9.2.0", "pytest", False)],
                              version_of=lambda name: None),
            d.check_torch_build(cuda_version="12.8", cuda_available=False),
            d.check_cores(count=1),
            d.check_ram(available=int(1 * d.GB)),
            d.check_disk(free=int(0.5 * d.GB)),
            d.check_threads(threads=8, cores=2),
            d.check_threads(threads=1, cores=2),
            d.check_training_step(step=broken_step),
            d.check_training_step(step=slow_step),
            d.check_offline(env={}),
            d.check_kernel(manager=_NoKernels()),
            *d.check_data(root=empty, external=Path(empty) / "none"),
        ]
    return [r for r in rows if r.status != "pass"]


def doctor_markdown() -> str:
    """The generated table of docs/INSTRUCTORS.md: what ``make doctor`` says, and the fix."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [DOCTOR_BEGIN, "", "| row | status | what it says (example) | fix |",
             "| --- | --- | --- | --- |"]
    for r in doctor_problems():
        lines.append(f"| {cell(r.check)} | {r.status.upper()} | {cell(r.found)} | "
                     f"{cell(r.fix)} |")
    return "\n".join(lines + ["", DOCTOR_END])


def write_instructors_doc(root: Path | None = None) -> Path:
    """Replace the generated sections of docs/INSTRUCTORS.md (between their markers)."""
    root = root or repo_root()
    doc = root / "docs" / "INSTRUCTORS.md"
    text = doc.read_text(encoding="utf-8")
    for begin, end, make in ((SCHEDULE_BEGIN, SCHEDULE_END, lambda: schedule_markdown(root)),
                             (DOCTOR_BEGIN, DOCTOR_END, doctor_markdown)):
        if begin not in text or end not in text:
            raise ValueError(f"{doc} lacks the markers {begin!r} ... {end!r}: put them where "
                             "the generated section belongs")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + make() + tail
    return atomic_write_text(doc, text)


# --- command line --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path,
                        help="notebooks, or folders of them (one folder per learner)")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"),
                        help="the CSV to write (default: grades.csv)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per notebook (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="course cache the notebooks use (default: a new temporary one)")
    parser.add_argument("--executed", type=Path, default=None,
                        help="also save each executed notebook under this folder")
    parser.add_argument("--instructors-doc", action="store_true",
                        help="print docs/INSTRUCTORS.md's generated sections instead: the "
                        "agenda (from docs/TIMINGS.md) and the doctor's problems and fixes")
    parser.add_argument("--write", action="store_true",
                        help="with --instructors-doc: rewrite those sections in the file")
    args = parser.parse_args(argv)
    if args.instructors_doc:
        if args.write:
            print(f"wrote {write_instructors_doc()}")
        else:
            print(schedule_markdown() + "\n\n" + doctor_markdown())
        return 0
    if not args.paths:
        parser.error("give the notebooks (or folders of them) to grade")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    rows = grade(args.paths, timeout=args.timeout, cache_dir=args.cache_dir,
                 executed_dir=args.executed, progress=True)
    if not rows:
        print(f"no notebooks found under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    for r in rows:
        if r.name == SUMMARY_ROW:
            print(f"{r.learner}: {r.status} ({r.detail})")
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
