"""The open-experiment plumbing (utils/checks/experiment.py): a choice is read and validated
with a message that names the problem and the fix, the outcome is measured by the check (never
taken from the learner), and the result prints like every other exercise for utils.grade."""

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
from utils.device import torch_threads
from utils.grade import check_results

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
