"""Mutation tests of lesson 00's check (utils.checks.setup): wrong answers are rejected."""

from __future__ import annotations

import pytest

import utils.checks as checks
from utils.checks.setup import bytes_for, check_bytes_for


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    monkeypatch.setattr(checks, "_RESULTS", {})
    monkeypatch.setattr(checks, "_RESULTS_BY_FUNCTION", {})


def test_reference_values():
    assert bytes_for(10**9, 16) == 2e9
    assert bytes_for(10**9, 8) == 1e9
    assert bytes_for(10**9, 4) == 5e8
    assert bytes_for(3, 4) == 1.5
    with pytest.raises(ValueError, match="bits > 0"):
        bytes_for(10, 0)
    with pytest.raises(ValueError, match="num_params >= 0"):
        bytes_for(-1, 8)


def test_reference_passes(capsys):
    result = check_bytes_for(bytes_for)
    assert result.status == "passed", result.message
    assert "[PASS] Exercise 0.1 (bytes_for)" in capsys.readouterr().out


def test_other_correct_spellings_pass():
    assert check_bytes_for(lambda n, b: n / 8 * b)
    assert check_bytes_for(lambda n, b: b * n / 8.0)
    assert check_bytes_for(lambda n, b: n * (b / 8))


MUTANTS = {
    "bits, not bytes": (lambda n, b: n * b, "divide by 8"),
    "upside down": (lambda n, b: n * 8 / b, "upside down"),
    "always 2 bytes": (lambda n, b: n * 2, "`bits` argument"),
    "always 4 bytes": (lambda n, b: n * 4, "`bits` argument"),
    "megabytes": (lambda n, b: n * b / 8 / 1e6, "megabytes"),
    "MiB": (lambda n, b: n * b / 8 / 2**20, "MiB"),
    "gigabytes": (lambda n, b: n * b / 8 / 1e9, "gigabytes"),
    "integer bits // 8": (lambda n, b: n * (b // 8), "bits // 8"),
    "floor division": (lambda n, b: n * b // 8, "round down"),
    "off by one": (lambda n, b: (n + 1) * b / 8, "expected"),
    "header added": (lambda n, b: n * b / 8 + 8, "expected"),
    "returns a string": (lambda n, b: f"{n * b / 8} bytes", "return a number"),
    "returns None": (lambda n, b: None, "return a number"),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutants_are_rejected(name, capsys):
    fn, hint = MUTANTS[name]
    result = check_bytes_for(fn)
    assert result.status == "failed", f"the check accepted a wrong answer: {name}"
    assert hint in result.message, result.message
    assert "[FAIL] Exercise 0.1" in capsys.readouterr().out


def test_not_done_and_crash():
    def not_done(num_params, bits):
        raise NotImplementedError("Exercise 0.1: bytes_for")

    def crashes(num_params, bits):
        return num_params * bits / undefined_name  # noqa: F821 - the learner's bug

    assert check_bytes_for(not_done).status == "not_done"
    result = check_bytes_for(crashes)
    assert result.status == "error"
    assert "NameError" in result.message and "undefined_name" in result.message
