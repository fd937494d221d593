"""The lesson generator and drift check (utils.lessons) on small hand-made notebooks."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from utils.lessons import (
    BEGIN,
    END,
    LessonError,
    check_all,
    exercises_of,
    generate_all,
    generate_lesson,
)
from utils.paths import repo_root

SOLUTION_CODE = f"""# Exercise 1.2: the soft-target loss
def kd_loss(student_logits, teacher_logits, temperature):
    \"\"\"Hinton et al. (2015).\"\"\"
    {BEGIN}
    scaled = student_logits / temperature
    return scaled.sum()
    {END}
"""

METHOD_CODE = f"""# Exercise 2.1: a method, deeper indentation
class Student:
    def forward(self, x):
        if x is not None:
            {BEGIN}
            return x * 2
            {END}
        return None
"""


def _nb(*cells):
    nb = new_notebook(cells=list(cells))
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"},
                   "widgets": {"state": {}}, "language_info": {"name": "python", "version": "x"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i}"
    return nb


def _solution():
    params = new_code_cell("SEED = 0  # the seed", metadata={"tags": ["parameters"]})
    ex = new_code_cell(SOLUTION_CODE, execution_count=3,
                       outputs=[new_output("stream", name="stdout", text="done\n")],
                       metadata={"execution": {"iopub.status.idle": "2026"}, "scrolled": True})
    md = new_markdown_cell(f"Why T^2?\n\n{BEGIN}\nBecause gradients scale as 1/T^2.\n{END}\n",
                           metadata={"collapsed": False})
    return _nb(new_markdown_cell("# 01 · Title\n\n**Run time:** 1 s"), params, ex, md,
               new_code_cell(METHOD_CODE))


def test_code_markers_become_not_implemented_error():
    lesson, exercises = generate_lesson(_solution(), "01_x.ipynb")
    code = lesson.cells[3].source
    assert "scaled" not in code and BEGIN not in code and END not in code
    assert '    raise NotImplementedError("Exercise 1.2: kd_loss")' in code.splitlines()
    assert "    # YOUR CODE HERE" in code.splitlines()
    assert code.splitlines()[:3] == SOLUTION_CODE.splitlines()[:3]  # signature, docstring kept
    method = lesson.cells[5].source.splitlines()
    assert '            raise NotImplementedError("Exercise 2.1: forward")' in method
    assert "        return None" in method  # code after the markers stays
    assert [(e.label, e.name, e.cell_index) for e in exercises] == \
        [("1.2", "kd_loss", 2), ("2.1", "forward", 4)]


def test_markdown_markers_replaced():
    lesson, _ = generate_lesson(_solution(), "01_x.ipynb")
    md = lesson.cells[4].source
    assert "Because gradients" not in md and BEGIN not in md
    assert "*YOUR ANSWER HERE" in md and md.startswith("Why T^2?")


def test_outputs_and_metadata_stripped_tags_kept():
    lesson, _ = generate_lesson(_solution(), "01_x.ipynb")
    for cell in lesson.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert set(cell.metadata) <= {"tags"}
    assert lesson.cells[2].metadata == {"tags": ["parameters"]}
    assert "widgets" not in lesson.metadata
    assert lesson.metadata["kernelspec"]["name"] == "distill-deploy"
    assert lesson.cells[1].id == "lesson-banner" and "solutions/01_x.ipynb" in \
        lesson.cells[1].source
    nbformat.validate(lesson)


def test_solution_notebook_not_modified():
    sol = _solution()
    before = nbformat.writes(sol)
    generate_lesson(sol, "01_x.ipynb")
    assert nbformat.writes(sol) == before


@pytest.mark.parametrize("source, message", [
    (f"# Exercise 1.1\ndef f():\n    {BEGIN}\n    return 1\n", "has no"),
    (f"# Exercise 1.1\ndef f():\n    return 1\n    {END}\n", "without"),
    (f"# Exercise 1.1\ndef f():\n    {BEGIN}\n    {BEGIN}\n    {END}\n", "nested"),
    (f"# Exercise 1.1\n{BEGIN}\nx = 1\n{END}\n", "not inside a function"),
    (f"# Exercise 1.1\ndef f():\n    pass\nif True:\n    {BEGIN}\n    x = 1\n    {END}\n",
     "not inside a function"),
    (f"# Exercise 1.1\nfor i in range(3):\n    {BEGIN}\n    x = i\n    {END}\n",
     "not inside a function"),
    (f"def f():\n    {BEGIN}\n    return 1\n    {END}\n", "name the exercise"),
])
def test_bad_code_cells_name_notebook_and_cell(source, message):
    nb = _nb(new_markdown_cell("# 03 · T"), new_code_cell("x = 1"), new_code_cell(source))
    with pytest.raises(LessonError) as info:
        generate_lesson(nb, "03_bad.ipynb")
    assert "solutions/03_bad.ipynb cell 2" in str(info.value)
    assert message in str(info.value)


def test_solution_in_a_loop_inside_a_def_is_fine():
    src = (f"# Exercise 1.1\ndef f(xs):\n    out = []\n    for x in xs:\n        {BEGIN}\n"
           f"        out.append(x)\n        {END}\n    return out\n")
    lesson, ex = generate_lesson(_nb(new_code_cell(src)), "01_y.ipynb")
    assert [(e.label, e.name) for e in ex] == [("1.1", "f")]
    assert '        raise NotImplementedError("Exercise 1.1: f")' in lesson.cells[0].source


def test_unbalanced_markdown_markers_name_the_cell():
    nb = _nb(new_code_cell("x = 1"), new_markdown_cell(f"Answer:\n{BEGIN}\nforgot the end"))
    with pytest.raises(LessonError, match=r"solutions/04_md\.ipynb cell 1: unbalanced"):
        generate_lesson(nb, "04_md.ipynb")


def _repo(tmp_path, name="01_x.ipynb", nb=None):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "lessons").mkdir()
    nbformat.write(nb or _solution(), tmp_path / "solutions" / name)
    return tmp_path


def test_generate_then_check_is_clean(tmp_path):
    root = _repo(tmp_path)
    assert check_all(root) == ["lessons/01_x.ipynb is missing: run `make lessons`."]
    written = generate_all(root)
    assert written == [root / "lessons" / "01_x.ipynb"]
    assert check_all(root) == []
    mtime = written[0].stat().st_mtime_ns
    generate_all(root)  # nothing changed: the file is not rewritten
    assert written[0].stat().st_mtime_ns == mtime
    assert [e.name for e in exercises_of(root / "solutions" / "01_x.ipynb")] == \
        ["kd_loss", "forward"]


def test_drift_in_a_lesson_cell_is_named(tmp_path):
    root = _repo(tmp_path)
    generate_all(root)
    path = root / "lessons" / "01_x.ipynb"
    lesson = nbformat.read(path, as_version=4)
    lesson.cells[4].source = lesson.cells[4].source.replace("Why", "How")
    nbformat.write(lesson, path)
    problems = check_all(root)
    assert len(problems) == 1
    assert "lessons/01_x.ipynb is out of date with solutions/01_x.ipynb" in problems[0]
    assert "cell 4 (id 'c3') differs" in problems[0] and "How T^2?" in problems[0]
    assert "make lessons" in problems[0]


def test_drift_after_editing_the_solution(tmp_path):
    root = _repo(tmp_path)
    generate_all(root)
    sol_path = root / "solutions" / "01_x.ipynb"
    sol = nbformat.read(sol_path, as_version=4)
    sol.cells[1].source = "SEED = 1  # the seed"
    nbformat.write(sol, sol_path)
    problems = check_all(root)
    assert len(problems) == 1 and "cell 2 (id 'c1') differs" in problems[0]
    generate_all(root)
    assert check_all(root) == []


def test_orphan_lesson_and_bad_solution_are_reported(tmp_path):
    root = _repo(tmp_path)
    generate_all(root)
    nbformat.write(_nb(new_code_cell("x = 1")), root / "lessons" / "09_orphan.ipynb")
    bad = _nb(new_code_cell(f"def f():\n    {BEGIN}\n    return 1\n    {END}\n"))
    nbformat.write(bad, root / "solutions" / "02_bad.ipynb")
    problems = check_all(root)
    assert any("lessons/09_orphan.ipynb has no solutions/09_orphan.ipynb" in p for p in problems)
    assert any("solutions/02_bad.ipynb cell 0" in p for p in problems)


def test_real_repository_is_in_sync():
    problems = check_all()
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("cold", [True, False])
def test_execute_times_a_first_run_on_an_empty_cache_when_cold(tmp_path, monkeypatch, cold):
    """``execute --cold``: the kernels see a new empty DD_CACHE_DIR, TIMINGS says what was built,
    and the learner's own cache and environment are left as they were."""
    from utils.lessons import execute_solutions

    own = tmp_path / "own-cache"
    (own / "models" / "teacher-model").mkdir(parents=True)  # a filled cache: a warm run sees it
    monkeypatch.setenv("DD_CACHE_DIR", str(own))
    monkeypatch.delenv("DD_RESULTS_DIR", raising=False)  # as in a shell that runs make execute
    build = new_code_cell(
        "import os, pathlib\n"
        "root = pathlib.Path(os.environ['DD_CACHE_DIR'])\n"
        "print(sorted(p.name for p in root.glob('*/*')))\n"
        "(root / 'models' / 'student-built-here').mkdir(parents=True, exist_ok=True)\n"
        "print(os.environ.get('DD_RESULTS_DIR'))"
    )
    (tmp_path / "repo").mkdir()
    root = _repo(
        tmp_path / "repo",
        "01_x.ipynb",
        _nb(new_markdown_cell("# 01 · X\n\n**Run time:** 1 s"), build),
    )
    (root / "docs").mkdir()
    execute_solutions(timeout=120, root=root, cold=cold)

    out = nbformat.read(root / "solutions" / "01_x.ipynb", as_version=4).cells[1].outputs[0]["text"]
    seen_cache, seen_results = out.strip().splitlines()
    assert seen_cache == (
        "[]" if cold else "['teacher-model']"
    )  # the kernel saw an empty cache only when cold
    # make execute is what writes the committed results/ (a learner's run writes a scratch copy)
    assert seen_results == str(root / "results")
    assert "DD_RESULTS_DIR" not in os.environ
    assert os.environ["DD_CACHE_DIR"] == str(own)
    assert (
        own / "models" / "student-built-here"
    ).exists() != cold  # a cold run never writes the real cache
    timings = (root / "docs" / "TIMINGS.md").read_text(encoding="utf-8")
    assert "| `01_x.ipynb` |" in timings and "cold: built 1 cache entry" in timings

    # a notebook that builds nothing: "built nothing" on an empty cache, "warm" on a filled one
    nbformat.write(_nb(new_markdown_cell("# 01 · X\n\n**Run time:** 1 s"), new_code_cell("1 + 1")),
                   root / "solutions" / "01_x.ipynb")
    execute_solutions(timeout=120, root=root, cold=cold)
    timings = (root / "docs" / "TIMINGS.md").read_text(encoding="utf-8")
    assert ("| built nothing |" if cold else "| warm |") in timings
    assert (root / "lessons" / "01_x.ipynb").exists()


def test_every_notebook_sets_offline_mode_before_any_import():
    """Started from a plain `jupyter lab` (not `make lab`), a lesson must still never download."""
    for path in sorted((repo_root() / "solutions").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        setup = next((c for c in nb.cells if c.get("id") == "setup"), None)
        assert setup is not None, f"{path.name} has no cell with id 'setup'"
        lines = [ln for ln in setup.source.splitlines() if ln.strip()]
        assert lines[:2] == ["import os", 'os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the '
                             "course never downloads (README)"], (
            f"{path.name}: the setup cell must start by setting HF_HUB_OFFLINE (before "
            "transformers or huggingface_hub is imported)")
