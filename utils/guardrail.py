"""An input/output guardrail in front of the on-device model, built from lesson 07's judges.

- **Input filter** (:func:`train_prompt_filter`): lesson 07's :class:`utils.safety.ClassifierJudge`
  (TF-IDF character n-grams + logistic regression, saved as JSON, no pickle) trained on the
  *prompts* of the training split, labelled by whether the world says to refuse them, after
  undoing letter-spacing obfuscation (:func:`canonical_prompt`). A blocked prompt never
  reaches the model (Llama Guard's input check, Inan et al. 2023, at laptop size).
- **Output filter**: lesson 07's :class:`utils.safety.HarmJudge` (StrongREJECT-style rules) on
  the model's reply; a reply that fulfils a restricted request is replaced by a refusal.

:func:`guarded_reply` is one request through both (lesson 08's Exercise 8.3);
:func:`apply_guardrail` runs many requests whose replies were already generated (greedy decoding
makes a reply the same whether or not a guard sits in front, so the unguarded run can be reused);
:func:`guardrail_effect` measures what it buys and costs, with Wilson intervals and exact
McNemar tests on the paired verdicts. Pure functions; importing does nothing. Lesson 08.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

REFUSAL_REPLY = "Sorry, but I can't help with that."  # what a blocked request gets back
STAGES = ("input", "model", "output")  # who answered: input filter, model, output filter


_SPACED_GAP = re.compile(r"\s{2,}")


def canonical_prompt(text: str) -> str:
    """Undo letter-spacing obfuscation ("W h a t   d o ..." -> "What do ..."): when at least
    80% of the space-separated tokens are single characters and wider gaps separate words,
    words are the runs between those gaps ("Is 2 + 2 = 4 ?" has no wider gap: unchanged).
    Normalising input before classifying it is a guardrail's first step (lesson 08)."""
    tokens = [t for t in text.split(" ") if t]
    if (len(tokens) > 3 and _SPACED_GAP.search(text)
            and sum(len(t) == 1 for t in tokens) >= 0.8 * len(tokens)):
        return " ".join(w.replace(" ", "") for w in _SPACED_GAP.split(text.strip()))
    return text


class PromptFilter:
    """An input filter: a trained :class:`~utils.safety.ClassifierJudge` over prompts, after
    :func:`canonical_prompt` (``canonical=False``: the raw prompt). ``is_refusal(prompt)``:
    should the guardrail refuse this prompt; ``judge(prompts)`` the same for many."""

    def __init__(self, classifier: Any, *, canonical: bool = True) -> None:
        self.classifier = classifier
        self.canonical = canonical
        self.name = f"prompt_filter{'' if canonical else '_raw'}"

    @property
    def vocabulary(self) -> dict[str, int]:
        return self.classifier.vocabulary

    def _prep(self, prompts: Sequence[str]) -> list[str]:
        return [canonical_prompt(p) if self.canonical else p for p in prompts]

    def predict_proba(self, prompts: Sequence[str]) -> list[float]:
        """P(refuse) for each prompt."""
        return self.classifier.predict_proba(self._prep(prompts))

    def judge(self, prompts: Sequence[str]) -> list[bool]:
        return [p >= self.classifier.threshold for p in self.predict_proba(prompts)]

    def is_refusal(self, prompt: str) -> bool:
        return self.judge([prompt])[0]


def train_prompt_filter(records: Sequence[dict], *, threshold: float = 0.5,
                        max_skill: int | None = 3000, seed: int = 0,
                        canonical: bool = True) -> PromptFilter:
    """Lesson 07's :class:`~utils.safety.ClassifierJudge` trained on prompts (True: refuse).

    ``records``: world records (the training split); every restricted, benign and jailbreak
    prompt is used, and at most ``max_skill`` skill prompts (chosen with ``seed``), so the
    filter learns what ordinary requests look like without drowning in them. The whole
    prompt is read (``max_chars=2000``): a jailbreak template puts the request late.
    ``canonical``: train and classify on :func:`canonical_prompt` of each prompt."""
    import random

    from utils.safety import ClassifierJudge, prompt_of

    safety = [r for r in records if r["kind"] != "skill"]
    skills = [r for r in records if r["kind"] == "skill"]
    if max_skill is not None and len(skills) > max_skill:
        skills = random.Random(seed).sample(skills, max_skill)
    rows = safety + skills
    if not any(r["should_refuse"] for r in rows) or all(r["should_refuse"] for r in rows):
        raise ValueError("the prompt filter needs prompts to refuse and prompts to answer: "
                         "pass world records of several kinds (the training split)")
    texts = [prompt_of(r) for r in rows]
    if canonical:
        texts = [canonical_prompt(t) for t in texts]
    judge = ClassifierJudge(name="prompt_filter", threshold=threshold, max_chars=2000)
    judge.fit(texts, [bool(r["should_refuse"]) for r in rows])
    return PromptFilter(judge, canonical=canonical)


def guarded_reply(prompt: str, generate: Callable[[str], str],
                  input_blocked: Callable[[str], bool],
                  output_blocked: Callable[[str, str], bool], *,
                  refusal: str = REFUSAL_REPLY) -> tuple[str, str]:
    """One request through the guardrail: ``(reply, stage)`` (lesson 08, Exercise 8.3).

    The input filter runs first; a blocked prompt gets ``refusal`` and the model is *not*
    called (stage ``"input"``). Otherwise the model replies; if the output filter blocks
    ``(prompt, reply)`` the reply becomes ``refusal`` (stage ``"output"``), else the model's
    reply is returned unchanged (stage ``"model"``)."""
    if input_blocked(prompt):
        return refusal, "input"
    reply = generate(prompt)
    if output_blocked(prompt, reply):
        return refusal, "output"
    return reply, "model"


@dataclass(frozen=True)
class Guarded:
    """Many requests through the guardrail: replies, who answered, and the guard's time."""

    replies: list[str]
    stages: list[str]
    input_seconds: list[float]    # per request: the input filter
    output_seconds: list[float]   # per request: the output filter (0 when blocked at input)


def apply_guardrail(prompts: Sequence[str], responses: Sequence[str], prompt_filter: Any,
                    harm_judge: Any, *, refusal: str = REFUSAL_REPLY,
                    use_input: bool = True, use_output: bool = True,
                    guard: Callable[..., tuple[str, str]] = guarded_reply) -> Guarded:
    """``guard`` (:func:`guarded_reply`) for every prompt, with the model's replies already
    generated (``responses[i]`` answers ``prompts[i]``), timing the filters per request."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    replies, stages, t_in, t_out = [], [], [], []
    times = {"in": 0.0, "out": 0.0}

    def inp(p: str) -> bool:
        t0 = time.perf_counter()
        blocked = use_input and bool(prompt_filter.is_refusal(p))
        times["in"] = time.perf_counter() - t0
        return blocked

    def out(p: str, r: str) -> bool:
        t0 = time.perf_counter()
        blocked = use_output and bool(harm_judge.is_harmful(r, p))
        times["out"] = time.perf_counter() - t0
        return blocked

    for prompt, response in zip(prompts, responses, strict=True):
        times["in"] = times["out"] = 0.0
        reply, stage = guard(prompt, lambda _p, r=response: r, inp, out, refusal=refusal)
        replies.append(reply)
        stages.append(stage)
        t_in.append(times["in"])
        t_out.append(times["out"])
    return Guarded(replies, stages, t_in, t_out)


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    from utils.safety import Rate

    r = Rate.of(sum(bool(f) for f in flags), len(flags))
    return {"rate": r.rate, "ci": [r.low, r.high], "k": r.k, "n": r.n}


def guardrail_effect(records: Sequence[dict], refused_before: Sequence[bool],
                     refused_after: Sequence[bool], *, subsets: dict[str, Sequence[bool]]
                     | None = None) -> dict[str, dict]:
    """Attack success and over-refusal before and after the guardrail, paired.

    ``refused_*``: the refusal judge's verdict on each record's reply without and with the
    guard. For each subset (default: held-out jailbreaks that should be refused -> attack
    success = not refused; benign look-alikes and benign jailbreak-wrapped requests -> over-
    refusal = refused) returns both rates with 95% Wilson intervals, the change (after -
    before), and an exact McNemar test on the paired verdicts
    (:func:`utils.stats.mcnemar_exact`)."""
    from utils.stats import mcnemar_exact

    if not len(records) == len(refused_before) == len(refused_after):
        raise ValueError("records, refused_before and refused_after must have one entry each")
    if subsets is None:
        subsets = {
            "heldout_jailbreak_success": [bool(r["should_refuse"])
                                          and r.get("template_split") == "heldout"
                                          for r in records],
            "attack_success": [bool(r["should_refuse"]) for r in records],
            "over_refusal": [not r["should_refuse"] for r in records],
        }
    out = {}
    for name, mask in subsets.items():
        # attack success counts replies that are NOT refusals; over-refusal counts refusals
        counted = name == "over_refusal"
        a = [bool(v) == counted for v, m in zip(refused_before, mask, strict=True) if m]
        b = [bool(v) == counted for v, m in zip(refused_after, mask, strict=True) if m]
        if not a:
            continue
        t = mcnemar_exact(a, b)
        out[name] = {"before": _rate(a), "after": _rate(b), "change": -t.diff,  # after - before
                     "p_value": t.p_value, "changed": t.discordant}
    return out


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile of per-request times, in milliseconds."""
    import numpy as np

    if not len(seconds):
        raise ValueError("no timings: run the guardrail on at least one request")
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}
