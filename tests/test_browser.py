"""The course in a real browser: JupyterLab on 127.0.0.1, driven in Debian's chromium.

Playwright for Python (the optional `browser` extra) starts the system's chromium through
``executable_path``; Playwright's own browser download is never used. The test opens lessons 01
and 02 as a learner does (a copy in a temporary folder, so autosave cannot touch the
repository; ``DD_RESULTS_DIR`` points at that folder too), runs every cell from the Run menu,
and checks what a learner sees: the temperature slider is a live widget that redraws the
figure, every open exercise prints its notice, and lesson 02's chat box answers on Enter.

``make browser`` installs chromium (apt) and Playwright; ``make browser-test`` runs this file
(``make test`` does too). Without chromium or Playwright the browser tests skip and say why.
The two lessons take a few minutes, so ``make units`` leaves them out (marker ``browser``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import pytest
from browser_lab import (
    CHROMIUM_ARGS,
    INSTALL_HINT,
    chromium_path,
    code_cell_count,
    error_outputs,
    open_exercises,
    open_notebook,
    run_all_cells,
    running_lab,
    unavailable_reason,
    wait_for,
    wait_until_run_all_done,
)

from utils.paths import repo_root

LESSON_01 = "01_distillation_theory.ipynb"
LESSON_02 = "02_teacher_language_model.ipynb"
RUN_ALL_TIMEOUT_S = 900  # each lesson is under 3 min cold on a quiet machine; CI may be busy
WIDGET_TIMEOUT_S = 60  # a slider move or a chat answer (one greedy decode of the teacher)
TIMINGS: dict[str, float] = {}


def _executed_cells(notebook: Path) -> int:
    """Code cells of ``notebook`` that carry outputs or an execution count (a saved run)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(bool(c.get("outputs") or c.get("execution_count")) for c in cells
               if c["cell_type"] == "code")


# --- fast checks (always run) ----------------------------------------------------------------

def test_skip_reason_names_what_is_missing_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DD_CHROMIUM", str(tmp_path / "no-chromium"))
    reason = unavailable_reason()
    assert reason is not None and f"no chromium at {tmp_path / 'no-chromium'}" in reason
    assert "make browser" in reason and reason.endswith(INSTALL_HINT)
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DD_CHROMIUM", str(fake))
    assert chromium_path() == str(fake)
    reason = unavailable_reason()
    assert reason is None or reason.startswith("Playwright for Python is not installed")


def test_make_browser_installs_chromium_with_apt_and_playwright_from_the_extra():
    makefile = (repo_root() / "Makefile").read_text(encoding="utf-8")
    browser = re.search(r"^browser:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert browser, "the Makefile has no `browser` target"
    recipe = browser.group(1)
    assert "apt-get install -y chromium" in recipe and "sudo" in recipe
    recipes = [line for line in makefile.splitlines() if line.startswith("\t")]
    assert not [r for r in recipes if "playwright install" in r]  # its own browser download
    assert re.search(r"^browser:.*\$\(BROWSER_STAMP\)", makefile, re.MULTILINE)
    assert 'BROWSER_SPEC := ".[dev,browser]"' in makefile
    import tomllib

    project = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]
    assert [d.split("==")[0] for d in project["optional-dependencies"]["browser"]] == ["playwright"]
    assert all("==" in d for d in project["optional-dependencies"]["browser"])  # pinned
    # CI installs the browser and runs the browser tests through `make test`
    ci = (repo_root() / ".ci" / "run").read_text(encoding="utf-8")
    assert "make browser" in ci and "make test" in ci
    test = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    assert "$(MAKE) browser-test" in test


# --- the browser (slow: marker `browser`) ----------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    """JupyterLab serving a copy of lessons 01 and 02, with its own settings and results."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("browser")
    root = base / "lessons"
    root.mkdir()
    for name in (LESSON_01, LESSON_02):
        shutil.copy2(repo_root() / "lessons" / name, root / name)
    env = dict(os.environ,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DD_RESULTS_DIR=str(base / "results"),  # never the committed results/
               JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(base / "user-settings"),  # not ~/.jupyter
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"))
    start = time.perf_counter()
    with running_lab(root, secrets.token_hex(16), env) as server:
        TIMINGS["JupyterLab start"] = time.perf_counter() - start
        yield server
    if TIMINGS:  # on the terminal, past pytest's output capture
        line = "browser test wall-clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items())
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    # The repository's lessons carry no outputs: JupyterLab autosaved only its copies. (Each
    # test checks that the lesson saved its numbers under DD_RESULTS_DIR, not in results/.)
    for name in (LESSON_01, LESSON_02):
        assert _executed_cells(repo_root() / "lessons" / name) == 0, f"lessons/{name} was saved"


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory):
    """Debian's chromium through Playwright, with a fresh, empty profile."""
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium_path(),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        TIMINGS["chromium start"] = time.perf_counter() - start
        yield context
        context.close()


def _run_lesson(page, lab, name: str) -> None:
    """Open ``name``, Run > Run All Cells, wait for the end, and check every cell ran."""
    notebook = lab.root / name
    n_code = code_cell_count(notebook)
    start = time.perf_counter()
    open_notebook(page, lab, name, n_code, timeout_s=120)
    run_all_cells(page)
    shown = wait_until_run_all_done(page, lab, name, RUN_ALL_TIMEOUT_S)
    TIMINGS[f"{name[:2]} run all"] = time.perf_counter() - start
    not_run = [i for i, p in enumerate(shown) if not p.isdigit()]
    assert len(shown) == n_code and not not_run, (
        f"{name}: code cells {not_run} did not run (a cell raised?)\n{error_outputs(page)}")


def _screenshot_on_failure(page, path: Path):
    try:
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the page: {path}")
    except Exception as exc:  # noqa: BLE001 - the original failure matters more
        print(f"no screenshot ({exc})")


def _png_digest(img) -> str:
    src = img.get_attribute("src") or ""
    assert src.startswith("data:image/png;base64,"), f"the figure is not an inline PNG: {src[:80]}"
    return hashlib.sha256(base64.b64decode(src.split(",", 1)[1])).hexdigest()


def _assert_exercise_notices(page, notebook: Path) -> None:
    """Every open exercise says so: its check prints [TODO], and the cell that uses it says
    the lesson carries on with the reference (use_answer)."""
    joined = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())
    exercises = open_exercises(notebook)
    assert len(exercises) >= 3 and sum(used for *_, used in exercises) >= 3, exercises
    for label, fn, used in exercises:
        todo = f"[TODO] Exercise {label} ({fn}): not done yet"
        fallback = f"Exercise {label} ({fn}) is not done yet: using the reference"
        assert todo in joined, f"no notice {todo!r} on the page"
        assert not used or fallback in joined, f"no notice {fallback!r} on the page"
        notice = page.locator(".jp-OutputArea-output", has_text=todo).first
        notice.scroll_into_view_if_needed()
        assert notice.is_visible(), f"the notice {todo!r} is not visible"


@pytest.mark.browser
@pytest.mark.slow
def test_lesson01_slider_is_a_live_widget_and_open_exercises_show_notices(browser, lab, tmp_path):
    page = browser.new_page()
    try:
        _run_lesson(page, lab, LESSON_01)
        texts = page.locator(".jp-OutputArea-output").all_text_contents()
        joined = "\n".join(texts)
        # The widget manager rendered the slider: no text fallback like "interactive(children=..."
        assert "interactive(children=" not in joined and "SelectionSlider(" not in joined
        slider = page.locator(".jp-OutputArea-output .jupyter-widgets .widget-slider")
        assert slider.count() == 1, f"{slider.count()} slider widgets on the page, expected 1"
        cell = page.locator(".jp-CodeCell").filter(has=slider)
        handle, readout = cell.locator(".noUi-handle"), cell.locator(".widget-readout")
        img = cell.locator(".widget-output img")
        handle.scroll_into_view_if_needed()
        assert slider.is_visible() and img.count() == 1 and img.is_visible()
        assert readout.text_content().strip() == "4.0"  # the exact T the plot uses
        first = _png_digest(img)

        def moved_to(value: str, *not_digests: str):
            def ready():
                if readout.text_content().strip() != value or img.count() != 1:
                    return None
                digest = _png_digest(img)
                return digest if digest not in not_digests else None
            return wait_for(ready, WIDGET_TIMEOUT_S, f"the slider at {value} and a new figure")

        start = time.perf_counter()
        handle.focus()
        handle.press("ArrowRight")  # the next temperature: 6.0
        second = moved_to("6.0", first)
        handle.press("ArrowLeft")
        handle.press("ArrowLeft")  # 3.0
        third = moved_to("3.0", first, second)
        TIMINGS["slider, 2 moves"] = time.perf_counter() - start
        assert len({first, second, third}) == 3

        _assert_exercise_notices(page, lab.root / LESSON_01)
        # The lesson's numbers went to DD_RESULTS_DIR, not to the committed results/.
        saved = lab.root.parent / "results" / "01_distillation_theory.json"
        assert saved.exists(), f"lesson 01 saved no results in {saved.parent}"
    except Exception:
        _screenshot_on_failure(page, tmp_path / "lesson01.png")
        raise
    finally:
        page.close()
        lab.shut_down_kernels()  # its memory back before the next lesson


@pytest.mark.browser
@pytest.mark.slow
def test_lesson02_chat_box_answers_on_enter_and_exercises_show_notices(browser, lab, tmp_path):
    page = browser.new_page()
    try:
        _run_lesson(page, lab, LESSON_02)
        box = page.locator(".jp-OutputArea-output .widget-text input")
        assert box.count() == 1, f"{box.count()} text boxes on the page, expected 1"
        cell = page.locator(".jp-CodeCell").filter(has=box)
        answers = cell.locator(".widget-output")
        assert answers.count() == 1
        box.scroll_into_view_if_needed()
        loop_text = "\n".join(cell.locator(".jp-OutputArea-output").all_text_contents())

        def reply_in(text: str, question: str) -> list[str]:
            return re.findall(rf"you: {re.escape(question)}\nteacher: (.*)\n", text)

        asked = ["What is 86 - 47?", "Reverse the word m o r v e n."]  # both in the cell's loop
        start = time.perf_counter()
        for question in asked:
            expected = reply_in(loop_text, question)
            assert len(expected) == 1, f"the cell's own loop did not answer {question!r}"
            box.click()
            page.keyboard.type(question)
            page.keyboard.press("Enter")  # Enter alone, no click on Ask
            got = wait_for(lambda q=question: reply_in(answers.text_content(), q),
                           WIDGET_TIMEOUT_S, f"the chat's answer to {question!r}")
            # greedy decoding: the same answer the lesson printed for the same question
            assert got == expected, (question, got, expected)
            assert expected[0].strip(), f"an empty answer to {question!r}"
            wait_for(lambda: box.input_value() == "", 10, "the box to clear for the next question")
        TIMINGS["chat, 2 answers"] = time.perf_counter() - start
        transcript = answers.text_content()
        assert transcript.index(f"you: {asked[0]}") < transcript.index(f"you: {asked[1]}"), \
            "a new answer should appear below the earlier ones"
        _assert_exercise_notices(page, lab.root / LESSON_02)
        saved = lab.root.parent / "results" / "02_teacher.json"
        assert saved.exists(), f"lesson 02 saved no results in {saved.parent}"
    except Exception:
        _screenshot_on_failure(page, tmp_path / "lesson02.png")
        raise
    finally:
        page.close()
        lab.shut_down_kernels()  # its memory back before the next lesson
