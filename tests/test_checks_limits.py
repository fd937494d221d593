"""Learner-proof checks (issue 21): signals a learner cannot swallow, a wall-clock limit.

A learner's ``except Exception: continue`` must not swallow the checks' own signals, and an
endless loop must end in a "took over N s" message, never a hung kernel or a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import signal
import threading
import time

import pytest

import utils.checks as checks
from utils.checks import (
    DEFAULT_TIME_LIMIT,
    TIME_LIMIT_ENV,
    CheckFailed,
    CheckSignal,
    CheckTimeout,
    expect,
    resolve_time_limit,
    run_check,
    use_answer,
)

needs_sigalrm = pytest.mark.skipif(not hasattr(signal, "setitimer"),
                                   reason="no SIGALRM timers on this platform")


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    monkeypatch.setattr(checks, "_RESULTS", {})
    monkeypatch.setattr(checks, "_RESULTS_BY_FUNCTION", {})
    monkeypatch.delenv(TIME_LIMIT_ENV, raising=False)


@pytest.fixture(autouse=True)
def _no_timer_left_behind():
    """Every test must leave no alarm pending and the default SIGALRM handler in place."""
    handler = signal.getsignal(signal.SIGALRM) if hasattr(signal, "SIGALRM") else None
    yield
    if hasattr(signal, "setitimer"):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is handler


def one_cases(fn):
    expect(fn(1) == 1, "fn(1) should be 1")


def loops_forever(x):
    n = 0
    while True:  # the bug the time limit is for
        n += 1


def loops_forever_swallowing(x):
    while True:
        try:
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the learner's habit under test
            continue


def loops_forever_swallowing_everything(x):
    n = 0
    while True:
        try:
            n += 1
        except BaseException:  # noqa: BLE001 - worse still: a bare except
            pass


# --------------------------------------------------------------------------------------
# Course signals are BaseExceptions, and run_check reports them
# --------------------------------------------------------------------------------------


def _check_modules():
    yield checks
    for info in pkgutil.iter_modules(checks.__path__):
        yield importlib.import_module(f"utils.checks.{info.name}")


def test_every_internal_signal_is_unswallowable():
    # CheckFailed is raised by the checks' own code, after the learner's function returned,
    # never inside it; every other exception class of utils.checks is a signal raised *inside*
    # the learner's code (a fake client, the timer) and must pass through `except Exception`.
    found = []
    for module in _check_modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__ and obj is not CheckFailed):
                found.append(name)
                assert issubclass(obj, CheckSignal), f"{module.__name__}.{name}"
                assert not issubclass(obj, Exception), f"{module.__name__}.{name}"
    assert {"CheckSignal", "CheckTimeout", "_KeptCalling"} <= set(found)


def test_a_signal_swallowing_learner_cannot_hide_it():
    class Stop(CheckSignal):
        status = "failed"

    def cases(fn):
        def poke():
            raise Stop("you kept going after being told to stop")
        fn(poke)

    def learner(poke):
        for _ in range(3):
            try:
                poke()
            except Exception:  # noqa: BLE001 - what the check must survive
                continue
        return "swallowed"

    result = run_check("9.2", "stop", learner, cases, quiet=True)
    assert result.status == "failed"
    assert result.message == "you kept going after being told to stop"


def test_a_signal_without_message_is_still_explained(capsys):
    def cases(fn):
        raise CheckSignal()

    result = run_check("9.2", "stop", lambda x: x, cases)
    assert result.status == "error" and "CheckSignal" in result.message
    assert "Traceback" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# The wall-clock limit
# --------------------------------------------------------------------------------------


def test_resolve_time_limit(monkeypatch):
    assert resolve_time_limit() == DEFAULT_TIME_LIMIT == 120.0
    assert resolve_time_limit(5) == 5.0
    assert resolve_time_limit(0) is None and resolve_time_limit(float("inf")) is None
    monkeypatch.setenv(TIME_LIMIT_ENV, "7.5")
    assert resolve_time_limit() == 7.5
    assert resolve_time_limit(3) == 3.0  # the per-call value wins
    for off in ("off", "None", "0"):
        monkeypatch.setenv(TIME_LIMIT_ENV, off)
        assert resolve_time_limit() is None
    monkeypatch.setenv(TIME_LIMIT_ENV, "ten minutes")
    assert resolve_time_limit() == DEFAULT_TIME_LIMIT


@needs_sigalrm
@pytest.mark.parametrize("learner", [loops_forever, loops_forever_swallowing,
                                     loops_forever_swallowing_everything],
                         ids=lambda f: f.__name__)
def test_an_endless_loop_is_stopped(learner, capsys):
    start = time.monotonic()
    result = run_check("9.3", "endless", learner, one_cases, time_limit=1)
    elapsed = time.monotonic() - start
    assert elapsed < 5, elapsed
    assert result.status == "error" and not result
    assert result.message.startswith("took over 1 s"), result.message
    assert "loop that never ends" in result.message
    assert TIME_LIMIT_ENV in result.message
    assert "(at line" in result.message  # where the learner's code was stopped
    out = capsys.readouterr().out
    assert out.startswith("[ERROR] Exercise 9.3 (endless): took over 1 s")
    assert "Traceback" not in out
    time.sleep(0.3)  # no stray alarm fires after the check returned


@needs_sigalrm
def test_the_environment_variable_sets_the_limit(monkeypatch):
    monkeypatch.setenv(TIME_LIMIT_ENV, "0.5")
    start = time.monotonic()
    result = run_check("9.3", "endless", loops_forever, one_cases, quiet=True)
    assert time.monotonic() - start < 5
    assert result.message.startswith("took over 0.5 s"), result.message


@needs_sigalrm
def test_a_fast_check_is_unaffected_and_leaves_no_timer():
    result = run_check("9.3", "identity", lambda x: x, one_cases, quiet=True, time_limit=1)
    assert result.passed
    time.sleep(1.2)  # past the limit: the timer was cancelled, nothing fires


@needs_sigalrm
def test_after_a_timeout_the_lesson_uses_the_reference():
    run_check("9.3", "endless", loops_forever, one_cases, quiet=True, time_limit=0.3)
    assert use_answer(loops_forever, reference=lambda x: x) is not loops_forever


@needs_sigalrm
def test_a_previous_handler_and_timer_are_restored():
    calls = []

    def outer(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        result = run_check("9.3", "endless", loops_forever, one_cases, quiet=True,
                           time_limit=0.3)
        assert result.message.startswith("took over 0.3 s")
        assert signal.getsignal(signal.SIGALRM) is outer
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left < 30  # the outer timer runs on, minus the time the check took
        assert calls == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


@needs_sigalrm
def test_an_earlier_outer_alarm_is_left_to_fire():
    class OuterAlarm(BaseException):
        pass

    def outer(signum, frame):
        raise OuterAlarm

    before = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(OuterAlarm):  # the outer deadline comes first: it is not ours
            run_check("9.3", "endless", loops_forever, one_cases, quiet=True, time_limit=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_outside_the_main_thread_the_check_runs_without_a_limit():
    results = []

    def slow(x):
        time.sleep(0.5)
        return x

    worker = threading.Thread(target=lambda: results.append(
        run_check("9.3", "slow", slow, one_cases, quiet=True, time_limit=0.1)))
    worker.start()
    worker.join(10)
    assert results and results[0].passed


def test_check_timeout_names_its_limit():
    exc = CheckTimeout(2.5)
    assert isinstance(exc, CheckSignal) and not isinstance(exc, Exception)
    assert exc.seconds == 2.5 and exc.message == "took over 2.5 s"
