"""Checks for lesson 08 (capstone): bars with intervals, the sha256 manifest, the guardrail,
and the open experiment (a configuration that meets every bar).

The exercises and the signatures the checks expect:

- ``bar_met(value, ci, threshold, direction) -> bool``: ``direction="min"`` needs the
  interval's low end at or above ``threshold``, ``"max"`` its high end at or below; NaN fails.
  Reference: :func:`utils.capstone.bar_met`.
- ``verify_manifest(folder) -> list[str]``: every file listed in ``folder/manifest.json``
  (``{"files": {name: {"sha256", "bytes"}}}``) exists with that size and sha256; returns one
  problem per bad file, naming it (empty list: the folder is intact). Reference:
  :func:`reference_verify_manifest` (the same rule as :func:`utils.model_cache.verify_folder`).
- ``guarded_reply(prompt, generate, input_blocked, output_blocked) -> (reply, stage)``:
  reference :func:`utils.guardrail.guarded_reply`.
- ``choose_configuration() -> utils.capstone.Choice``: graded by outcome, the card of the
  chosen configuration must meet every bar (:func:`check_configuration`).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from utils.capstone import BAR_SPECS, Choice
from utils.checks import CheckFailed, CheckResult, expect, run_check
from utils.guardrail import REFUSAL_REPLY
from utils.io import sha256_file

# --------------------------------------------------------------------------------------
# Exercise 8.1: bar_met(value, ci, threshold, direction) -> bool
# --------------------------------------------------------------------------------------

# (value, ci, threshold, direction, expected, what a wrong answer here usually means)
BAR_CASES: tuple[tuple[float, tuple[float, float], float, str, bool, str], ...] = (
    (0.89, (0.86, 0.92), 0.80, "min", True,
     "the whole interval is above a minimum: for direction 'min' compare the low end, >="),
    (0.82, (0.78, 0.86), 0.80, "min", False,
     "the point estimate passes a minimum but the interval's low end (0.78) does not: the bar "
     "must hold with 95% confidence, so read the low end"),
    (0.05, (0.03, 0.08), 0.10, "max", True,
     "the whole interval is below a maximum: for direction 'max' compare the high end, <="),
    (0.08, (0.05, 0.12), 0.10, "max", False,
     "the point estimate is under a maximum but the high end (0.12) is over it: read the "
     "interval's high end for a maximum"),
    (0.85, (0.80, 0.90), 0.80, "min", True, "exactly at the bar counts as meeting it (>=)"),
    (0.07, (0.04, 0.10), 0.10, "max", True, "exactly at the bar counts as meeting it (<=)"),
    (0.05, (0.03, 0.08), 0.10, "min", False,
     "direction 'min' means at least the threshold: 0.03 is not at least 0.10"),
    (0.89, (0.86, 0.92), 0.80, "max", False,
     "direction 'max' means at most the threshold: 0.92 is not at most 0.80"),
    (5000.0, (4200.0, 5200.0), 1000.0, "min", True, "bars are not only rates"),
    (900.0, (800.0, 1200.0), 1000.0, "min", False, "800 tokens/s at the slow end is below 1000"),
    (float("nan"), (float("nan"), float("nan")), 0.5, "min", False,
     "a NaN measurement (nothing measured) never meets a bar"),
)


def check_bar_met(fn: Callable[..., Any], *, exercise: str = "8.1") -> CheckResult:
    """Exercise: ``bar_met(value, ci, threshold, direction) -> bool``."""

    def cases(fn: Callable[..., Any]) -> None:
        for value, ci, threshold, direction, expected, why in BAR_CASES:
            got = fn(value, ci, threshold, direction)
            expect(isinstance(got, bool) or type(got).__name__ == "bool_",
                   f"bar_met should return True or False, got {type(got).__name__}")
            shown = "nan" if math.isnan(value) else f"{value:g}"
            expect(bool(got) == expected,
                   f"bar_met({shown}, {list(ci)}, {threshold:g}, {direction!r}) returned "
                   f"{bool(got)}, expected {expected}: {why}.")

    return run_check(exercise, "bar_met", fn, cases)


# --------------------------------------------------------------------------------------
# Exercise 8.2: verify_manifest(folder) -> list[str]
# --------------------------------------------------------------------------------------


def reference_verify_manifest(folder: str | Path) -> list[str]:
    """One problem per file of ``folder/manifest.json`` that is missing, of another size, or
    whose sha256 differs; empty when the folder is intact."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says "
                            f"{meta['bytes']}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def _write_folder(root: Path, files: Mapping[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        table[name] = {"sha256": sha256_file(root / name), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps({"files": table}), encoding="utf-8")
    return root


_FILES = {"model.safetensors": bytes(range(256)) * 8, "config.json": b'{"hidden_size": 64}',
          "tokenizer.json": b'{"vocab": ["a", "b"]}'}


def check_verify_manifest(fn: Callable[..., Any], *, exercise: str = "8.2") -> CheckResult:
    """Exercise: ``verify_manifest(folder) -> list[str]`` (problems, empty when intact)."""

    def problems_of(folder: Path) -> list[str]:
        got = fn(folder)
        expect(isinstance(got, list) and all(isinstance(p, str) for p in got),
               f"verify_manifest should return a list of str (problems), got {got!r}")
        return got

    def cases(fn: Callable[..., Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="dd-check-8.2-") as tmp:
            root = Path(tmp)
            clean = _write_folder(root / "clean", _FILES)
            expect(problems_of(clean) == [],
                   "an intact folder should give no problems (an empty list)")
            # one byte flipped, same size: only the hash can see it
            flipped = _write_folder(root / "flipped", _FILES)
            data = bytearray((flipped / "model.safetensors").read_bytes())
            data[100] ^= 0x01
            (flipped / "model.safetensors").write_bytes(bytes(data))
            got = problems_of(flipped)
            expect(len(got) == 1 and "model.safetensors" in got[0],
                   "one flipped byte in model.safetensors (same size) should give one problem "
                   f"naming that file, got {got}: compare the sha256 (utils.io.sha256_file), "
                   "not only the size")
            # a tampered non-weights file counts too
            tok = _write_folder(root / "tokenizer", _FILES)
            (tok / "tokenizer.json").write_bytes(b'{"vocab": ["a", "c"]}')
            got = problems_of(tok)
            expect(len(got) == 1 and "tokenizer.json" in got[0],
                   "a changed tokenizer.json should be reported (every file in the manifest, "
                   f"not only the weights), got {got}")
            # a missing file is a problem, not a crash
            gone = _write_folder(root / "missing", _FILES)
            (gone / "config.json").unlink()
            got = problems_of(gone)
            expect(len(got) == 1 and "config.json" in got[0],
                   f"a missing config.json should be one problem naming it, got {got}: check "
                   "path.is_file() before hashing")
            # a truncated file
            cut = _write_folder(root / "truncated", _FILES)
            (cut / "model.safetensors").write_bytes(_FILES["model.safetensors"][:-10])
            got = problems_of(cut)
            expect(len(got) == 1 and "model.safetensors" in got[0],
                   f"a truncated model.safetensors should be one problem naming it, got {got}")
            # two bad files: both are reported
            two = _write_folder(root / "two", _FILES)
            (two / "config.json").write_bytes(b'{"hidden_size": 65}')
            (two / "tokenizer.json").unlink()
            got = problems_of(two)
            expect(len(got) == 2, f"two bad files should give two problems, got {got}: do not "
                                  "stop at the first one")
            # files not in the manifest are not the manifest's business
            extra = _write_folder(root / "extra", _FILES)
            (extra / "notes.txt").write_text("hello", encoding="utf-8")
            expect(problems_of(extra) == [],
                   "a file the manifest does not list is not a problem: check the files the "
                   "manifest lists")

    return run_check(exercise, "verify_manifest", fn, cases,
                     success="all checks passed: a flipped byte, a missing, truncated or "
                             "changed file are all caught.")


# --------------------------------------------------------------------------------------
# Exercise 8.3: guarded_reply(prompt, generate, input_blocked, output_blocked)
# --------------------------------------------------------------------------------------


def check_guarded_reply(fn: Callable[..., Any], *, exercise: str = "8.3") -> CheckResult:
    """Exercise: ``guarded_reply(prompt, generate, input_blocked, output_blocked) ->
    (reply, stage)`` with stage ``"input"``, ``"model"`` or ``"output"``."""

    def cases(fn: Callable[..., Any]) -> None:
        calls: list[str] = []

        def generate(prompt: str) -> str:
            calls.append(prompt)
            return "STEPS: do the bad thing" if "bad" in prompt else f"answer to {prompt}"

        def input_blocked(prompt: str) -> bool:
            return "forbidden" in prompt

        def output_blocked(prompt: str, reply: str) -> bool:
            return reply.startswith("STEPS")

        def run(prompt: str) -> tuple[str, str]:
            out = fn(prompt, generate, input_blocked, output_blocked)
            expect(isinstance(out, tuple) and len(out) == 2,
                   f"guarded_reply should return (reply, stage), got {out!r}")
            return out

        calls.clear()
        reply, stage = run("what is 2 + 2?")
        expect(reply == "answer to what is 2 + 2?" and stage == "model",
               f"a prompt both filters let through should get the model's reply unchanged with "
               f"stage 'model', got ({reply!r}, {stage!r})")
        expect(calls == ["what is 2 + 2?"], f"the model should be called once with the prompt, "
                                            f"was called with {calls}")
        calls.clear()
        reply, stage = run("a forbidden request")
        expect(stage == "input", f"a prompt the input filter blocks should have stage 'input', "
                                 f"got {stage!r}")
        expect(reply == REFUSAL_REPLY, f"a blocked prompt should get the refusal "
                                       f"{REFUSAL_REPLY!r}, got {reply!r}")
        expect(not calls, "the model was called on a prompt the input filter blocked: check the "
                          "input first and return before generating (that is what saves time "
                          "and keeps the model away from the request)")
        calls.clear()
        reply, stage = run("something bad")
        expect(calls == ["something bad"], "a prompt the input filter lets through must reach "
                                           "the model")
        expect(reply == REFUSAL_REPLY and stage == "output",
               f"a reply the output filter blocks should become the refusal with stage "
               f"'output', got ({reply!r}, {stage!r}): call output_blocked(prompt, reply)")
        # the output filter reads (prompt, reply) in that order
        seen: list[tuple[str, str]] = []

        def spy(prompt: str, reply: str) -> bool:
            seen.append((prompt, reply))
            return False

        fn("hello", generate, input_blocked, spy)
        expect(seen == [("hello", "answer to hello")],
               f"output_blocked should be called once as output_blocked(prompt, reply), got "
               f"{seen}")

    return run_check(exercise, "guarded_reply", fn, cases)


# --------------------------------------------------------------------------------------
# Exercise 8.4 (open experiment): choose_configuration() -> Choice, graded by outcome
# --------------------------------------------------------------------------------------

_HINTS = {
    "device": ("the device budget: look at which runtime keeps the decoding process small and "
               "which quantization shrinks the file below the budget (lesson 06's table)"),
    "safety": ("the safety bar: a student keeps only the refusals its transfer set showed it "
               "(lesson 07); which students saw the world's refusal data?"),
    "utility": ("the utility bar: the fewer bits, the more answers flip (lesson 05); how low "
                "can you go before exact match drops below the bar?"),
}


def check_configuration(fn: Callable[[], Any], evaluate: Callable[[Choice], Mapping[str, Any]],
                        *, exercise: str = "8.4") -> CheckResult:
    """Exercise (open): ``choose_configuration() -> Choice``. ``evaluate(choice)`` runs the
    capstone pipeline and returns its card; the check passes when the card meets every bar.
    A miss names the bar group and a hint that points at the lesson, not at the answer."""

    def cases(fn: Callable[[], Any]) -> None:
        choice = fn()
        expect(isinstance(choice, Choice),
               f"choose_configuration should return a Choice(student=..., quantization=..., "
               f"runtime=...), got {type(choice).__name__}")
        try:
            choice.validate()
        except ValueError as exc:
            raise CheckFailed(f"that choice is not possible: {exc}") from None
        card = evaluate(choice)
        expect(isinstance(card, Mapping) and "verdicts" in card,
               "evaluate(choice) should return the card (a dict with 'verdicts')")
        missed = [name for name in BAR_SPECS if not card["verdicts"][name]["met"]]
        if missed:
            groups = list(dict.fromkeys(BAR_SPECS[n][2] for n in missed))
            names = ", ".join(BAR_SPECS[n][3] for n in missed)
            raise CheckFailed(f"{choice.label} misses {len(missed)} bar(s): {names}. Think "
                              "about " + "; and ".join(_HINTS[g] for g in groups) + ".")

    return run_check(exercise, "choose_configuration", fn, cases,
                     success="your configuration meets the device budget, the safety bar and "
                             "the utility bar, measured.")
