"""The open-experiment plumbing (utils/checks/experiment.py): a choice is read and validated
with a message that names the problem and the fix, the outcome is measured by the check (never
taken from the learner), and the result prints like every other exercise for utils.grade.
Lesson 07's open experiment (exercise 7.4, the safety mix of a fine-tune) is tested here too."""

from __future__ import annotations

import math

import nbformat
import pytest
import torch

from utils.checks import last_result
from utils.checks.experiment import (
    ChoiceNotMade,
    Outcome,
    Setting,
    read_choice,
    run_experiment,
)
from utils.checks.safety import (
    MIX_BATCH,
    MIX_MAX_OVER_REFUSAL,
    MIX_MAX_UTILITY_LOSS,
    MIX_MIN_REFUSAL,
    MIX_STEPS,
    MIX_STUDENT,
    check_safety_mix,
    mix_dataset,
    mix_experiment,
    mix_verdicts,
    reference_safety_mix,
)
from utils.device import torch_threads
from utils.grade import check_results
from utils.safety import CourseKeywordJudge

SETTINGS = (
    Setting("t", low=0.0, open_low=True, high=10.0, meaning="a temperature"),
    Setting("k", kind="int", low=1, optional=True),
    Setting("mode", kind="choice", choices=("a", "b")),
)


def test_read_choice_accepts_and_converts():
    got = read_choice(lambda: {"t": 2, "k": 3.0, "mode": "a"}, SETTINGS)
    assert got == {"t": 2.0, "k": 3, "mode": "a"} and isinstance(got["k"], int)
    assert read_choice(lambda: {"t": 0.5, "k": None, "mode": "b"}, SETTINGS)["k"] is None


@pytest.mark.parametrize("choice, words", [
    ([2, 3, "a"], "dict"),
    ({"t": 2, "k": 3}, "missing 'mode'"),
    ({"t": 2, "k": 3, "mode": "a", "x": 1}, "unknown 'x'"),
    ({"t": 0, "k": 3, "mode": "a"}, "out of range"),          # open at 0
    ({"t": 11, "k": 3, "mode": "a"}, "out of range"),
    ({"t": math.inf, "k": 3, "mode": "a"}, "not finite"),
    ({"t": "2", "k": 3, "mode": "a"}, "str"),
    ({"t": True, "k": 3, "mode": "a"}, "bool"),
    ({"t": None, "k": 3, "mode": "a"}, "None"),
    ({"t": 2, "k": 2.5, "mode": "a"}, "whole number"),
    ({"t": 2, "k": 0, "mode": "a"}, "out of range"),
    ({"t": 2, "k": 3, "mode": "c"}, "not allowed"),
    ({"t": [2], "k": 3, "mode": "a"}, "not a number"),
])
def test_read_choice_names_the_problem(choice, words):
    with pytest.raises(AssertionError, match=words):  # CheckFailed is an AssertionError
        read_choice(lambda: choice, SETTINGS)


def test_read_choice_not_done():
    def not_done():
        raise NotImplementedError

    with pytest.raises(ChoiceNotMade):
        read_choice(not_done, SETTINGS)


def test_run_experiment_measures_and_reports(capsys):
    seen = []

    def measure(choice):
        seen.append(choice)
        score = 10 * choice["t"]  # the check measures; the learner only chose t
        return Outcome(score >= 20, f"t = {choice['t']:g}: score {score:g}, bar 20",
                       "try a larger t")

    ok = run_experiment("9.9", "choose_t", lambda: {"t": 3, "k": None, "mode": "a"},
                        SETTINGS, measure)
    assert ok.passed and ok.message == "t = 3: score 30, bar 20" and last_result("9.9") == ok
    bad = run_experiment("9.9", "choose_t", lambda: {"t": 1, "k": None, "mode": "a"},
                         SETTINGS, measure)
    assert bad.status == "failed" and bad.message.endswith("bar 20 try a larger t")
    assert len(seen) == 2
    todo = run_experiment("9.9", "choose_t", _raise(NotImplementedError), SETTINGS, measure)
    assert todo.status == "not_done" and "carries on" in todo.message and len(seen) == 2
    crash = run_experiment("9.9", "choose_t", _raise(ZeroDivisionError), SETTINGS, measure)
    assert crash.status == "error" and "ZeroDivisionError" in crash.message
    # the printed lines are what utils.grade reads from an executed notebook
    printed = capsys.readouterr().out
    nb = nbformat.from_dict({"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": line + "\n"}]}
        for line in printed.splitlines()]})
    assert [line[:6] for line in printed.splitlines()] == ["[PASS]", "[FAIL]", "[TODO]", "[ERROR"]
    assert check_results(nb)["9.9"][0] == "failed"  # the last line printed wins (the crash)


def _raise(exc):
    def fn():
        raise exc()
    return fn


def test_run_experiment_measure_errors_are_reported():
    def broken(choice):
        raise RuntimeError("disk full")

    result = run_experiment("9.8", "choose_t", lambda: {"t": 1, "k": None, "mode": "a"},
                            SETTINGS, broken)
    assert result.status == "error" and "disk full" in result.message


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- 7.4 open experiment: safety mix
# The check fine-tunes the shipped SFT student for real (half a minute a run), so these tests
# re-measure the bars' ends: the skill chats alone erode the refusals (Qi et al. 2023), refusals
# alone raise over-refusal, nothing but safety data loses the skills, the reference passes all.

REFERENCE_MIX = reference_safety_mix()


@pytest.fixture(scope="module")
def mix_student():
    from utils.models import load_model

    student, tok = load_model(MIX_STUDENT, verbose=False)
    return student.eval(), tok


def test_mix_dataset_counts_and_content():
    ds, counts = mix_dataset(0.1, 0.5, n=200)
    assert counts == {"skills": 180, "refusals": 10, "lookalikes": 10} and len(ds) == 200
    replies = [m["messages"][-1]["content"] for m in ds]
    refused = sum(CourseKeywordJudge().judge(replies))
    assert refused >= 10  # the restricted requests come with the world's refusal
    again, _ = mix_dataset(0.1, 0.5, n=200)
    assert [m["messages"] for m in again] == [m["messages"] for m in ds]  # seeded
    ds0, counts0 = mix_dataset(0.0, 0.7, n=64)
    assert counts0 == {"skills": 64, "refusals": 0, "lookalikes": 0}
    _, counts1 = mix_dataset(1.0, 0.0, n=MIX_STEPS * MIX_BATCH)  # more than the pool: repeats
    assert counts1["refusals"] == MIX_STEPS * MIX_BATCH
    with pytest.raises(ValueError, match="between 0 and 1"):
        mix_experiment(None, None, safety_fraction=1.5, lookalike_share=0.0)


def test_safety_mix_check_accepts_the_reference_with_a_margin(mix_student):
    result = check_safety_mix(lambda: REFERENCE_MIX, *mix_student)
    assert result.passed, result
    r = mix_experiment(*mix_student, **REFERENCE_MIX)  # the check's run (cached)
    before, after = r["before"], r["after"]
    assert before["refusal"].rate >= 0.99 and all(mix_verdicts(r).values())
    assert after["refusal"].low >= MIX_MIN_REFUSAL + 0.03, after  # margins of a few prompts
    assert after["over_refusal"].high <= MIX_MAX_OVER_REFUSAL - 0.02, after
    assert after["utility"].rate >= before["utility"].rate - MIX_MAX_UTILITY_LOSS + 0.01, r
    assert f"-> {after['refusal']}" in result.message  # the message is the measurement


@pytest.mark.parametrize("choice, words", [
    ({"safety_fraction": 0.0, "lookalike_share": 0.0}, "refusals eroded"),  # skill chats alone
    ({"safety_fraction": 0.1, "lookalike_share": 0.0}, "over-refusal too high"),  # refusals only
    ({"safety_fraction": 1.0, "lookalike_share": 0.5}, "skills lost"),  # nothing but safety
])
def test_safety_mix_check_rejects_the_ends(mix_student, choice, words):
    result = check_safety_mix(lambda: choice, *mix_student)
    assert result.status == "failed", result
    assert words in result.message, result.message
    r = mix_experiment(*mix_student, **choice)
    assert sum(not met for met in mix_verdicts(r).values()) == 1  # exactly the one named above
    if choice["safety_fraction"] == 0.0:  # erosion: far outside the student's own interval
        assert r["after"]["refusal"].high < r["before"]["refusal"].low, r


@pytest.mark.parametrize("choice, words", [
    ({"safety_fraction": 0.1}, "missing 'lookalike_share'"),
    ({**REFERENCE_MIX, "lr": 1e-4}, "unknown 'lr'"),  # the recipe is the service's
    ({**REFERENCE_MIX, "safety_fraction": 10}, "out of range"),  # a percentage, not a share
    ({**REFERENCE_MIX, "lookalike_share": -0.1}, "out of range"),
    ({**REFERENCE_MIX, "safety_fraction": "10%"}, "str"),
    ({"refusal": 1.0, "over_refusal": 0.0, "utility": 0.9}, "settings"),  # a fake result
    (0.1, "settings"),  # a bare number
])
def test_safety_mix_check_rejects_wrong_types_and_fake_results(choice, words):
    result = check_safety_mix(lambda: choice, None, None)  # never reached
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_safety_mix_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 7.4: choose_safety_mix")

    result = check_safety_mix(not_done, None, None)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_safety_mix(lambda: 1 / 0, None, None).status == "error"
