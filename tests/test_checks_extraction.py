"""Mutation tests for lesson 04's checks: the references pass, the classic mistakes fail."""

from __future__ import annotations

import math
import time

import numpy as np
import openai
import pytest

from utils.checks.extraction import (
    DEFENCE_COST_BAR,
    DEFENCE_MAX_REPEATS,
    FakeTeacherClient,
    check_defence_choice,
    check_harvest,
    check_hidden_size_estimate,
    check_watermark_z,
    defence_experiment,
)
from utils.extraction import (
    as_messages,
    harvest,
    hidden_size_from_logits,
    is_quota_error,
    record_from_response,
    retry_after_seconds,
)
from utils.watermark import green_z_score

# --------------------------------------------------------------------------------------
# Exercise 4.1: harvest


def _send(client, prompt, top_logprobs, max_tokens):
    extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=as_messages(prompt),
        max_tokens=max_tokens, temperature=0, **extra)


def harvest_off_by_one(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts:
        if len(records) > budget:  # one too many
            break
        records.append(record_from_response(p, _send(client, p, top_logprobs, max_tokens)))
    return records


def harvest_ignores_429(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts[:budget]:
        records.append(record_from_response(p, _send(client, p, top_logprobs, max_tokens)))
    return records


def harvest_skips_rate_limited(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts:
        if len(records) >= budget:
            break
        try:
            records.append(record_from_response(p, _send(client, p, top_logprobs, max_tokens)))
        except openai.RateLimitError as err:
            if is_quota_error(err):
                break
            continue  # drops the prompt instead of retrying it
    return records


def harvest_counts_attempts(client, prompts, *, budget, top_logprobs, max_tokens):
    records, attempts = [], 0
    for p in prompts:
        while attempts < budget:
            attempts += 1
            try:
                records.append(record_from_response(p, _send(client, p, top_logprobs,
                                                             max_tokens)))
                break
            except openai.RateLimitError as err:
                if is_quota_error(err):
                    return records
                time.sleep(retry_after_seconds(err))
    return records


def harvest_retries_quota_forever(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts:
        if len(records) >= budget:
            break
        while True:
            try:
                records.append(record_from_response(p, _send(client, p, top_logprobs,
                                                             max_tokens)))
                break
            except openai.RateLimitError as err:
                time.sleep(retry_after_seconds(err, default=0.0))
    return records


def harvest_raises_on_quota(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts:
        if len(records) >= budget:
            break
        while True:
            try:
                records.append(record_from_response(p, _send(client, p, top_logprobs,
                                                             max_tokens)))
                break
            except openai.RateLimitError as err:
                if is_quota_error(err):
                    raise
                time.sleep(retry_after_seconds(err))
    return records


def harvest_swallows_every_error(client, prompts, *, budget, top_logprobs, max_tokens):
    records = []
    for p in prompts:
        if len(records) >= budget:
            break
        while True:
            try:
                records.append(record_from_response(p, _send(client, p, top_logprobs,
                                                             max_tokens)))
                break
            except Exception:  # noqa: BLE001 - the learner's catch-all retry under test
                continue
    return records


def harvest_no_logprobs(client, prompts, *, budget, top_logprobs, max_tokens):
    return harvest(client, prompts, budget=budget, top_logprobs=None, max_tokens=max_tokens)


def test_check_harvest_accepts_reference():
    assert check_harvest(harvest, exercise="t4.1").passed


@pytest.mark.parametrize("wrong, hint", [
    (harvest_off_by_one, "Never exceed the budget"),
    (harvest_ignores_429, "rate-limit error escaped"),
    (harvest_skips_rate_limited, "rate-limited request is not answered"),
    (harvest_counts_attempts, "count only answered queries"),
    (harvest_retries_quota_forever, "kept calling"),
    (harvest_raises_on_quota, "insufficient_quota"),
    (harvest_no_logprobs, "logprobs"),
])
def test_check_harvest_rejects_mistakes(wrong, hint):
    result = check_harvest(wrong, exercise="t4.1")
    assert result.status == "failed", result
    assert hint in result.message, result.message


def test_check_harvest_stops_a_loop_that_swallows_every_error(monkeypatch):
    # `except Exception: continue` used to swallow the fake client's stop signal, so the check
    # hung for ever (issue 21). The signal is a BaseException now; the limit is a safety net.
    from utils.checks import TIME_LIMIT_ENV

    monkeypatch.setenv(TIME_LIMIT_ENV, "30")
    start = time.monotonic()
    result = check_harvest(harvest_swallows_every_error, exercise="t4.1")
    assert time.monotonic() - start < 10
    assert result.status == "failed", result
    assert "kept calling" in result.message and "quota" in result.message, result.message


def test_fake_client_counts_and_raises_like_openai():
    c = FakeTeacherClient(quota=1, rate_limited_calls=frozenset({1}))
    kw = dict(model="dd-teacher", messages=as_messages("q"), max_tokens=2)
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(**kw)
    assert exc.value.code == "rate_limit_exceeded" and retry_after_seconds(exc.value) == 0.001
    assert c.chat.completions.create(**kw).choices[0].message.content == "answer to q"
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(**kw)
    assert is_quota_error(exc.value) and c.billed == 1 and c.calls == 3


# --------------------------------------------------------------------------------------
# Exercise 4.2: hidden size from singular values


def _svd(m, center=True):
    m = np.asarray(m, dtype=np.float64)
    if center:
        m = m - m.mean(1, keepdims=True)
    return np.linalg.svd(m, compute_uv=False)


def hidden_no_plus_one(m):
    s = _svd(m)
    return int(np.argmax(np.log(s[:-1]) - np.log(s[1:]))), s


def hidden_no_centring(m):
    s = _svd(m, center=False)
    return int(np.argmax(np.log(s[:-1]) - np.log(s[1:]))) + 1, s


def hidden_absolute_threshold(m):
    s = _svd(m)
    return int((s > 1e-3).sum()), s


def hidden_tiny_relative_threshold(m):
    s = _svd(m)
    return int((s > 1e-9 * s[0]).sum()), s


def hidden_above_mean(m):
    s = _svd(m)
    return int((s > s.mean()).sum()), s


def hidden_linear_gap(m):
    s = _svd(m)  # biggest absolute difference: finds the top of the spectrum, not the cliff
    return int(np.argmax(s[:-1] - s[1:])) + 1, s


def hidden_unsorted(m):
    s = _svd(m)
    return hidden_size_from_logits(m)[0], s[::-1]


def test_check_hidden_size_accepts_reference():
    assert check_hidden_size_estimate(hidden_size_from_logits, exercise="t4.2").passed


@pytest.mark.parametrize("wrong, hint", [
    (hidden_no_plus_one, "Off by one"),
    (hidden_no_centring, "centre each row"),
    (hidden_absolute_threshold, "fixed threshold"),
    (hidden_tiny_relative_threshold, "noise floor"),
    (hidden_above_mean, "largest drop"),
    (hidden_linear_gap, "largest drop"),
    (hidden_unsorted, "sorted"),
])
def test_check_hidden_size_rejects_mistakes(wrong, hint):
    result = check_hidden_size_estimate(wrong, exercise="t4.2")
    assert result.status == "failed", result
    assert hint in result.message, result.message


# --------------------------------------------------------------------------------------
# Exercise 4.3: watermark z-score


def z_counts_repeats(tokens, is_green, gamma):
    pairs = list(zip(tokens[:-1], tokens[1:], strict=True))
    g = sum(is_green(a, b) for a, b in pairs)
    return (g - gamma * len(pairs)) / math.sqrt(len(pairs) * gamma * (1 - gamma))


def _unique(tokens, is_green):
    pairs = list(dict.fromkeys(zip(tokens[:-1], tokens[1:], strict=True)))
    return sum(is_green(a, b) for a, b in pairs), len(pairs)


def z_uses_n(tokens, is_green, gamma):
    g, T = _unique(tokens, is_green)
    return (g - gamma * T) / math.sqrt(T)


def z_no_sqrt(tokens, is_green, gamma):
    g, T = _unique(tokens, is_green)
    return (g - gamma * T) / (T * gamma * (1 - gamma))


def z_fraction(tokens, is_green, gamma):
    g, T = _unique(tokens, is_green)
    return g / T - gamma


def z_fixed_gamma(tokens, is_green, gamma):
    g, T = _unique(tokens, is_green)
    return (g - 0.25 * T) / math.sqrt(T * 0.25 * 0.75)


def z_scores_first_token(tokens, is_green, gamma):
    g, T = _unique(tokens, is_green)
    T += 1  # counts the first token (which has no context) as a red token
    return (g - gamma * T) / math.sqrt(T * gamma * (1 - gamma))


def z_wrong_direction(tokens, is_green, gamma):
    # is_green(token, prev): the green list is seeded by the PREVIOUS token
    pairs = list(dict.fromkeys(zip(tokens[:-1], tokens[1:], strict=True)))
    g = sum(is_green(b, a) for a, b in pairs)
    return (g - gamma * len(pairs)) / math.sqrt(len(pairs) * gamma * (1 - gamma))


def test_check_watermark_z_accepts_reference():
    assert check_watermark_z(green_z_score, exercise="t4.3").passed


@pytest.mark.parametrize("wrong, hint", [
    (z_counts_repeats, "repeated"),
    (z_uses_n, "standard deviation"),
    (z_no_sqrt, "variance"),
    (z_fraction, "green fraction"),
    (z_fixed_gamma, "hard-coded"),
    (z_scores_first_token, "off by one"),
    (z_wrong_direction, "expected z"),
])
def test_check_watermark_z_rejects_mistakes(wrong, hint):
    result = check_watermark_z(wrong, exercise="t4.3")
    assert result.status == "failed", result
    assert hint in result.message, result.message


def test_checks_report_not_done_and_errors():
    def todo(*args, **kwargs):
        raise NotImplementedError("Exercise 4.3: watermark_z")

    assert check_watermark_z(todo, exercise="t4.3").status == "not_done"
    assert check_hidden_size_estimate(lambda m: 1 / 0, exercise="t4.2").status == "error"


# --------------------------------------------------------------------------------------
# Exercise 4.4 (open experiment): the cheapest defence that stops the SVD attack
# The shipped teacher's full logprob vectors for the lesson's SVD prompts, computed directly
# (the API returns log_softmax of the same logits), so these tests re-measure the bar.

REFERENCE_DEFENCE = {"top_k": 10, "round_decimals": None, "noise_scale": 0.015}  # solution's


@pytest.fixture(scope="module")
def teacher_logprobs():
    import torch

    from utils.extraction import final_logits, skill_prompts
    from utils.models import load_model

    teacher, tok = load_model("teacher", verbose=False)
    prompts = skill_prompts("train", 176, seed=1)  # the lesson's SVD_QUERIES prompts (SEED + 1)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in prompts]
    q = torch.log_softmax(final_logits(teacher.eval(), ids), dim=-1).numpy()  # (176, V)
    assert hidden_size_from_logits(q)[0] == teacher.config.hidden_size  # undefended: it works
    return q, teacher.config.hidden_size


def _defence(**kw):
    choice = {"top_k": None, "round_decimals": None, "noise_scale": 0.0, **kw}
    return lambda: choice


def test_defence_check_accepts_the_reference_with_a_margin(teacher_logprobs):
    q, h = teacher_logprobs
    result = check_defence_choice(lambda: dict(REFERENCE_DEFENCE), q, h)
    assert result.passed, result
    r = defence_experiment(q, h, **REFERENCE_DEFENCE)
    assert r["attack_stopped"] and r["honest_cost"] <= 0.75 * DEFENCE_COST_BAR, r  # a margin
    assert f"{r['honest_cost']:.3g} nats" in result.message  # the message is the measurement


@pytest.mark.parametrize("kw, words", [
    ({}, "attack still works"),                                   # no defence at all
    ({"top_k": 20}, "attack still works"),                        # truncation: a price (5.1)
    ({"round_decimals": 2}, "attack still works"),                # too fine to hide the cliff
    ({"noise_scale": 0.015}, "attack still works"),               # averaged away (64 repeats)
    ({"top_k": 2}, "attack still works"),                         # a price, and users pay too
    ({"noise_scale": 0.1}, "Too expensive"),                      # the lesson's default noise
    ({"round_decimals": 1}, "Too expensive"),                     # section 5's rounding
])
def test_defence_check_rejects_bad_choices(teacher_logprobs, kw, words):
    q, h = teacher_logprobs
    result = check_defence_choice(_defence(**kw), q, h)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("choice, words", [
    ({"top_k": None, "round_decimals": 2}, "missing 'noise_scale'"),
    ({"top_k": "20", "round_decimals": None, "noise_scale": 0.0}, "str"),
    ({"top_k": 1, "round_decimals": None, "noise_scale": 0.0}, "out of range"),
    ({"top_k": None, "round_decimals": 1.5, "noise_scale": 0.0}, "whole number"),
    ({"top_k": None, "round_decimals": None, "noise_scale": -0.1}, "out of range"),
    ({"top_k": None, "round_decimals": None, "noise_scale": None}, "None"),
    ({"attack_stopped": True, "honest_cost": 0.0}, "settings"),     # a fake result
    (0.0, "settings"),                                               # a fake number
])
def test_defence_check_rejects_wrong_types_and_fake_results(choice, words):
    q = np.zeros((4, 8))  # never reached: the choice is read before anything runs
    result = check_defence_choice(lambda: choice, q, 3)
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_defence_experiment_models_the_attacker(teacher_logprobs):
    q, h = teacher_logprobs
    clean = defence_experiment(q, h)
    assert clean["estimate"] == h and not clean["attack_stopped"] and clean["honest_cost"] == 0
    assert clean["recovery_error"] == 0 and clean["queries_per_vector"] == 1
    top20 = defence_experiment(q, h, top_k=20)  # section 5.1: 1 + ceil((V - k) / (k - 1))
    assert top20["queries_per_vector"] == 1 + math.ceil((q.shape[1] - 20) / 19)
    assert not top20["attack_stopped"]
    noisy = defence_experiment(q, h, noise_scale=0.01)
    assert noisy["repeats"] == DEFENCE_MAX_REPEATS  # the budget buys the most repeats
    poor = defence_experiment(q, h, noise_scale=0.01, budget=q.shape[0])
    assert poor["repeats"] == 1 and poor["recovery_error"] > noisy["recovery_error"]
    starved = defence_experiment(q, h, budget=h)  # fewer vectors than h + 2: no cliff
    assert starved["attack_stopped"]


def test_defence_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 4.4: choose_defence")

    q = np.zeros((4, 8))
    result = check_defence_choice(not_done, q, 3)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_defence_choice(lambda: 1 / 0, q, 3).status == "error"
    assert check_defence_choice("round", q, 3).status == "error"


def test_defence_simulation_is_the_servers_arithmetic():
    # the check simulates the defended API instead of querying it: the same numbers as the
    # server's own _defend for the same noise draws (noise, clip at 0, rounding)
    from types import SimpleNamespace

    from utils.checks.extraction import _defended
    from utils.serve import Defences, _Engine

    values = -np.abs(np.random.default_rng(3).normal(size=(5, 40))) * 4
    for kw in ({"round_decimals": 1}, {"noise": "gaussian", "noise_scale": 0.2},
               {"noise": "gaussian", "noise_scale": 0.05, "round_decimals": 2}):
        engine = SimpleNamespace(config=SimpleNamespace(defences=Defences(**kw)),
                                 noise_rng=np.random.default_rng(7))
        served = _Engine._defend(engine, values)
        mine = _defended(values, np.random.default_rng(7), kw.get("round_decimals"),
                         kw.get("noise_scale", 0.0))
        assert np.array_equal(served, mine), kw
