"""Checks for lesson 04's exercises (distillation through an API, extraction, watermarks).

- :func:`check_harvest`: ``fn(client, prompts, *, budget, top_logprobs, max_tokens) ->
  list[HarvestRecord]``, the budgeted querying loop. Run against a fake, in-process
  ``openai`` client (no server, no waiting) that bills answered queries, throws
  ``openai.RateLimitError`` 429s (transient ``rate_limit_exceeded`` and final
  ``insufficient_quota``) and counts every call;
- :func:`check_hidden_size_estimate`: ``fn(logit_matrix) -> (estimate, singular_values)``,
  Carlini et al. (2024)'s SVD estimate of the hidden size, on random low-rank matrices of
  known rank (scaled, with a float32-like noise floor, as logprobs);
- :func:`check_watermark_z`: ``fn(token_ids, is_green_fn, greenlist_ratio) -> z``, the
  Kirchenbauer et al. (2023) z-score with each (previous, token) pair counted once.

Each says which classic mistake a wrong answer points to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from utils.checks import CheckFailed, CheckResult, CheckSignal, expect, run_check

__all__ = ["FakeTeacherClient", "check_defence_choice", "check_harvest",
           "check_hidden_size_estimate", "check_watermark_z", "defence_experiment"]


# --------------------------------------------------------------------------------------
# Exercise 4.1: the budgeted harvesting loop
# --------------------------------------------------------------------------------------


class _KeptCalling(CheckSignal):
    """Raised by the fake client when the harvest keeps calling after the quota is spent.

    A :class:`~utils.checks.CheckSignal` (a ``BaseException``): a harvest loop that writes
    ``except Exception: continue`` must not swallow it and call forever.
    """

    status = "failed"

    def __init__(self, calls: int = 0) -> None:
        super().__init__(f"after the quota was spent (429 with code 'insufficient_quota') your "
                         f"loop kept calling ({calls} calls). A quota error is final: stop and "
                         "return the records you have.")


class FakeTeacherClient:
    """An in-process stand-in for ``openai.OpenAI`` talking to a teacher API.

    ``quota``: answered queries before every call gets a quota 429 (``insufficient_quota``).
    ``rate_limited_calls``: 1-based call numbers answered with a transient 429
    (``rate_limit_exceeded``, ``retry-after-ms: 1``), not billed.
    """

    def __init__(self, *, quota: int | None = None,
                 rate_limited_calls: frozenset[int] = frozenset(), model: str = "dd-teacher",
                 max_calls_after_quota: int = 5) -> None:
        self.quota = quota
        self.rate_limited_calls = set(rate_limited_calls)
        self.model = model
        self.max_calls_after_quota = max_calls_after_quota
        self.calls = 0
        self.billed = 0
        self.calls_after_quota = 0
        self.requests: list[dict] = []
        parent = self

        class _Completions:
            def create(self, **kwargs: Any) -> Any:
                return parent._create(**kwargs)

        class _Chat:
            completions = _Completions()

        class _Models:
            def list(self) -> Any:
                from openai.pagination import SyncPage
                from openai.types import Model

                return SyncPage[Model](object="list", data=[Model(
                    id=parent.model, created=0, object="model", owned_by="dd")])

        self.chat = _Chat()
        self.models = _Models()

    def _error(self, code: str, message: str, headers: dict[str, str]) -> Exception:
        import httpx2
        import openai

        request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
        body = {"message": message, "type": code if code == "insufficient_quota" else "requests",
                "param": None, "code": code}
        response = httpx2.Response(429, request=request, headers=headers, json={"error": body})
        return openai.RateLimitError(f"Error code: 429 - {message}", response=response, body=body)

    def _create(self, **kwargs: Any) -> Any:
        from openai.types.chat import ChatCompletion

        self.calls += 1
        self.requests.append(kwargs)
        if self.quota is not None and self.billed >= self.quota:
            self.calls_after_quota += 1
            if self.calls_after_quota > self.max_calls_after_quota:
                raise _KeptCalling(self.calls)
            raise self._error("insufficient_quota", "You exceeded your current quota.",
                              {"x-should-retry": "false"})
        if self.calls in self.rate_limited_calls:
            raise self._error("rate_limit_exceeded", "Rate limit reached. Try again in 1ms.",
                              {"retry-after-ms": "1", "retry-after": "0"})
        if kwargs.get("model") != self.model:
            raise ValueError(f"unknown model {kwargs.get('model')!r}: ask client.models.list() "
                             "for the model's name")
        self.billed += 1
        prompt = kwargs["messages"][-1]["content"]
        text = f"answer to {prompt}"
        logprobs = None
        if kwargs.get("logprobs"):
            k = int(kwargs.get("top_logprobs") or 0)
            entry = {"token": "answer", "logprob": -0.1, "bytes": None,
                     "top_logprobs": [{"token": f"t{j}", "logprob": -0.1 - j, "bytes": None}
                                      for j in range(k)]}
            logprobs = {"content": [entry], "refusal": None}
        return ChatCompletion.model_validate({
            "id": f"chatcmpl-{self.calls}", "object": "chat.completion", "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})


def _text(record: Any) -> str:
    if isinstance(record, dict):
        return record.get("text")
    return getattr(record, "text", None)


def check_harvest(fn: Callable[..., Any], exercise: str = "4.1") -> CheckResult:
    """Check ``fn(client, prompts, *, budget, top_logprobs, max_tokens) -> records``."""
    import openai

    def run(client: FakeTeacherClient, prompts: list[str], budget: int, label: str,
            top_logprobs: int | None = 3, max_tokens: int = 8) -> list:
        try:
            out = fn(client, prompts, budget=budget, top_logprobs=top_logprobs,
                     max_tokens=max_tokens)
        except _KeptCalling:
            raise CheckFailed(
                f"{label}: after the quota was spent (429 with code 'insufficient_quota') "
                f"your loop kept calling ({client.calls} calls). A quota error is final: "
                "stop and return the records you have.") from None
        except openai.RateLimitError as err:
            if err.code == "insufficient_quota":
                raise CheckFailed(
                    f"{label}: your harvest raised the quota 429 (insufficient_quota). Catch "
                    "openai.RateLimitError and, when err.code == 'insufficient_quota', return "
                    "the records collected so far.") from None
            raise CheckFailed(
                f"{label}: a 429 rate-limit error escaped your harvest. Catch "
                "openai.RateLimitError, wait retry_after_seconds(err) and retry the same "
                "prompt.") from None
        expect(isinstance(out, list), f"{label}: return a list of records, got "
                                      f"{type(out).__name__}")
        return out

    def cases(fn: Callable[..., Any]) -> None:
        prompts = [f"question {i}" for i in range(6)]

        # 1. the budget stops the loop, exactly at the budget
        c = FakeTeacherClient()
        recs = run(c, prompts, 4, "budget=4, 6 prompts")
        expect(c.billed <= 4, f"budget=4: you sent {c.billed} answered queries. Never exceed "
                              "the budget: stop when len(records) == budget (check before "
                              "sending, `<` not `<=`).")
        expect(c.billed == 4 and len(recs) == 4,
               f"budget=4 with 6 prompts: expected 4 queries and 4 records, got {c.billed} "
               f"queries and {len(recs)} records. Use the whole budget.")
        expect([_text(r) for r in recs] == [f"answer to {p}" for p in prompts[:4]],
               "records should hold the teacher's text for the prompts in order (build them "
               "with record_from_response(prompt, response))")
        req = c.requests[0]
        expect(req.get("logprobs") is True and req.get("top_logprobs") == 3,
               "with top_logprobs=3 send logprobs=True and top_logprobs=3 in the request")
        expect(req.get("max_tokens") == 8, "pass max_tokens through to the request")
        rec = recs[0]
        tops = rec.get("top_logprobs") if isinstance(rec, dict) else getattr(rec, "top_logprobs",
                                                                              None)
        expect(bool(tops) and len(tops[0]) == 3,
               "the records should keep the top-3 logprobs of each token "
               "(record_from_response does it)")

        # 2. fewer prompts than budget; budget 0
        c = FakeTeacherClient()
        recs = run(c, prompts[:3], 10, "budget=10, 3 prompts")
        expect(len(recs) == 3 and c.billed == 3,
               f"budget=10 with 3 prompts: expected 3 records, got {len(recs)}")
        c = FakeTeacherClient()
        recs = run(c, prompts, 0, "budget=0")
        expect(c.calls == 0 and len(recs) == 0,
               f"budget=0: no query may be sent, you sent {c.calls}")

        # 3. transient rate limits: wait, retry, and they are not billed
        c = FakeTeacherClient(rate_limited_calls=frozenset({2, 3, 6}))
        recs = run(c, prompts, 4, "rate limits on calls 2, 3 and 6")
        expect(len(recs) == 4 and c.billed == 4,
               f"with rate limits on some calls and budget=4 you got {len(recs)} records: a "
               "rate-limited request is not answered or billed, retry the same prompt and "
               "count only answered queries")
        expect([_text(r) for r in recs] == [f"answer to {p}" for p in prompts[:4]],
               "after a rate limit, retry the SAME prompt (the records should follow the "
               "prompts in order, none skipped)")

        # 4. quota spent before the budget: stop cleanly
        c = FakeTeacherClient(quota=2)
        recs = run(c, prompts, 5, "quota=2, budget=5")
        expect(len(recs) == 2, f"quota 2 < budget 5: expected the 2 records collected before "
                               f"the quota error, got {len(recs)}")
        expect(c.calls_after_quota <= 1,
               f"after the quota error your loop sent {c.calls_after_quota} more requests: "
               "insufficient_quota is final, stop")

        # 5. text only
        c = FakeTeacherClient()
        recs = run(c, prompts[:2], 2, "top_logprobs=None", top_logprobs=None)
        expect(not c.requests[0].get("logprobs"),
               "top_logprobs=None means text only: do not ask for logprobs")

    return run_check(exercise, "harvest", fn, cases,
                     success="stops at the budget, retries rate limits, stops on quota.")


# --------------------------------------------------------------------------------------
# Exercise 4.2: the hidden size from the singular values
# --------------------------------------------------------------------------------------


def _low_rank(n: int, vocab: int, h: int, seed: int, *, scale: float = 1.0,
              noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, h))
    hidden /= np.sqrt((hidden ** 2).mean(1, keepdims=True))  # RMSNorm-like rows
    hidden *= np.geomspace(1.0, 0.02, h)  # a decaying spectrum, as in trained models
    w = rng.normal(scale=0.5, size=(vocab, h))
    logits = scale * hidden @ w.T
    if noise:
        logits = logits + rng.normal(scale=noise * scale, size=logits.shape)
    return logits


def check_hidden_size_estimate(fn: Callable[..., Any], exercise: str = "4.2") -> CheckResult:
    """Check ``fn(logit_matrix) -> (estimate, singular_values)`` (Carlini et al. 2024)."""

    def one(m: np.ndarray, h: int, label: str, hint_up: str, hint_down: str,
            hint: str = "Look for the largest drop between consecutive singular values (on a "
                        "log scale), not for values above a fixed number.") -> None:
        out = fn(m.copy())
        expect(isinstance(out, tuple | list) and len(out) == 2,
               f"return a tuple (estimate, singular_values), got {type(out).__name__}")
        est, s = out
        try:
            est_i = int(est)
            s = np.asarray(s.detach().cpu().numpy() if hasattr(s, "detach") else s,
                           dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - learner-facing
            raise CheckFailed(f"{label}: could not read (estimate, singular_values): {exc}"
                              ) from None
        expect(est_i == float(est), f"{label}: the estimate should be a whole number, got {est}")
        expect(len(s) == min(m.shape),
               f"{label}: expected {min(m.shape)} singular values (min(n, V)), got {len(s)}")
        expect(np.all(np.diff(s) <= 1e-9 * max(s[0], 1e-300)),
               f"{label}: singular values should be sorted from largest to smallest")
        if est_i == h + 1:
            raise CheckFailed(f"{label}: expected {h}, got {h + 1}. {hint_up}")
        if est_i == h - 1:
            raise CheckFailed(f"{label}: expected {h}, got {h - 1}. {hint_down}")
        expect(est_i == h, f"{label}: expected hidden size {h}, got {est_i}. {hint}")

    def cases(fn: Callable[..., Any]) -> None:
        off = ("Off by one: if the biggest drop is between s[i] and s[i+1] (0-based), there "
               "are i+1 large singular values.")
        one(_low_rank(80, 120, 16, 0), 16, "logits of a model with h=16 (n=80, V=120)",
            off, off)
        one(_low_rank(30, 50, 7, 1), 7, "h=7 (n=30, V=50)", off, off)
        scale_hint = ("A fixed threshold depends on the scale of the logits: use the largest "
                      "relative drop (ratio s[i]/s[i+1]).")
        one(_low_rank(80, 120, 16, 2, scale=1e-6), 16, "logits scaled by 1e-6", scale_hint,
            off, scale_hint)
        one(_low_rank(80, 120, 16, 3, scale=1e6), 16, "logits scaled by 1e6", scale_hint, off,
            scale_hint)
        one(_low_rank(80, 120, 16, 4, noise=1e-5), 16,
            "logits with a float32-like noise floor (1e-5)",
            "Real logits are never exactly low rank: the 'zero' singular values sit at a "
            "noise floor. Find the largest drop instead of counting values above a tiny "
            "tolerance.", off)
        logits = _low_rank(80, 120, 16, 5)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        logprobs = logits - logits.max(1, keepdims=True) - lse
        one(logprobs, 16, "log-probabilities (logits minus each row's logsumexp)",
            "Each row has its own constant subtracted, which adds the all-ones direction: "
            "centre each row (subtract its mean over the vocabulary) before the SVD.", off)

    return run_check(exercise, "hidden_size_from_logits", fn, cases,
                     success="reads the hidden size off the singular-value drop.")


# --------------------------------------------------------------------------------------
# Exercise 4.3: the watermark z-score
# --------------------------------------------------------------------------------------


def _reference_z(token_ids: list[int], is_green_fn: Callable[[int, int], bool],
                 gamma: float) -> tuple[float, int, int]:
    pairs = list(dict.fromkeys(zip(token_ids[:-1], token_ids[1:], strict=True)))
    g = sum(bool(is_green_fn(a, b)) for a, b in pairs)
    T = len(pairs)
    return (g - gamma * T) / math.sqrt(T * gamma * (1 - gamma)), g, T


def check_watermark_z(fn: Callable[..., Any], exercise: str = "4.3") -> CheckResult:
    """Check ``fn(token_ids, is_green_fn, greenlist_ratio) -> z`` (Kirchenbauer et al. 2023)."""

    def one(tokens: list[int], green: Callable[[int, int], bool], gamma: float,
            label: str) -> None:
        expected, g, T = _reference_z(tokens, green, gamma)
        try:
            got = float(fn(list(tokens), green, gamma))
        except (TypeError, ValueError) as exc:
            raise CheckFailed(f"{label}: return the z-score as one number ({exc})") from None
        expect(math.isfinite(got), f"{label}: your z is {got}")
        if abs(got - expected) <= 1e-6 * max(1.0, abs(expected)):
            return
        # Diagnose the classic mistakes.
        all_pairs = list(zip(tokens[:-1], tokens[1:], strict=True))
        g_rep = sum(bool(green(a, b)) for a, b in all_pairs)
        T_rep = len(all_pairs)
        z_rep = (g_rep - gamma * T_rep) / math.sqrt(T_rep * gamma * (1 - gamma))
        if T_rep != T and abs(got - z_rep) < 1e-6 * max(1.0, abs(z_rep)):
            raise CheckFailed(f"{label}: you counted repeated (previous, token) pairs "
                              f"({T_rep} scored instead of {T} unique). Count each pair once: "
                              "a repeated phrase is not new evidence.")
        near = {
            "(g - gamma T) / sqrt(T): the standard deviation of a Binomial(T, gamma) count "
            "is sqrt(T gamma (1 - gamma))": (g - gamma * T) / math.sqrt(T),
            "(g - gamma T) / (T gamma (1 - gamma)): that is the variance; take its square "
            "root": (g - gamma * T) / (T * gamma * (1 - gamma)),
            "a green fraction (g/T - gamma) without dividing by the standard deviation":
                g / T - gamma,
            "gamma = 0.25 hard-coded: use the greenlist_ratio argument":
                (g - 0.25 * T) / math.sqrt(T * 0.25 * 0.75),
        }
        for why, value in near.items():
            if abs(got - value) < 1e-6 * max(1.0, abs(value)):
                raise CheckFailed(f"{label}: expected z = {expected:.4f}, got {got:.4f}: "
                                  f"you computed {why}.")
        for T_off in (T + 1, T - 1):
            if T_off > 0:
                for g_off in (g, g + 1):
                    v = (g_off - gamma * T_off) / math.sqrt(T_off * gamma * (1 - gamma))
                    if abs(got - v) < 1e-6 * max(1.0, abs(v)):
                        raise CheckFailed(
                            f"{label}: expected z = {expected:.4f}, got {got:.4f}: off by one "
                            "in the tokens scored. The first token has no previous token, so "
                            "it is not scored; every later token is.")
        raise CheckFailed(f"{label}: expected z = {expected:.4f} ({g} green of {T} unique "
                          f"pairs, gamma = {gamma}), got {got:.4f}. "
                          "z = (g - gamma T) / sqrt(T gamma (1 - gamma)).")

    def cases(fn: Callable[..., Any]) -> None:
        always = lambda prev, tok: True  # noqa: E731
        one([5, 1, 2, 3, 4], always, 0.25, "5 tokens, all green, gamma=0.25 (z = 3/sqrt(0.75))")
        hashed = lambda prev, tok: (prev * 31 + tok * 7) % 4 == 0  # noqa: E731
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 40, size=60).tolist()
        one(tokens, hashed, 0.25, "60 random tokens, a hashed green list")
        repeated = [3, 8, 3, 8, 3, 8, 3, 8, 1, 9, 3, 8, 2, 5, 7, 3, 8]
        green_38 = lambda prev, tok: (prev, tok) in {(3, 8), (8, 3), (5, 7)}  # noqa: E731
        one(repeated, green_38, 0.25, "a text repeating the phrase '3 8'")
        halves = lambda prev, tok: (prev + tok) % 2 == 0  # noqa: E731
        one(rng.integers(0, 50, size=40).tolist(), halves, 0.5, "gamma=0.5")

    return run_check(exercise, "watermark_z", fn, cases,
                     success="z-score with each (previous, token) pair counted once.")


# --------------------------------------------------------------------------------------
# Exercise 4.4 (open experiment): the cheapest defence that stops the SVD attack
# --------------------------------------------------------------------------------------
# The attacker of section 4, with a budget: it needs full logprob vectors of many prompts. An
# untruncated API gives one per query; against top-k it recovers each vector with logit_bias
# (section 5.1: 1 + ceil((V - k) / (k - 1)) queries, every value a difference of two readings);
# whatever budget is left it spends repeating the queries and averaging away noise (section
# 5.1's 1 / sqrt(n)), up to DEFENCE_MAX_REPEATS. The check simulates the defended API with the
# server's own arithmetic (Gaussian noise, clip at 0, rounding: utils.serve) on the clean
# logprob matrix, instead of sending about DEFENCE_ATTACK_BUDGET requests.
DEFENCE_ATTACK_BUDGET = 200_000  # attacker queries (a few dollars at API prices)
DEFENCE_MAX_REPEATS = 64  # readings averaged per value at most (the lesson's NOISE_REPEATS)
# The bar on what honest users pay: mean |logprob error| on each query's true top-10 tokens,
# one reading (section 5's "mean |logprob error|", a missing token read as the smallest
# listed). Measured on the course machine, 2026-12-05, on the teacher's 176 x 768 matrix
# (tests/test_checks_extraction.py re-measures both ends): no defence, or truncation alone,
# leaves the attack working at no cost; rounding to 2 decimals (0.0022) or noise up to 0.025
# nats alone (0.019) do not stop it; rounding to 1 decimal stops it for 0.022, the lesson's
# noise of 0.1 nats for 0.075; truncation to the top 10 plus noise of 0.015 nats stops it for
# 0.011 (noise seeds 0-4: 0.011-0.0115), because truncation leaves the attacker 13 repeats
# instead of 64. The bar sits between that and the single defences.
DEFENCE_COST_BAR = 0.02


def _defended(values: np.ndarray, rng: np.random.Generator, round_decimals: int | None,
              noise_scale: float) -> np.ndarray:
    """What the defended API returns for these true logprobs (utils.serve's arithmetic)."""
    out = values.astype(np.float64)
    if noise_scale > 0:
        out = np.minimum(out + rng.normal(0.0, noise_scale, size=out.shape), 0.0)
    if round_decimals is not None:
        out = np.round(out, round_decimals)
    return out


def defence_experiment(clean_logprobs: Any, hidden_size: int, *, top_k: int | None = None,
                       round_decimals: int | None = None, noise_scale: float = 0.0,
                       budget: int = DEFENCE_ATTACK_BUDGET, seed: int = 0) -> dict[str, Any]:
    """Exercise 4.4's experiment: the SVD attack against a defended API, and the honest cost.

    ``clean_logprobs`` is the undefended (n, V) logprob matrix of section 4 (one full vector
    per prompt), ``hidden_size`` the true h. Returns the attacker's queries per vector, the
    vectors and repeats it could afford, its estimate of h, whether the attack was stopped
    (estimate not h or h - 1), its mean |error| on the recovered logprobs, and the honest
    cost. About a second. Call it to try defences before you commit to a choice.
    """
    from utils.extraction import hidden_size_from_logits

    q = np.asarray(clean_logprobs, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] < 2:
        raise ValueError(f"clean_logprobs should be an (n, V) matrix, got shape {q.shape}")
    n, vocab = q.shape
    if top_k is not None and not 2 <= top_k:
        raise ValueError(f"top_k must be None (no truncation) or >= 2, got {top_k}")
    truncated = top_k is not None and top_k < vocab
    per_vector = 1 + math.ceil((vocab - top_k) / (top_k - 1)) if truncated else 1
    vectors = min(n, budget // per_vector)
    repeats = max(1, min(DEFENCE_MAX_REPEATS, budget // max(1, vectors * per_vector)))
    if noise_scale == 0:
        repeats = 1  # without noise every reading is the same number: repeating buys nothing
    rng = np.random.default_rng(seed)
    rows = q[:vectors]
    total = np.zeros_like(rows)
    groups = (np.arange(vocab) // (top_k - 1)) if truncated else None
    ref = rows.argmax(axis=1)  # the reference token of section 5.1: each row's top token
    for _ in range(repeats):
        reading = _defended(rows, rng, round_decimals, noise_scale)
        if truncated:  # value = reading_i - reading_ref (same biased query) + true ref
            ref_reading = _defended(np.repeat(rows[np.arange(vectors), ref][:, None],
                                              groups.max() + 1, axis=1),
                                    rng, round_decimals, noise_scale)  # (vectors, groups)
            reading = (reading - ref_reading[:, groups]
                       + rows[np.arange(vectors), ref][:, None])
        total += reading
    recovered = total / repeats
    if vectors >= 3:
        estimate, _ = hidden_size_from_logits(recovered)
    else:
        estimate = 0  # too few vectors to stack: no cliff to read
    stopped = estimate not in (hidden_size, hidden_size - 1) or vectors <= hidden_size + 1
    # honest users: one reading, the true top-10 of each query (the lesson's top10_cost)
    honest_rng = np.random.default_rng(seed + 1)
    listed = min(top_k, vocab) if truncated else vocab
    err = []
    for row in q:
        order = np.argsort(row)[::-1]
        seen = _defended(row[order[:listed]], honest_rng, round_decimals, noise_scale)
        top10 = np.concatenate([seen[:10], np.full(max(0, 10 - listed), seen.min())])
        err.append(float(np.mean(np.abs(top10 - row[order[:10]]))))
    return {"queries_per_vector": per_vector, "vectors": int(vectors), "repeats": int(repeats),
            "estimate": int(estimate), "attack_stopped": bool(stopped),
            "recovery_error": float(np.mean(np.abs(recovered - rows))),
            "honest_cost": float(np.mean(err))}


def _defence_settings() -> tuple:
    from utils.checks.experiment import Setting

    return (
        Setting("top_k", kind="int", low=2, optional=True,
                meaning="most logprobs per token the API returns (None: all)"),
        Setting("round_decimals", kind="int", low=0, high=10, optional=True,
                meaning="decimals the logprobs are rounded to (None: no rounding)"),
        Setting("noise_scale", low=0.0, high=10.0,
                meaning="Gaussian noise on every logprob, in nats (0: none)"),
    )


def check_defence_choice(fn: Callable[[], Any], clean_logprobs: Any, hidden_size: int,
                         exercise: str = "4.4") -> CheckResult:
    """Exercise 4.4: ``fn()`` returns ``{"top_k": ..., "round_decimals": ..., "noise_scale":
    ...}``; the defended API must stop the SVD attack (:func:`defence_experiment`) while
    costing honest users at most :data:`DEFENCE_COST_BAR` nats on their top-10."""
    from utils.checks.experiment import Outcome, run_experiment

    def measure(choice: dict[str, Any]) -> Outcome:
        r = defence_experiment(clean_logprobs, hidden_size, **choice)
        said = ", ".join(f"{k} = {v}" for k, v in choice.items())
        attack = (f"the attacker ({DEFENCE_ATTACK_BUDGET:,} queries: {r['vectors']} vectors at "
                  f"{r['queries_per_vector']} queries each, {r['repeats']} reading(s) averaged) "
                  f"estimates h = {r['estimate']} (true {hidden_size}): "
                  + ("stopped" if r["attack_stopped"] else "NOT stopped")
                  + f", its logprobs off by {r['recovery_error']:.2g} nats on average")
        cost = (f"honest users pay {r['honest_cost']:.3g} nats on their top-10 (bar "
                f"{DEFENCE_COST_BAR:g})")
        what = f"{said}: {attack}; {cost}"
        if r["attack_stopped"] and r["honest_cost"] <= DEFENCE_COST_BAR:
            return Outcome(True, what + ". Both met.")
        if not r["attack_stopped"]:
            return Outcome(False, what + ". The attack still works.",
                           "Look at what each defence does to the singular values near the "
                           "cliff (section 5's plot) and what the attacker can buy back with "
                           "repeated queries; try defence_experiment(...) with a few settings.")
        return Outcome(False, what + ". Too expensive for honest users.",
                       "Something weaker can still hide the cliff: compare how each defence's "
                       "cost and the attack's error scale as you loosen it.")

    return run_experiment(exercise, "choose_defence", fn, _defence_settings(), measure)
