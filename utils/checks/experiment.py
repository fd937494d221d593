"""Open experiments: the learner chooses, the check measures (issue 20, lessons 01-07).

Most exercises ask for one function and check it on known answers. An *open experiment* asks
for a **choice** instead (a temperature and a weight, a defence, a bit width...) and grades
what the choice **does**: the check runs a short experiment with the lesson's own functions
and compares the measured outcome with a bar measured on the course machine. The learner
writes a function with no arguments that returns a dict::

    # Exercise 1.5: choose_distillation_settings
    def choose_distillation_settings():
        ### BEGIN SOLUTION
        return {"temperature": ..., "alpha": ...}
        ### END SOLUTION

    check_distillation_settings(choose_distillation_settings)

The check never takes a number from the learner: a function that returns a made-up score
instead of settings is rejected, and whatever settings come back are run, here and now.
:func:`read_choice` validates the dict against :class:`Setting` specs (names, types, ranges,
each problem with its fix); :func:`run_experiment` wires it into :func:`utils.checks.run_check`,
so the result prints as ``[PASS]``/``[FAIL]``/``[TODO]`` like every other exercise and
``utils.grade`` reads it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from utils.checks import CheckFailed, CheckResult, CheckSignal, run_check

__all__ = ["ChoiceNotMade", "Outcome", "Setting", "read_choice", "run_experiment"]


class ChoiceNotMade(CheckSignal):
    """The learner's choice function still raises ``NotImplementedError``."""

    status = "not_done"


@dataclass(frozen=True)
class Setting:
    """One entry of the learner's choice: its name, type and allowed values.

    ``kind`` is ``"float"`` (any real number, ints accepted), ``"int"``, ``"choice"`` (one of
    ``choices``) or ``"names"`` (a list of non-empty strings, possibly empty); ``low`` and
    ``high`` bound numbers (inclusive unless ``open_low``); ``optional`` allows ``None`` (e.g.
    "no rounding"). ``meaning`` is shown in messages.
    """

    name: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: Sequence[Any] = ()
    optional: bool = False
    meaning: str = ""

    def describe(self) -> str:
        if self.kind == "choice":
            allowed = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "names":
            allowed = "a list of strings, e.g. [] or ['a', 'b']"
        else:
            kind = "a whole number" if self.kind == "int" else "a number"
            lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
            hi = "" if self.high is None else f"<= {self.high:g}"
            allowed = kind + (" " + " and ".join(x for x in (lo, hi) if x) if lo or hi else "")
        if self.optional:
            allowed += ", or None"
        return f"{self.name!r} ({self.meaning + ': ' if self.meaning else ''}{allowed})"


def _read_value(spec: Setting, value: Any) -> Any:
    if value is None:
        if spec.optional:
            return None
        raise CheckFailed(f"{spec.name!r} is None; it should be {spec.describe()}.")
    if spec.kind == "names":
        if isinstance(value, str) or not isinstance(value, list | tuple) or not all(
                isinstance(v, str) and v for v in value):
            raise CheckFailed(f"{spec.name!r} = {value!r} is not allowed; it should be "
                              f"{spec.describe()}.")
        return list(value)
    if spec.kind == "choice":
        if value not in list(spec.choices):
            raise CheckFailed(f"{spec.name!r} = {value!r} is not allowed; it should be "
                              f"{spec.describe()}.")
        return value
    if isinstance(value, bool) or isinstance(value, str):
        raise CheckFailed(f"{spec.name!r} = {value!r} is a {type(value).__name__}; it should be "
                          f"{spec.describe()}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CheckFailed(f"{spec.name!r} = {value!r} ({type(value).__name__}) is not a number; "
                          f"it should be {spec.describe()}.") from None
    if not math.isfinite(number):
        raise CheckFailed(f"{spec.name!r} = {value!r} is not finite; it should be "
                          f"{spec.describe()}.")
    if spec.kind == "int":
        if number != int(number):
            raise CheckFailed(f"{spec.name!r} = {value!r} is not a whole number; it should be "
                              f"{spec.describe()}.")
        number = int(number)
    too_low = spec.low is not None and (number <= spec.low if spec.open_low
                                        else number < spec.low)
    too_high = spec.high is not None and number > spec.high
    if too_low or too_high:
        raise CheckFailed(f"{spec.name!r} = {value!r} is out of range; it should be "
                          f"{spec.describe()}.")
    return number


def read_choice(fn: Callable[[], Any], settings: Sequence[Setting]) -> dict[str, Any]:
    """Call the learner's ``fn()`` and return its choice, validated against ``settings``.

    Raises :class:`ChoiceNotMade` while ``fn`` raises ``NotImplementedError`` and
    :class:`utils.checks.CheckFailed` (with the problem and the fix) for anything that is not
    a dict of exactly these settings with allowed values.
    """
    try:
        choice = fn()
    except NotImplementedError:
        raise ChoiceNotMade("not done yet. Make your choice in the function above and run this "
                            "check again; nothing later in the lesson depends on it, so the "
                            "lesson carries on meanwhile.") from None
    names = [s.name for s in settings]
    wanted = "{" + ", ".join(f"{n!r}: ..." for n in names) + "}"
    if not isinstance(choice, Mapping):
        raise CheckFailed(f"return your settings as a dict {wanted}, not a "
                          f"{type(choice).__name__} ({choice!r:.60}). The check runs the "
                          "experiment itself: it needs the settings, not a result.")
    missing = [n for n in names if n not in choice]
    extra = [k for k in choice if k not in names]
    if missing or extra:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(repr(n) for n in missing))
        if extra:
            problems.append("unknown " + ", ".join(repr(k) for k in extra))
        raise CheckFailed(f"your dict has {' and '.join(problems)}; return exactly {wanted}. "
                          "The check runs the experiment itself from these settings.")
    return {s.name: _read_value(s, choice[s.name]) for s in settings}


@dataclass(frozen=True)
class Outcome:
    """What one run of an open experiment measured, and whether it met the bar."""

    passed: bool
    message: str  # the measurement against the bar, in a sentence
    hint: str = ""  # added when the bar is missed: what to look at next (never the answer)


def run_experiment(exercise: str, name: str, fn: Callable[[], Any],
                   settings: Sequence[Setting], measure: Callable[[dict[str, Any]], Outcome],
                   *, time_limit: float | None = None) -> CheckResult:
    """Read the learner's choice, run ``measure`` on it and report it as a check result.

    ``measure(choice)`` runs the experiment (seconds, not minutes) and returns an
    :class:`Outcome`; a missed bar is a ``failed`` check whose message has the measurement
    and the hint, a met one a ``passed`` check whose message has the measurement.
    """
    box: dict[str, Outcome] = {}

    def cases(fn: Callable[[], Any]) -> None:
        choice = read_choice(fn, settings)
        outcome = measure(choice)
        box["outcome"] = outcome
        if not outcome.passed:
            raise CheckFailed(outcome.message + (f" {outcome.hint}" if outcome.hint else ""))

    return run_check(exercise, name, fn, cases, time_limit=time_limit,
                     success=lambda: box["outcome"].message)
