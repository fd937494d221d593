"""Mutation tests for lesson 04's checks: the references pass, the classic mistakes fail."""

from __future__ import annotations

import math
import time

import numpy as np
import openai
import pytest

from utils.checks.extraction import (
    FakeTeacherClient,
    check_harvest,
    check_hidden_size_estimate,
    check_watermark_z,
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
