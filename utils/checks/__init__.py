"""Exercise checks and the reference fallback (the pattern of every lesson).

A lesson's exercise is a function the learner writes. Right after it the notebook calls a
``check_*`` function (topic modules: ``utils.checks.distill``, ...) that tries the learner's
function on known answers and invariants and prints *what* is wrong, never a bare
traceback. Code that then uses the exercise calls :func:`use_answer`, which hands back the
learner's function when its check passed and the reference implementation otherwise, with a
notice, so an unanswered exercise never stops the lesson (and nbval can run ``lessons/``).

Writing a check::

    def check_double(fn):
        def cases(fn):
            expect_close(fn(2), 4, "double(2)")
            expect(fn(-1) == -2, "double(-1) should be -2: did you take abs()?")
        return run_check("0.1", "double", fn, cases)

The checks signal each other with :class:`CheckSignal` subclasses (a fake client telling the
check that the learner's loop kept calling, the wall-clock limit of :func:`run_check`). They
derive from ``BaseException``, like ``KeyboardInterrupt``, so a learner's ``except Exception:
continue`` cannot swallow them; :func:`run_check` catches them and reports their message.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["passed", "failed", "not_done", "error"]

_MARK = {"passed": "[PASS]", "failed": "[FAIL]", "not_done": "[TODO]", "error": "[ERROR]"}

# Last check outcome per exercise label and per function object, read by use_answer.
_RESULTS: dict[str, CheckResult] = {}
# Keyed by id() but holding the function too: a live reference keeps the id from being reused
# by a new function after the learner redefines one (a stale result would then be returned).
_RESULTS_BY_FUNCTION: dict[int, tuple[Callable[..., Any], CheckResult]] = {}


# Wall-clock limit of one check, in seconds (the learner's function included). The
# environment variable overrides it ("0", "off" or "none": no limit); so does run_check's
# ``time_limit``.
DEFAULT_TIME_LIMIT = 120.0
TIME_LIMIT_ENV = "DD_CHECK_TIME_LIMIT"
# After the limit, the stop signal is raised again every this many seconds, so a loop that
# swallows one (a bare ``except:`` around a retry) is stopped once a repeat lands outside
# its ``try`` (in practice within a few repeats; the tests measure it).
_REPEAT_STOP = 0.1


class CheckFailed(AssertionError):
    """Raised inside a check when the learner's answer is wrong; the message is the hint."""


class CheckSignal(BaseException):
    """Base of the checks' internal control-flow signals, reported by :func:`run_check`.

    Raised *inside* the learner's code (by a fake client, by the time limit) to stop it. A
    ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` in the learner's
    code cannot swallow it. ``status`` and ``message`` become the check's result.
    """

    status: Status = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class CheckTimeout(CheckSignal):
    """The check ran longer than its wall-clock limit (see :func:`run_check`)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"took over {seconds:g} s")
        self.seconds = seconds


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one exercise check. Truthy exactly when the check passed."""

    exercise: str
    name: str
    status: Status
    message: str

    def __bool__(self) -> bool:
        return self.status == "passed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        return f"{_MARK[self.status]} Exercise {self.exercise} ({self.name}): {self.message}"

    def _ipython_display_(self) -> None:
        # The check already printed its message; showing the object again would repeat it.
        pass


def expect(condition: Any, message: str) -> None:
    """Fail the check with ``message`` (written for the learner) unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


def expect_close(actual: Any, expected: Any, what: str, *, atol: float = 1e-5,
                 rtol: float = 1e-4) -> None:
    """Fail unless ``actual`` is numerically close to ``expected`` (scalars, arrays, tensors)."""
    import numpy as np

    try:
        a = _to_numpy(actual)
    except Exception as exc:  # noqa: BLE001 - turned into a learner-facing message
        raise CheckFailed(f"{what}: could not read your result as numbers ({exc})") from None
    e = _to_numpy(expected)
    if a.shape != e.shape:
        raise CheckFailed(f"{what}: expected shape {tuple(e.shape)}, got {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise CheckFailed(f"{what}: your result contains NaN or inf")
    if not np.allclose(a, e, atol=atol, rtol=rtol):
        diff = float(np.max(np.abs(a - e)))
        if e.size == 1:
            raise CheckFailed(
                f"{what}: expected {float(e.reshape(-1)[0]):.6g}, got {float(a.reshape(-1)[0]):.6g}"
            )
        raise CheckFailed(f"{what}: values differ from the expected ones (max |diff| = {diff:.3g})")


def close(a: float, b: float, *, rtol: float = 1e-4, atol: float = 1e-7) -> bool:
    """``a`` is within ``atol + rtol * |b|`` of ``b`` (scalars)."""
    return abs(a - b) <= atol + rtol * abs(b)


def diagnose(got: float, expected: float, mistakes: dict[str, float], what: str, *,
             rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """Fail naming the known mistake whose value matches ``got``, else expected vs got.

    ``mistakes`` maps a hint ("did you forget the T^2 factor?") to the value that mistake
    produces on the same input, so a wrong answer is explained, not just reported.
    """
    if close(got, expected, rtol=rtol, atol=atol):
        return
    for hint, value in mistakes.items():
        expect(not close(got, value, rtol=rtol, atol=atol),
               f"{what}: expected {expected:.6g}, got {got:.6g}. {hint}")
    expect(False, f"{what}: expected {expected:.6g}, got {got:.6g}.")


def _to_numpy(x: Any):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _learner_frame(exc: BaseException) -> str:
    """Where in the learner's code an exception came from (last frame outside utils)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "/utils/checks" not in f.filename.replace("\\", "/")]
    if not inside:
        return ""
    f = inside[-1]
    line = f" `{f.line.strip()}`" if f.line else ""
    return f" (at line {f.lineno}{line})"


def resolve_time_limit(time_limit: float | None = None) -> float | None:
    """The wall-clock limit, in seconds, a check runs under (``None``: no limit).

    ``time_limit`` when given (``0`` or ``math.inf``: no limit), else the
    ``DD_CHECK_TIME_LIMIT`` environment variable (seconds, or ``off``), else
    :data:`DEFAULT_TIME_LIMIT`. An unreadable environment value falls back to the default.
    """
    if time_limit is None:
        raw = os.environ.get(TIME_LIMIT_ENV, "").strip().lower()
        if raw in ("off", "none"):
            return None
        try:
            time_limit = float(raw) if raw else DEFAULT_TIME_LIMIT
        except ValueError:
            time_limit = DEFAULT_TIME_LIMIT
    time_limit = float(time_limit)
    if not math.isfinite(time_limit) or time_limit <= 0:
        return None
    return time_limit


def _can_time_limit() -> bool:
    """SIGALRM timers exist (not on Windows) and we are in the main thread (as in Jupyter)."""
    return (hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CheckTimeout` in the main thread once ``seconds`` have passed.

    A ``signal.ITIMER_REAL`` timer whose handler raises; the previous handler and timer are
    restored afterwards. Without SIGALRM (Windows), outside the main thread, under a
    handler installed from C (which could not be restored) or under an earlier alarm that
    fires first, the block runs without a limit. Code stuck inside one long C call (a huge
    tensor operation) is stopped when that call returns.
    """
    if seconds is None or not _can_time_limit():
        yield
        return
    previous = signal.getsignal(signal.SIGALRM)
    prev_delay, prev_interval = signal.getitimer(signal.ITIMER_REAL)
    if previous is None or 0 < prev_delay <= seconds:
        yield
        return
    state = {"armed": True}

    def on_alarm(signum: int, frame: Any) -> None:
        if state["armed"]:
            raise CheckTimeout(seconds)

    start = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        # Fires at the limit, then every _REPEAT_STOP s until the block is left.
        signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_STOP)
        yield
    finally:
        state["armed"] = False  # first, before any call: a late alarm is now a no-op
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if prev_delay > 0:  # an outer timer (e.g. a test runner's): give back its rest
            left = prev_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), prev_interval)


def _timeout_message(exc: CheckTimeout) -> str:
    return (f"took over {exc.seconds:g} s, so the check stopped your function"
            f"{_learner_frame(exc)}. Look for a loop that never ends: a `while` whose "
            "condition never turns false, or a retry with no limit. If it is only slow, "
            f"allow more time: os.environ[\"{TIME_LIMIT_ENV}\"] = \"600\".")


def run_check(exercise: str, name: str, fn: Callable[..., Any],
              cases: Callable[[Callable[..., Any]], None], *, quiet: bool = False,
              success: str | Callable[[], str] = "all checks passed.",
              time_limit: float | None = None) -> CheckResult:
    """Run ``cases(fn)`` and turn every outcome into a message for the learner.

    - ``NotImplementedError``: the exercise is not done yet (status ``not_done``);
    - :class:`CheckFailed`: a wrong answer, with the hint the check wrote (``failed``);
    - :class:`CheckTimeout`: the check ran over its wall-clock limit, e.g. an endless loop
      (``error``, "took over N s", with where it was stopped). ``time_limit`` in seconds
      overrides :func:`resolve_time_limit`'s default (120 s or ``DD_CHECK_TIME_LIMIT``).
      The limit needs SIGALRM and the main thread (Jupyter on Linux/macOS); elsewhere (Windows,
      a worker thread) the check runs without one;
    - another :class:`CheckSignal`: its status and message;
    - any other exception: the learner's code crashed; we name it and where (``error``).
    The kernel never sees an exception from here. The result is printed unless ``quiet``.
    ``success`` may be a function called after the cases pass (a message with what they
    measured, as the open experiments of :mod:`utils.checks.experiment` print).
    """
    if not callable(fn):
        result = CheckResult(exercise, name, "error",
                             f"expected a function, got {type(fn).__name__}. Pass the function "
                             f"itself, e.g. check(...)({name}) without calling it.")
    else:
        try:
            with _time_limit(resolve_time_limit(time_limit)):
                cases(fn)
        except NotImplementedError:
            result = CheckResult(exercise, name, "not_done",
                                 "not done yet. Fill in the function above; the lesson carries "
                                 "on with the reference implementation meanwhile.")
        except CheckFailed as exc:
            result = CheckResult(exercise, name, "failed", str(exc))
        except CheckTimeout as exc:
            result = CheckResult(exercise, name, "error", _timeout_message(exc))
        except CheckSignal as exc:
            result = CheckResult(exercise, name, exc.status,
                                 exc.message or f"the check was stopped ({type(exc).__name__})"
                                 f"{_learner_frame(exc)}")
        except Exception as exc:  # noqa: BLE001 - a learner's bug must not kill the kernel
            result = CheckResult(exercise, name, "error",
                                 f"your function raised {type(exc).__name__}: {exc}"
                                 f"{_learner_frame(exc)}")
        else:
            result = CheckResult(exercise, name, "passed",
                                 success() if callable(success) else success)
    _RESULTS[exercise] = result
    _RESULTS_BY_FUNCTION[id(fn)] = (fn, result)
    if not quiet:
        print(result, file=sys.stdout)
    return result


def last_result(exercise: str) -> CheckResult | None:
    """The most recent check outcome for an exercise label, if it was checked."""
    return _RESULTS.get(exercise)


def use_answer(answer: Callable[..., Any], reference: Callable[..., Any], *,
               exercise: str | None = None) -> Callable[..., Any]:
    """The function the rest of the lesson should call.

    - the learner's ``answer`` when its check passed;
    - ``reference`` when the check said "not done", "failed" or "error", with a notice;
    - when ``answer`` was never checked: a wrapper that calls it and switches to the
      reference (once, with a notice) if it raises ``NotImplementedError``.
    """
    label = exercise or getattr(answer, "__name__", "exercise")
    entry = _RESULTS_BY_FUNCTION.get(id(answer))
    result = entry[1] if entry is not None and entry[0] is answer else None
    if result is None and exercise is not None:
        result = _RESULTS.get(exercise)
    if result is not None:
        if result.passed:
            return answer
        why = {"not_done": "is not done yet",
               "failed": "did not pass its check",
               "error": "raised an error in its check"}[result.status]
        print(f"Exercise {result.exercise} ({result.name}) {why}: using the reference "
              "implementation so the rest of the lesson runs.")
        return reference

    state = {"fallback": False}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not state["fallback"]:
            try:
                return answer(*args, **kwargs)
            except NotImplementedError:
                state["fallback"] = True
                print(f"Exercise {label} is not done yet: using the reference implementation "
                      "so the rest of the lesson runs.")
        return reference(*args, **kwargs)

    wrapped.__name__ = getattr(answer, "__name__", "answer")
    wrapped.__doc__ = getattr(answer, "__doc__", None)
    return wrapped


def summary(exercises: list[str] | None = None) -> str:
    """One line per exercise checked in this session: done, failed or still open."""
    rows = [r for k, r in sorted(_RESULTS.items(), key=lambda kv: _label_key(kv[0]))
            if exercises is None or k in exercises]
    if not rows:
        return "No exercises checked yet."
    done = sum(r.passed for r in rows)
    lines = [f"{done} of {len(rows)} exercises pass their checks:"]
    lines += [f"  {r}" for r in rows]
    return "\n".join(lines)


def _label_key(label: str) -> tuple:
    parts = []
    for p in label.split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


def is_finite_number(x: Any) -> bool:
    """True for a real, finite Python or NumPy/torch scalar."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
