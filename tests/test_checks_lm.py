"""Mutation tests for lesson 02's checks (utils.checks.lm): the classic mistakes are rejected
with a hint that names them, the references and the course's implementations pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.checks.lm import (
    SCHEDULE_PPL_BAR,
    check_greedy_decode,
    check_mask_labels,
    check_perplexity_from_logits,
    check_schedule_choice,
    schedule_experiment,
)

# ------------------------------------------------------------------------------ 2.1 mask_labels


def mask_ok(input_ids, assistant_mask, ignore_index=-100):
    return torch.where(assistant_mask.bool(), input_ids, torch.full_like(input_ids, ignore_index))


def mask_reversed(input_ids, assistant_mask, ignore_index=-100):
    return torch.where(assistant_mask.bool(), torch.full_like(input_ids, ignore_index), input_ids)


def mask_zero(input_ids, assistant_mask, ignore_index=-100):
    return input_ids * assistant_mask


def mask_nothing(input_ids, assistant_mask, ignore_index=-100):
    return input_ids.clone()


def mask_in_place(input_ids, assistant_mask, ignore_index=-100):
    input_ids[~assistant_mask.bool()] = ignore_index
    return input_ids


def mask_shifted(input_ids, assistant_mask, ignore_index=-100):
    labels = mask_ok(input_ids, assistant_mask, ignore_index)
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)


def mask_hard_coded(input_ids, assistant_mask, ignore_index=-100):
    return mask_ok(input_ids, assistant_mask, -100)


def mask_int_mask_only(input_ids, assistant_mask, ignore_index=-100):
    # multiplies by the mask and adds -100 * (1 - mask): breaks on a bool mask
    return input_ids * assistant_mask + ignore_index * (1 - assistant_mask)


def mask_batch_only(input_ids, assistant_mask, ignore_index=-100):
    B, T = input_ids.shape  # assumes a (B, T) batch
    labels = input_ids.clone()
    for b in range(B):
        labels[b, assistant_mask[b] == 0] = ignore_index
    return labels


def mask_float(input_ids, assistant_mask, ignore_index=-100):
    return mask_ok(input_ids, assistant_mask, ignore_index).float()


def mask_pads_kept(input_ids, assistant_mask, ignore_index=-100):
    # keeps everything after the first assistant token, pads included
    first = assistant_mask.float().argmax(-1, keepdim=True)
    pos = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    return torch.where(pos >= first, input_ids, torch.full_like(input_ids, ignore_index))


def mask_not_done(input_ids, assistant_mask, ignore_index=-100):
    raise NotImplementedError("Exercise 2.1: mask_labels")


def test_mask_labels_accepts_the_reference():
    assert check_mask_labels(mask_ok).passed


def test_mask_labels_accepts_the_course_implementation():
    train = pytest.importorskip("utils.train")
    assert check_mask_labels(train.mask_labels).passed


@pytest.mark.parametrize("wrong, words", [
    (mask_reversed, "wrong way round"),
    (mask_zero, "not 0"),
    (mask_nothing, "nothing was masked"),
    (mask_in_place, "in place"),
    (mask_shifted, "shifted"),
    (mask_hard_coded, "ignore_index argument"),
    (mask_float, "integer"),
    (mask_pads_kept, "padding"),
])
def test_mask_labels_rejects_classic_mistakes(wrong, words):
    result = check_mask_labels(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("wrong", [mask_batch_only, mask_int_mask_only])
def test_mask_labels_crashes_are_reported_not_raised(wrong):
    # a bool mask breaks `1 - mask`; a (T,) input breaks `labels[b, ...]`
    result = check_mask_labels(wrong)
    assert result.status == "error", result
    assert "your function raised" in result.message


def test_mask_labels_not_done():
    assert check_mask_labels(mask_not_done).status == "not_done"


# --------------------------------------------------------------------- 2.2 perplexity_from_logits


def ppl_ok(logits, labels):
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    return torch.exp(loss)


def ppl_manual_ok(logits, labels):
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return math.exp(nll[keep].mean().item())


def ppl_no_shift(logits, labels):
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
    return loss.exp().item()


def ppl_wrong_shift(logits, labels):
    loss = F.cross_entropy(logits[:, 1:].reshape(-1, logits.size(-1)), labels[:, :-1].reshape(-1))
    return loss.exp().item()


def ppl_sum(logits, labels):
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           reduction="sum")
    return loss.exp().item()


def ppl_no_exp(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                           labels[:, 1:].reshape(-1)).item()


def ppl_base2(logits, labels):
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    return 2 ** loss.item()


def ppl_padding_counted(logits, labels):
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return math.exp(nll.mean().item())


def ppl_per_sequence(logits, labels):
    per = []
    for b in range(logits.size(0)):
        per.append(F.cross_entropy(logits[b, :-1], labels[b, 1:]))
    return torch.stack(per).mean().exp().item()


def ppl_wrong_axis(logits, labels):
    logp = logits.log_softmax(1)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return math.exp(nll[keep].mean().item())


def ppl_per_token_tensor(logits, labels):
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           reduction="none")
    return loss.exp()


def ppl_not_done(logits, labels):
    raise NotImplementedError("Exercise 2.2: perplexity_from_logits")


@pytest.mark.parametrize("right", [ppl_ok, ppl_manual_ok])
def test_perplexity_accepts_right_answers(right):
    assert check_perplexity_from_logits(right).passed


def test_perplexity_accepts_the_course_implementation():
    evaluate = pytest.importorskip("utils.evaluate")
    assert check_perplexity_from_logits(evaluate.perplexity_from_logits).passed


@pytest.mark.parametrize("wrong, words", [
    (ppl_no_shift, "position t against the label at t"),
    (ppl_wrong_shift, "wrong way"),
    (ppl_sum, "summed"),
    (ppl_no_exp, "exp"),
    (ppl_base2, "base 2"),
    (ppl_padding_counted, "-100"),
    (ppl_per_sequence, "per sequence"),
    (ppl_wrong_axis, "axis"),
    (ppl_per_token_tensor, "one number"),
])
def test_perplexity_rejects_classic_mistakes(wrong, words):
    result = check_perplexity_from_logits(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_perplexity_not_done():
    assert check_perplexity_from_logits(ppl_not_done).status == "not_done"


# ---------------------------------------------------------------------------- 2.3 greedy_decode


@torch.no_grad()
def greedy_ok(model, input_ids, max_new_tokens, eos_token_id):
    seq = input_ids
    for _ in range(max_new_tokens):
        nxt = model(seq).logits[:, -1, :].argmax(-1, keepdim=True)  # (1, 1)
        seq = torch.cat([seq, nxt], dim=1)
        if nxt.item() == eos_token_id:
            break
    return seq


@torch.no_grad()
def greedy_cached_ok(model, input_ids, max_new_tokens, eos_token_id):
    seq, past, step = input_ids, None, input_ids
    for _ in range(max_new_tokens):
        out = model(step, past_key_values=past, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        past, step = out.past_key_values, nxt
        if nxt.item() == eos_token_id:
            break
    return seq


def _loop(pick, *, stop=True, extra=0, keep_eos=True, prompt_too=True, feed_last_only=False):
    @torch.no_grad()
    def greedy(model, input_ids, max_new_tokens, eos_token_id):
        seq = input_ids
        for _ in range(max_new_tokens + extra):
            # feeding only the newest token without past_key_values: the model forgets
            inp = seq[:, -1:] if feed_last_only and seq.shape[1] > input_ids.shape[1] else seq
            nxt = pick(model(inp).logits).reshape(1, 1)
            if stop and not keep_eos and nxt.item() == eos_token_id:
                break
            seq = torch.cat([seq, nxt], dim=1)
            if stop and nxt.item() == eos_token_id:
                break
        return seq if prompt_too else seq[:, input_ids.shape[1]:]
    return greedy


last = lambda logits: logits[:, -1, :].argmax(-1)  # noqa: E731


def greedy_sampled(model, input_ids, max_new_tokens, eos_token_id):
    torch.manual_seed(0)
    seq = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probs = model(seq).logits[:, -1].softmax(-1)
            nxt = torch.multinomial(probs, 1)
            seq = torch.cat([seq, nxt], dim=1)
            if nxt.item() == eos_token_id:
                break
    return seq


def greedy_not_done(model, input_ids, max_new_tokens, eos_token_id):
    raise NotImplementedError("Exercise 2.3: greedy_decode")


@pytest.mark.parametrize("right", [greedy_ok, greedy_cached_ok])
def test_greedy_accepts_right_answers(right):
    assert check_greedy_decode(right).passed


def test_greedy_accepts_the_course_implementation():
    evaluate = pytest.importorskip("utils.evaluate")
    assert check_greedy_decode(evaluate.greedy_decode).passed
    assert check_greedy_decode(
        lambda m, ids, n, eos: evaluate.greedy_decode(m, ids, n, eos, use_cache=False)).passed


@pytest.mark.parametrize("wrong, words", [
    (_loop(lambda lg: lg.argmax(1)[:, -1]), "not over positions"),
    (_loop(lambda lg: lg[:, 0, :].argmax(-1)), "LAST position"),
    (_loop(last, stop=False), "did not stop"),
    (_loop(last, keep_eos=False), "dropped it"),
    (_loop(last, extra=1), "off by one"),
    (_loop(last, extra=-1), "off by one"),
    (_loop(last, prompt_too=False), "only the new tokens"),
    (_loop(last, feed_last_only=True), "differ from model.generate"),
    (greedy_sampled, "argmax"),
])
def test_greedy_rejects_classic_mistakes(wrong, words):
    result = check_greedy_decode(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_greedy_not_done():
    assert check_greedy_decode(greedy_not_done).status == "not_done"


# ------------------------------------------------------------- 2.4 open experiment: the schedule
# The check trains a small model for real (seconds), so these tests re-measure the bar.

REFERENCE_SCHEDULE = {"lr": 1e-2, "warmup_steps": 0.1, "scheduler": "cosine"}  # the solution's


@pytest.fixture(scope="module")
def world_tokenizer():
    from utils.tokenizer import load_tokenizer

    return load_tokenizer()


def test_schedule_check_accepts_the_reference_with_a_margin(world_tokenizer):
    result = check_schedule_choice(lambda: dict(REFERENCE_SCHEDULE), world_tokenizer)
    assert result.passed, result
    r = schedule_experiment(world_tokenizer, **REFERENCE_SCHEDULE)
    assert r["perplexity"] <= 0.85 * SCHEDULE_PPL_BAR, r  # a margin
    assert f"{r['perplexity']:.2f}" in result.message  # the message is the measurement


@pytest.mark.parametrize("choice", [
    {"lr": 5e-5, "warmup_steps": 0.0, "scheduler": "linear"},   # Trainer's default: too timid
    {"lr": 3e-3, "warmup_steps": 0.1, "scheduler": "cosine"},   # the lesson's LR: too slow here
    {"lr": 3e-2, "warmup_steps": 0.1, "scheduler": "cosine"},   # too far: it overshoots
])
def test_schedule_check_rejects_slow_schedules(world_tokenizer, choice):
    result = check_schedule_choice(lambda: choice, world_tokenizer)
    assert result.status == "failed" and "(missed)" in result.message, result


@pytest.mark.parametrize("choice, words", [
    ({"lr": 0.0, "warmup_steps": 0.1, "scheduler": "cosine"}, "out of range"),
    ({"lr": "1e-2", "warmup_steps": 0.1, "scheduler": "cosine"}, "str"),
    ({"lr": 1e-2, "warmup_steps": -1, "scheduler": "cosine"}, "out of range"),
    ({"lr": 1e-2, "warmup_steps": 0.1, "scheduler": "cyclic"}, "not allowed"),
    ({"lr": 1e-2, "warmup_steps": 0.1}, "missing 'scheduler'"),
    ({"perplexity": 2.0}, "settings"),        # a fake result
    (2.0, "settings"),                        # a fake number
])
def test_schedule_check_rejects_wrong_types_and_fake_results(choice, words):
    result = check_schedule_choice(lambda: choice, None)  # never reached
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_schedule_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 2.4: choose_schedule")

    result = check_schedule_choice(not_done, None)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_schedule_choice(lambda: 1 / 0, None).status == "error"
    assert check_schedule_choice(0.01, None).status == "error"
