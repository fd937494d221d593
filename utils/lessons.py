"""Lesson generation, drift check and execution of the course notebooks.

``solutions/NN_topic.ipynb`` is the single source. ``lessons/`` is generated from it with
nbgrader's markers (``ClearSolutions``): in code cells the lines between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` become ``raise NotImplementedError(...)``,
in markdown cells they become a placeholder; outputs are stripped and metadata cleaned.

    python -m utils.lessons generate   # make lessons
    python -m utils.lessons check      # make check-lessons (exit 1 naming notebook and cell)
    python -m utils.lessons execute    # make execute: run solutions/ in place, time them
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from utils.io import atomic_write_text
from utils.paths import repo_root

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
KERNEL_NAME = "distill-deploy"
KERNEL_DISPLAY = "Python 3 (Distill & Deploy)"
RUNTIME_PREFIX = "**Run time:**"
_EXERCISE_RE = re.compile(r"Exercise\s+(\d+\.\d+)")
_DEF_RE = re.compile(r"^\s*def\s+(\w+)\s*\(")
_KEEP_CELL_METADATA = ("tags",)
BANNER = (
    "> **Exercise version.** Generated from `solutions/{name}` by `make lessons`; edit the "
    "solution, not this file. Cells marked *YOUR CODE HERE* are yours: run each check after "
    "you write an answer. An exercise you leave open is reported and the lesson carries on "
    "with the reference implementation."
)


class LessonError(ValueError):
    """A solution notebook that cannot be turned into a lesson (names notebook and cell)."""


@dataclass(frozen=True)
class Exercise:
    """An exercise found in a solution notebook."""

    label: str
    name: str
    cell_index: int


def _clear_code(source: str, where: str) -> tuple[str, list[Exercise]]:
    lines = source.split("\n")
    out: list[str] = []
    found: list[Exercise] = []
    labels = _EXERCISE_RE.findall(source)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == BEGIN:
            indent = line[: len(line) - len(line.lstrip())]
            j = i + 1
            while j < len(lines) and lines[j].strip() != END:
                if lines[j].strip() == BEGIN:
                    raise LessonError(f"{where}: nested {BEGIN!r} at line {j + 1}")
                j += 1
            if j == len(lines):
                raise LessonError(f"{where}: {BEGIN!r} at line {i + 1} has no {END!r}")
            if not indent:
                raise LessonError(
                    f"{where}: the solution at line {i + 1} is not inside a function; the "
                    "lesson would stop there. Put the answer in a function body."
                )
            name = _enclosing_def(lines, i)
            if name is None:
                raise LessonError(
                    f"{where}: the solution at line {i + 1} is not inside a function (no "
                    "enclosing `def`); the lesson would stop there. Put the answer in a "
                    "function body."
                )
            if not labels:
                raise LessonError(
                    f"{where}: name the exercise in the cell, e.g. a comment `# Exercise 1.2`"
                )
            label = labels[min(len(found), len(labels) - 1)]
            found.append(Exercise(label, name, -1))
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("Exercise {label}: {name}")')
            i = j + 1
            continue
        if line.strip() == END:
            raise LessonError(f"{where}: {END!r} at line {i + 1} without {BEGIN!r}")
        out.append(line)
        i += 1
    return "\n".join(out), found


def _enclosing_def(lines: list[str], index: int) -> str | None:
    """Name of the innermost ``def`` whose body holds ``lines[index]``, if any."""
    level = len(lines[index]) - len(lines[index].lstrip())
    for k in range(index - 1, -1, -1):
        text = lines[k]
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(text) - len(text.lstrip())
        if indent < level:
            if m := _DEF_RE.match(text):
                return m.group(1)
            level = indent  # an enclosing if/for/class/with: keep looking outwards
            if level == 0:
                return None
    return None


def _clear_markdown(source: str, where: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if source.count(BEGIN) != source.count(END):
        raise LessonError(f"{where}: unbalanced solution markers in markdown")
    return pattern.sub("*YOUR ANSWER HERE: write a few sentences.*", source)


def generate_lesson(solution: nbformat.NotebookNode, name: str) -> tuple[nbformat.NotebookNode,
                                                                          list[Exercise]]:
    """The lesson version of a solution notebook, and the exercises it holds."""
    nb = nbformat.from_dict(solution)  # a deep copy
    exercises: list[Exercise] = []
    cells = []
    for index, cell in enumerate(nb.cells):
        where = f"solutions/{name} cell {index}"
        meta = {k: cell.metadata[k] for k in _KEEP_CELL_METADATA if k in cell.metadata}
        cell.metadata = nbformat.NotebookNode(meta)
        if cell.cell_type == "code":
            cell.source, found = _clear_code(cell.source, where)
            exercises += [Exercise(e.label, e.name, index) for e in found]
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = _clear_markdown(cell.source, where)
            if "attachments" in cell and not cell.attachments:
                del cell["attachments"]
        cells.append(cell)
    banner = nbformat.v4.new_markdown_cell(BANNER.format(name=name))
    banner.id = "lesson-banner"
    nb.cells = cells[:1] + [banner] + cells[1:]
    nb.metadata = nbformat.NotebookNode({
        "kernelspec": {"display_name": KERNEL_DISPLAY, "language": "python", "name": KERNEL_NAME},
        "language_info": {"name": "python"},
    })
    return nb, exercises


def _dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def solution_paths(root: Path | None = None) -> list[Path]:
    root = root or repo_root()
    return sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))


def generate_all(root: Path | None = None) -> list[Path]:
    """Write ``lessons/`` from ``solutions/``; returns the lesson files written."""
    root = root or repo_root()
    written = []
    for src in solution_paths(root):
        nb = nbformat.read(src, as_version=4)
        lesson, _ = generate_lesson(nb, src.name)
        dst = root / "lessons" / src.name
        text = _dumps(lesson)
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            atomic_write_text(dst, text)
        written.append(dst)
    return written


def check_all(root: Path | None = None) -> list[str]:
    """Problems that make ``lessons/`` differ from what ``solutions/`` generates."""
    root = root or repo_root()
    problems = []
    sources = solution_paths(root)
    for src in sources:
        dst = root / "lessons" / src.name
        try:
            lesson, _ = generate_lesson(nbformat.read(src, as_version=4), src.name)
        except LessonError as exc:
            problems.append(str(exc))
            continue
        if not dst.exists():
            problems.append(f"lessons/{src.name} is missing: run `make lessons`.")
            continue
        expected = _dumps(lesson)
        actual = dst.read_text(encoding="utf-8")
        if expected == actual:
            continue
        problems.append(f"lessons/{src.name} is out of date with solutions/{src.name}: "
                        f"{_first_difference(expected, actual)}. Run `make lessons`.")
    names = {s.name for s in sources}
    for extra in sorted((root / "lessons").glob("*.ipynb")):
        if extra.name not in names:
            problems.append(f"lessons/{extra.name} has no solutions/{extra.name}: "
                            "delete it or add its source.")
    return problems


def _first_difference(expected: str, actual: str) -> str:
    try:
        exp = nbformat.reads(expected, as_version=4)
        act = nbformat.reads(actual, as_version=4)
    except Exception:  # noqa: BLE001 - an unreadable lesson is itself the difference
        return "the committed lesson is not a readable notebook"
    for i, (a, b) in enumerate(zip(exp.cells, act.cells, strict=False)):
        if a != b:
            diff = difflib.unified_diff(str(b.get("source", "")).splitlines(),
                                        str(a.get("source", "")).splitlines(), lineterm="", n=0)
            first = next((d for d in list(diff)[2:] if d[:1] in "+-"), "")
            hint = f" (e.g. {first[:80]!r})" if first else " (metadata or outputs)"
            cell_id = f" (id {a.get('id')!r})" if a.get("id") else ""
            return f"cell {i}{cell_id} differs{hint}"
    if len(exp.cells) != len(act.cells):
        return f"cell count {len(act.cells)} instead of {len(exp.cells)}"
    return "notebook metadata or formatting differs"


def exercises_of(path: Path) -> list[Exercise]:
    """Exercises of a solution notebook, in order."""
    _, found = generate_lesson(nbformat.read(path, as_version=4), path.name)
    return found


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def execute_solutions(paths: list[Path] | None = None, *, timeout: int = 900,
                      root: Path | None = None, cold: bool = False) -> dict[str, float]:
    """Run solution notebooks in place (outputs kept), timing each one.

    The measured time is written into the header line that starts with ``**Run time:**`` and
    into ``docs/TIMINGS.md``; lessons are regenerated afterwards. ``cold``: run them, in order,
    against a new empty course cache (``DD_CACHE_DIR``, removed afterwards), so every time is a
    learner's first run: each model and harvest is built where a lesson first needs it.
    The kernels see ``DD_RESULTS_DIR=<root>/results``: ``make execute`` is what writes the
    committed results (a learner's run of a lesson writes a scratch copy, see ``utils.paths``).
    """
    root = root or repo_root()
    if os.environ.get("DD_RESULTS_DIR") != str(root / "results"):
        saved_results = os.environ.get("DD_RESULTS_DIR")
        os.environ["DD_RESULTS_DIR"] = str(root / "results")  # the kernels inherit it
        try:
            return execute_solutions(paths, timeout=timeout, root=root, cold=cold)
        finally:
            if saved_results is None:
                os.environ.pop("DD_RESULTS_DIR", None)
            else:
                os.environ["DD_RESULTS_DIR"] = saved_results
    if cold:
        saved = os.environ.get("DD_CACHE_DIR")
        with tempfile.TemporaryDirectory(prefix="dd-cold-cache-") as empty:
            os.environ["DD_CACHE_DIR"] = empty  # the kernels inherit it
            try:
                return execute_solutions(paths, timeout=timeout, root=root)
            finally:
                if saved is None:
                    os.environ.pop("DD_CACHE_DIR", None)
                else:
                    os.environ["DD_CACHE_DIR"] = saved
    from nbclient import NotebookClient

    paths = paths or solution_paths(root)
    timings: dict[str, float] = {}
    caches: dict[str, str] = {}
    today = _dt.date.today().isoformat()
    started_empty = not _cache_entries()  # a notebook that builds nothing is then not "warm"
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        print(f"executing {path.relative_to(root)} ...", flush=True)
        before = _cache_entries()
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
        timings[path.name] = seconds
        built = len(_cache_entries() - before)
        caches[path.name] = (f"cold: built {built} cache {'entry' if built == 1 else 'entries'}"
                             if built else "built nothing" if started_empty else "warm")
        line = (f"{RUNTIME_PREFIX} {_format_seconds(seconds)} to execute on {_machine()} "
                f"(measured by `make execute`, {today}).")
        for cell in nb.cells[:3]:
            if cell.cell_type == "markdown" and RUNTIME_PREFIX in cell.source:
                cell.source = re.sub(re.escape(RUNTIME_PREFIX) + r"[^\n]*", line, cell.source)
                break
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        nb.metadata.pop("widgets", None)
        atomic_write_text(path, _dumps(nb))
        print(f"  {_format_seconds(seconds)} ({caches[path.name]})", flush=True)
    _write_timings(root, timings, caches)
    generate_all(root)
    return timings


def _cache_entries() -> set[str]:
    """Entries of the course cache (models, harvests, exports): new ones mean a cold run."""
    from utils.paths import cache_dir

    root = cache_dir()
    if not root.is_dir():
        return set()
    return {f"{kind.name}/{entry.name}" for kind in root.iterdir()
            if kind.is_dir() and kind.name != "results"  # a learner's saved numbers, not a build
            for entry in kind.iterdir() if not entry.name.startswith(".")}


def _write_timings(root: Path, new: dict[str, float], caches: dict[str, str] | None = None) -> None:
    path = root / "docs" / "TIMINGS.md"
    rows: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\| `(\d\d_[^`]+)` \| (.+) \|$", line)
            if m:
                fields = m.group(2).split(" | ")
                if len(fields) == 4:  # a row written before the cache column existed
                    fields.insert(1, "not recorded")
                rows[m.group(1)] = " | ".join(fields)
    stamp = f"{_dt.date.today().isoformat()} | {_git_commit(root)} | {_machine()}"
    for name, seconds in new.items():
        cache = (caches or {}).get(name, "not recorded")
        rows[name] = f"{_format_seconds(seconds)} | {cache} | {stamp}"
    lines = [
        "# Measured notebook run times",
        "",
        "Generated by `make execute` (`python -m utils.lessons execute --cold`), which runs the",
        "solution notebooks top to bottom, in order, against an empty course cache and records",
        "each one's wall-clock time: a learner's first run. Do not edit by hand. *cold* counts",
        "the models, API harvests and exports a notebook built into the cache",
        "(`.cache/distill-deploy/`) on first use; later runs load them. A *warm* row was timed",
        "on a filled cache (`python -m utils.lessons execute`, no `--cold`) and built nothing.",
        "",
        "| notebook | run time | cache | date | commit | machine |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| `{name}` | {rows[name]} |" for name in sorted(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.lessons", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help="write lessons/ from solutions/")
    sub.add_parser("check", help="fail when lessons/ is out of date")
    ex = sub.add_parser("execute", help="run solutions/ in place and time them")
    ex.add_argument("notebooks", nargs="*", type=Path, help="default: all solutions")
    ex.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ex.add_argument("--cold", action="store_true",
                    help="time a learner's first run: an empty course cache, removed afterwards")
    sub.add_parser("exercises", help="list the exercises of every solution notebook")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            for path in generate_all():
                print(f"wrote {path.relative_to(repo_root())}")
        elif args.command == "check":
            problems = check_all()
            if problems:
                print("\n".join(problems), file=sys.stderr)
                return 1
            print(f"lessons/ is up to date with solutions/ ({len(solution_paths())} notebooks).")
        elif args.command == "execute":
            paths = [p.resolve() for p in args.notebooks] or None
            execute_solutions(paths, timeout=args.timeout, cold=args.cold)
        elif args.command == "exercises":
            for path in solution_paths():
                for e in exercises_of(path):
                    print(f"{path.name}: Exercise {e.label} {e.name} (cell {e.cell_index})")
    except LessonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
