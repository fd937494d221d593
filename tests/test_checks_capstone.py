"""Mutation tests for lesson 08's checks: each known-wrong answer must be rejected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from utils.capstone import BAR_SPECS, Bars, Choice, bar_met
from utils.checks.capstone import (
    check_bar_met,
    check_configuration,
    check_guarded_reply,
    check_verify_manifest,
    reference_verify_manifest,
)
from utils.guardrail import REFUSAL_REPLY, guarded_reply
from utils.io import sha256_file
from utils.model_cache import verify_folder

# ---------------------------- 8.1 bar_met ------------------------------------------------


def point_estimate(value, ci, threshold, direction):
    return value >= threshold if direction == "min" else value <= threshold


def wrong_end(value, ci, threshold, direction):
    return ci[1] >= threshold if direction == "min" else ci[0] <= threshold


def strict(value, ci, threshold, direction):
    return ci[0] > threshold if direction == "min" else ci[1] < threshold


def ignores_direction(value, ci, threshold, direction):
    return ci[0] >= threshold


def nan_passes(value, ci, threshold, direction):
    if math.isnan(value):
        return True
    return bar_met(value, ci, threshold, direction)


def returns_string(value, ci, threshold, direction):
    return "yes" if bar_met(value, ci, threshold, direction) else ""


def not_done(value, ci, threshold, direction):
    raise NotImplementedError


def test_bar_met_reference_passes():
    assert check_bar_met(bar_met, exercise="t").passed


@pytest.mark.parametrize("wrong, hint", [
    (point_estimate, "interval"), (wrong_end, "end"), (strict, "exactly at the bar"),
    (ignores_direction, "'max'"), (nan_passes, "NaN"), (returns_string, "True or False"),
])
def test_bar_met_mutants_fail(wrong, hint):
    r = check_bar_met(wrong, exercise="t")
    assert r.status == "failed" and hint in r.message, r.message


def test_bar_met_not_done():
    assert check_bar_met(not_done, exercise="t").status == "not_done"


# ---------------------------- 8.2 verify_manifest ----------------------------------------


def sizes_only(folder):
    folder = Path(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [n for n, m in files.items()
            if not (folder / n).is_file() or (folder / n).stat().st_size != m["bytes"]]


def weights_only(folder):
    folder = Path(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [n for n, m in files.items() if n.endswith(".safetensors")
            and (not (folder / n).is_file() or sha256_file(folder / n) != m["sha256"])]


def crashes_on_missing(folder):
    folder = Path(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [n for n, m in files.items() if sha256_file(folder / n) != m["sha256"]]


def first_problem_only(folder):
    return reference_verify_manifest(folder)[:1]


def verify_folder_as_list(folder):  # the library's one-string answer: stops at the first
    problem = verify_folder(folder)
    return [] if problem is None else [problem]


def every_file_in_folder(folder):
    folder = Path(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [p.name for p in folder.iterdir() if p.name != "manifest.json"
            and (p.name not in files or sha256_file(p) != files[p.name]["sha256"])] + \
        [n for n in files if not (folder / n).is_file()]


def always_ok(folder):
    return []


def test_verify_manifest_reference_passes():
    assert check_verify_manifest(reference_verify_manifest, exercise="t").passed


@pytest.mark.parametrize("wrong, status, hint", [
    (sizes_only, "failed", "sha256"), (weights_only, "failed", "tokenizer.json"),
    (crashes_on_missing, "error", "FileNotFoundError"), (first_problem_only, "failed", "two"),
    (verify_folder_as_list, "failed", ""), (every_file_in_folder, "failed", "does not list"),
    (always_ok, "failed", "flipped byte"),
])
def test_verify_manifest_mutants_fail(wrong, status, hint):
    r = check_verify_manifest(wrong, exercise="t")
    assert r.status == status and hint in r.message, r.message


# ---------------------------- 8.3 guarded_reply ------------------------------------------


def generates_first(prompt, generate, input_blocked, output_blocked):
    reply = generate(prompt)
    if input_blocked(prompt):
        return REFUSAL_REPLY, "input"
    if output_blocked(prompt, reply):
        return REFUSAL_REPLY, "output"
    return reply, "model"


def no_output_filter(prompt, generate, input_blocked, output_blocked):
    if input_blocked(prompt):
        return REFUSAL_REPLY, "input"
    return generate(prompt), "model"


def swapped_arguments(prompt, generate, input_blocked, output_blocked):
    if input_blocked(prompt):
        return REFUSAL_REPLY, "input"
    reply = generate(prompt)
    if output_blocked(reply, prompt):
        return REFUSAL_REPLY, "output"
    return reply, "model"


def wrong_stage(prompt, generate, input_blocked, output_blocked):
    reply, stage = guarded_reply(prompt, generate, input_blocked, output_blocked)
    return reply, "blocked" if stage != "model" else stage


def refuses_everything(prompt, generate, input_blocked, output_blocked):
    return REFUSAL_REPLY, "input"


def returns_reply_only(prompt, generate, input_blocked, output_blocked):
    return guarded_reply(prompt, generate, input_blocked, output_blocked)[0]


def test_guarded_reply_reference_passes():
    assert check_guarded_reply(guarded_reply, exercise="t").passed


@pytest.mark.parametrize("wrong, hint", [
    (generates_first, "model was called"), (no_output_filter, "output filter"),
    (swapped_arguments, "output_blocked"), (wrong_stage, "stage"),
    (refuses_everything, "unchanged"), (returns_reply_only, "(reply, stage)"),
])
def test_guarded_reply_mutants_fail(wrong, hint):
    r = check_guarded_reply(wrong, exercise="t")
    assert r.status == "failed" and hint in r.message, r.message


# ---------------------------- 8.4 the open experiment ------------------------------------


def fake_evaluate(choice: Choice) -> dict:
    """Canned verdicts: only the white-box student through ONNX Runtime int8 meets every bar."""
    missed = set()
    if choice.runtime == "pytorch":
        missed |= {"peak_rss_mb"}
    if choice.quantization == "none":
        missed |= {"file_bytes"}
    if choice.student.endswith("skills-only") or "filtered" in choice.student:
        missed |= {"refusal_rate", "heldout_jailbreak_success_rate"}
    if choice.quantization == "2bit":
        missed |= {"exact_match"}
    return {"verdicts": {n: {"met": n not in missed} for n in BAR_SPECS}}


def test_configuration_reference_passes():
    r = check_configuration(lambda: Choice("whitebox", "int8", "onnxruntime"), fake_evaluate,
                            exercise="t")
    assert r.passed, r.message


@pytest.mark.parametrize("choice, hint", [
    (Choice("whitebox-skills-only", "int8", "onnxruntime"), "transfer set"),
    (Choice("whitebox", "none", "onnxruntime"), "device budget"),
    (Choice("whitebox", "int8", "pytorch"), "runtime"),
    (Choice("whitebox", "2bit", "pytorch"), "fewer bits"),
])
def test_configuration_that_misses_a_bar_fails_with_a_hint(choice, hint):
    r = check_configuration(lambda: choice, fake_evaluate, exercise="t")
    assert r.status == "failed" and hint in r.message, r.message
    assert "onnxruntime" not in r.message.split("Think about")[1]  # hints never give the line


def test_configuration_rejects_non_choices_and_impossible_ones():
    r = check_configuration(lambda: ("whitebox", "int8", "onnxruntime"), fake_evaluate,
                            exercise="t")
    assert r.status == "failed" and "Choice(" in r.message
    r = check_configuration(lambda: Choice("whitebox", "2bit", "onnxruntime"), fake_evaluate,
                            exercise="t")
    assert r.status == "failed" and "2-bit" in r.message
    r = check_configuration(lambda: Choice("giant", "int8", "onnxruntime"), fake_evaluate,
                            exercise="t")
    assert r.status == "failed" and "choose from" in r.message


def test_configuration_not_done():
    def todo():
        raise NotImplementedError

    assert check_configuration(todo, fake_evaluate, exercise="t").status == "not_done"


def test_default_bars_match_the_lesson_06_budget():
    import json as _json

    from utils.paths import repo_root

    lesson06 = _json.loads((repo_root() / "results" / "06_on_device_deployment.json")
                           .read_text(encoding="utf-8"))
    assert Bars().max_file_bytes == int(lesson06["budget"]["max_bytes"])
