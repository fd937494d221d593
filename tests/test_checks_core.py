"""The exercise machinery (utils.checks): statuses, the reference fallback, summary()."""

from __future__ import annotations

import pytest

import utils.checks as checks
from utils.checks import (
    CheckFailed,
    expect,
    expect_close,
    last_result,
    run_check,
    summary,
    use_answer,
)


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    monkeypatch.setattr(checks, "_RESULTS", {})
    monkeypatch.setattr(checks, "_RESULTS_BY_FUNCTION", {})


def double_cases(fn):
    expect_close(fn(2), 4, "double(2)")
    expect(fn(-1) == -2, "double(-1) should be -2: did you take abs()?")


def reference_double(x):
    return 2 * x


def test_passed(capsys):
    result = run_check("9.1", "double", reference_double, double_cases)
    assert result.status == "passed" and result and result.passed
    assert capsys.readouterr().out.strip() == "[PASS] Exercise 9.1 (double): all checks passed."


def test_failed_carries_the_hint(capsys):
    result = run_check("9.1", "double", lambda x: abs(2 * x), double_cases)
    assert result.status == "failed" and not result
    assert "did you take abs()" in result.message
    assert "[FAIL]" in capsys.readouterr().out


def test_expect_close_message_names_values():
    result = run_check("9.1", "double", lambda x: 3 * x, double_cases, quiet=True)
    assert result.status == "failed"
    assert result.message == "double(2): expected 4, got 6"


def test_not_done(capsys):
    def double(x):
        raise NotImplementedError("Exercise 9.1: double")

    result = run_check("9.1", "double", double, double_cases)
    assert result.status == "not_done"
    assert "[TODO]" in capsys.readouterr().out


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), KeyError("k"),
                                 RecursionError("too deep"), ValueError("bad"),
                                 AssertionError("learner assert")])
def test_learner_bugs_never_raise(exc):
    def double(x):
        raise exc

    result = run_check("9.1", "double", double, double_cases, quiet=True)
    assert result.status == "error"
    assert type(exc).__name__ in result.message
    assert "raise exc" in result.message  # the learner's line is named


def test_not_a_function():
    result = run_check("9.1", "double", 4, double_cases, quiet=True)
    assert result.status == "error" and "expected a function, got int" in result.message


def test_expect_close_bad_results():
    with pytest.raises(CheckFailed, match="NaN or inf"):
        expect_close(float("nan"), 1.0, "x")
    with pytest.raises(CheckFailed, match=r"expected shape \(2,\), got \(3,\)"):
        expect_close([1, 2, 3], [1, 2], "v")
    with pytest.raises(CheckFailed, match="could not read your result as numbers"):
        expect_close("four", 4, "x")
    expect_close([1.0, 2.0], [1.0, 2.0 + 1e-7], "v")  # close enough: no exception


def test_use_answer_returns_the_passing_answer(capsys):
    run_check("9.1", "double", reference_double, double_cases, quiet=True)
    assert use_answer(reference_double, reference=lambda x: -1) is reference_double
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("answer, why", [
    (lambda x: abs(2 * x), "did not pass its check"),
    (lambda x: 1 / 0, "raised an error in its check"),
])
def test_use_answer_falls_back_after_a_bad_check(answer, why, capsys):
    run_check("9.1", "double", answer, double_cases, quiet=True)
    fn = use_answer(answer, reference=reference_double)
    assert fn is reference_double
    out = capsys.readouterr().out
    assert f"Exercise 9.1 (double) {why}: using the reference" in out


def test_use_answer_not_done(capsys):
    def double(x):
        raise NotImplementedError("Exercise 9.1: double")

    run_check("9.1", "double", double, double_cases, quiet=True)
    assert use_answer(double, reference=reference_double)(5) == 10
    assert "is not done yet: using the reference" in capsys.readouterr().out


def test_use_answer_unchecked_falls_back_once(capsys):
    def double(x):
        raise NotImplementedError

    fn = use_answer(double, reference=reference_double)
    assert [fn(1), fn(2), fn(3)] == [2, 4, 6]
    out = capsys.readouterr().out
    assert out.count("Exercise double is not done yet") == 1
    assert fn.__name__ == "double"


def test_use_answer_unchecked_working_answer_is_used():
    fn = use_answer(lambda x: x + x, reference=lambda x: -1)
    assert fn(3) == 6


def test_use_answer_by_exercise_label():
    run_check("9.1", "double", reference_double, double_cases, quiet=True)

    def other(x):  # a new object: found through the exercise label instead
        return 2 * x

    assert use_answer(other, reference=lambda x: -1, exercise="9.1") is other


def test_use_answer_is_not_fooled_by_a_redefined_function():
    # A redefined function must not inherit the result of the one it replaced.
    def double(x):
        return 2 * x

    run_check("9.1", "double", double, double_cases, quiet=True)
    del double

    def double(x):  # noqa: F811 - redefined on purpose, like a learner re-running a cell
        raise NotImplementedError

    assert use_answer(double, reference=reference_double)(4) == 8


def test_summary(capsys):
    assert summary() == "No exercises checked yet."
    run_check("10.1", "double", reference_double, double_cases, quiet=True)
    run_check("2.1", "broken", lambda x: 0, double_cases, quiet=True)

    def todo(x):
        raise NotImplementedError

    run_check("2.10", "todo", todo, double_cases, quiet=True)
    text = summary()
    lines = text.splitlines()
    assert lines[0] == "1 of 3 exercises pass their checks:"
    # numeric order: 2.1 < 2.10 < 10.1
    assert [line.split("Exercise ")[1].split(" ")[0] for line in lines[1:]] == \
        ["2.1", "2.10", "10.1"]
    assert "[FAIL]" in lines[1] and "[TODO]" in lines[2] and "[PASS]" in lines[3]
    assert summary(["10.1"]).startswith("1 of 1 exercises pass")
    assert last_result("2.1").status == "failed"
