"""docs/RESULTS.md: findings generated from the committed results, never typed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" /
                                                  "results_doc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_results_doc_is_what_the_committed_results_generate():
    doc = _module()
    assert doc.main(["--check"]) == 0, "run `python scripts/results_doc.py` and commit"


def test_every_lesson_has_findings_with_anchors_and_provenance():
    doc = _module()
    text, _ = doc.render(ROOT / "results")
    for title, files, findings in doc.LESSONS.values():
        assert f"## {title}" in text
        assert findings and all(f.anchor for f in findings), title
        for name in files:
            commit = json.loads((ROOT / "results" / f"{name}.json").read_text())[
                "provenance"]["git_commit"]
            assert f"`results/{name}.json`: `{commit}`" in text


def test_a_missing_key_says_how_to_measure_it_and_a_changed_structure_fails(tmp_path):
    doc = _module()
    shutil.copytree(ROOT / "results", tmp_path / "results")
    path = tmp_path / "results" / "01_distillation_theory.json"
    data = json.loads(path.read_text())
    errors = data.pop("student_distilled_test_errors")
    path.write_text(json.dumps(data))
    text, _ = doc.render(tmp_path / "results", tmp_path)
    assert "not measured yet (`student_distilled_test_errors`): run `make execute`" in text
    data["student_distilled_test_errors"] = errors
    data["paired_tests"]["distilled_vs_alone"] = {"p": 0.5}  # a structure the doc cannot read
    path.write_text(json.dumps(data))
    try:
        doc.render(tmp_path / "results", tmp_path)
    except KeyError:
        pass
    else:
        raise AssertionError("a changed results structure must fail loudly, not render")
