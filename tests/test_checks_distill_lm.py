"""Mutation tests for utils/checks/distill_lm.py (lesson 03): the classic mistakes are
rejected with the right hint, the references (and a learner-style answer) pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.checks.distill_lm import (
    REPAIR_BAR,
    REPAIR_MAX_FORGET,
    check_distill_compute_loss,
    check_masked_token_kl,
    check_repair_choice,
    check_reverse_kl,
    repair_experiment,
)
from utils.distill import forward_kl_loss, lm_distillation_loss, reverse_kl_loss


def _lsm(x, T):
    return F.log_softmax(x / T, dim=-1)


def _kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _mmean(values, mask):
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum()


# ------------------------------------------------------------ 3.1 masked token-level KL

def kl_learner(student_logits, teacher_logits, mask, temperature):
    """What a learner writes: F.kl_div per token, then a masked mean."""
    T = temperature
    per_token = F.kl_div(F.log_softmax(student_logits / T, -1),
                         F.log_softmax(teacher_logits / T, -1),
                         reduction="none", log_target=True).sum(-1)  # (B, T)
    m = mask.float().to(per_token.dtype)
    return (per_token * m).sum() / m.sum() * T**2


def kl_no_mask(s, t, mask, T):
    return _kl(_lsm(t, T), _lsm(s, T)).mean() * T**2


def kl_padding_in_denominator(s, t, mask, T):
    m = mask.to(s.dtype)
    return (_kl(_lsm(t, T), _lsm(s, T)) * m).sum() / m.numel() * T**2


def kl_sum(s, t, mask, T):
    m = mask.to(s.dtype)
    return (_kl(_lsm(t, T), _lsm(s, T)) * m).sum() * T**2


def kl_per_sequence_mean(s, t, mask, T):
    m = mask.to(s.dtype)
    per = _kl(_lsm(t, T), _lsm(s, T)) * m
    return (per.sum(1) / m.sum(1)).mean() * T**2


def kl_swapped(s, t, mask, T):
    return _mmean(_kl(_lsm(s, T), _lsm(t, T)), mask) * T**2


def kl_no_t2(s, t, mask, T):
    return _mmean(_kl(_lsm(t, T), _lsm(s, T)), mask)


def kl_t_teacher_only(s, t, mask, T):
    return _mmean(_kl(_lsm(t, T), _lsm(s, 1.0)), mask) * T**2


def kl_t_student_only(s, t, mask, T):
    return _mmean(_kl(_lsm(t, 1.0), _lsm(s, T)), mask) * T**2


def kl_vocab_mean(s, t, mask, T):
    return _mmean(_kl(_lsm(t, T), _lsm(s, T)), mask) * T**2 / s.shape[-1]


def kl_mask_inverted(s, t, mask, T):
    return _mmean(_kl(_lsm(t, T), _lsm(s, T)), ~mask.bool()) * T**2


def kl_prompt_not_masked(s, t, mask, T):
    """Masks the padding (the mask's trailing zeros) but keeps the prompt positions."""
    m = mask.bool()
    last = torch.arange(m.shape[1]) <= (m.cumsum(1).argmax(1, keepdim=True))  # up to last answer
    return _mmean(_kl(_lsm(t, T), _lsm(s, T)), last) * T**2


def kl_detached_student(s, t, mask, T):
    return forward_kl_loss(s.detach(), t, mask, T)


def kl_not_done(s, t, mask, T):
    raise NotImplementedError("Exercise 3.1: masked_token_kl")


def kl_crashes(s, t, mask, T):
    return s[mask] @ t  # shapes do not line up


@pytest.mark.parametrize("right", [forward_kl_loss, kl_learner])
def test_masked_token_kl_accepts_reference(right):
    assert check_masked_token_kl(right).passed


@pytest.mark.parametrize("wrong, words", [
    (kl_no_mask, "mask is ignored"),
    (kl_padding_in_denominator, "mask.sum()"),
    (kl_sum, "summed"),
    (kl_per_sequence_mean, "each sequence"),
    (kl_swapped, "direction is swapped"),
    (kl_no_t2, "T^2"),
    (kl_t_teacher_only, "teacher only"),
    (kl_t_student_only, "student only"),
    (kl_vocab_mean, "vocabulary"),
    (kl_mask_inverted, "inverted"),
    (kl_prompt_not_masked, "prompt positions are counted"),
    (kl_detached_student, "no gradient reached"),
])
def test_masked_token_kl_rejects_mistakes(wrong, words):
    result = check_masked_token_kl(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_masked_token_kl_not_done_and_error():
    assert check_masked_token_kl(kl_not_done).status == "not_done"
    result = check_masked_token_kl(kl_crashes)
    assert result.status == "error" and "RuntimeError" in result.message


# ------------------------------------------------------------ 3.2 reverse KL

def rkl_learner(student_logits, teacher_logits, mask, temperature):
    T = temperature
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits / T, dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    return per_token[mask.bool()].mean() * T**2


def rkl_is_forward(s, t, mask, T):
    return forward_kl_loss(s, t, mask, T)


def rkl_no_t2(s, t, mask, T):
    return _mmean(_kl(_lsm(s, T), _lsm(t, T)), mask)


def rkl_sign(s, t, mask, T):
    q, p = _lsm(s, T), _lsm(t, T)
    return _mmean((q.exp() * (p - q)).sum(-1), mask) * T**2


def rkl_no_mask(s, t, mask, T):
    return _kl(_lsm(s, T), _lsm(t, T)).mean() * T**2


def rkl_sum(s, t, mask, T):
    return (_kl(_lsm(s, T), _lsm(t, T)) * mask.to(s.dtype)).sum() * T**2


def rkl_t_student_only(s, t, mask, T):
    return _mmean(_kl(_lsm(s, T), _lsm(t, 1.0)), mask) * T**2


@pytest.mark.parametrize("right", [reverse_kl_loss, rkl_learner])
def test_reverse_kl_accepts_reference(right):
    assert check_reverse_kl(right).passed


@pytest.mark.parametrize("wrong, words", [
    (rkl_is_forward, "expectation under the student"),
    (rkl_no_t2, "T^2"),
    (rkl_sign, "sign"),
    (rkl_no_mask, "mask is ignored"),
    (rkl_sum, "summed"),
    (rkl_t_student_only, "student only"),
])
def test_reverse_kl_rejects_mistakes(wrong, words):
    result = check_reverse_kl(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


# ------------------------------------------------------------ 3.3 the trainer's loss

def loss_learner(student_logits, teacher_logits, labels, temperature, alpha):
    """A ~15-line learner answer."""
    s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]  # shift
    mask = y != -100                                                        # (B, T-1)
    T = temperature
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                  reduction="none", log_target=True).sum(-1)                 # (B, T-1)
    kd = kl[mask].mean() * T**2
    ce = F.cross_entropy(s[mask], y[mask])
    return alpha * kd + (1 - alpha) * ce


def _fkl(s, t, y, T):
    m = y != -100
    return _kl(_lsm(t, T), _lsm(s, T))[m].mean() * T**2


def _ce(s, y, T=1.0):
    return F.cross_entropy(s.reshape(-1, s.shape[-1]) / T, y.reshape(-1), ignore_index=-100)


def loss_not_shifted(s, t, y, T, a):
    return a * _fkl(s, t, y, T) + (1 - a) * _ce(s, y)


def loss_shift_wrong_way(s, t, y, T, a):
    s, t, y = s[:, 1:], t[:, 1:], y[:, :-1]
    return a * _fkl(s, t, y, T) + (1 - a) * _ce(s, y)


def loss_alpha_reversed(s, t, y, T, a):
    return lm_distillation_loss(s, t, y, T, 1 - a)


def loss_prompt_not_masked(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    kd = _kl(_lsm(t, T), _lsm(s, T)).mean() * T**2
    return a * kd + (1 - a) * _ce(s, y)


def loss_no_t2(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    return a * _fkl(s, t, y, T) / T**2 + (1 - a) * _ce(s, y)


def loss_ce_at_t(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    return a * _fkl(s, t, y, T) + (1 - a) * _ce(s, y, T)


def loss_teacher_unshifted(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, 1:], y[:, 1:]
    return a * _fkl(s, t, y, T) + (1 - a) * _ce(s, y)


def loss_swapped_kl(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    m = y != -100
    kd = _kl(_lsm(s, T), _lsm(t, T))[m].mean() * T**2
    return a * kd + (1 - a) * _ce(s, y)


def loss_sum(s, t, y, T, a):
    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    m = y != -100
    kd = _kl(_lsm(t, T), _lsm(s, T))[m].sum() * T**2
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=-100,
                         reduction="sum")
    return a * kd + (1 - a) * ce


def loss_ignores_alpha(s, t, y, T, a):
    return lm_distillation_loss(s, t, y, T, 0.5)


@pytest.mark.parametrize("right", [lm_distillation_loss, loss_learner])
def test_compute_loss_accepts_reference(right):
    assert check_distill_compute_loss(right).passed


@pytest.mark.parametrize("wrong, words", [
    (loss_not_shifted, "not shifted"),
    (loss_shift_wrong_way, "wrong way"),
    (loss_alpha_reversed, "alpha is reversed"),
    (loss_prompt_not_masked, "prompt and padding"),
    (loss_no_t2, "T^2"),
    (loss_ce_at_t, "T = 1"),
    (loss_teacher_unshifted, "teacher's logits are not shifted"),
    (loss_swapped_kl, "direction is swapped"),
    (loss_sum, "summed"),
    (loss_ignores_alpha, "expected"),
])
def test_compute_loss_rejects_mistakes(wrong, words):
    result = check_distill_compute_loss(wrong)
    assert result.status == "failed", result
    assert words in result.message, result.message


# ---------------------------------------------------------------- 3.4 open experiment: repair
# The check fine-tunes the shipped SFT student for real (seconds), so these tests re-measure
# the bars' two ends.

REFERENCE_REPAIR = {"transfer": "skill", "method": "forward_kl", "lr": 3e-4, "temperature": 1.0,
                    "alpha": 0.5}  # the solution's choice


@pytest.fixture(scope="module")
def repair_models():
    from utils.models import load_model

    student, tok = load_model("student-xs-sft", verbose=False)
    teacher, _ = load_model("teacher", verbose=False)
    return student.eval(), teacher.eval(), tok


def _repair(**kw):
    choice = {**REFERENCE_REPAIR, **kw}
    return lambda: choice


def test_repair_check_accepts_the_reference_with_a_margin(repair_models):
    result = check_repair_choice(_repair(), *repair_models)
    assert result.passed, result
    r = repair_experiment(*repair_models, **REFERENCE_REPAIR)
    assert r["skill_after"] >= REPAIR_BAR + 0.03, r  # a margin (3 answers of 100)
    assert r["other_before"] - r["other_after"] <= REPAIR_MAX_FORGET, r
    assert f"{r['skill_after']:.2f} on" in result.message  # the message is the measurement


@pytest.mark.parametrize("kw, words", [
    ({"lr": 3e-3}, "not repaired"),                        # the lesson's lr for training
    ({"method": "sft", "lr": 1e-3}, "not repaired"),
    ({"method": "sft", "lr": 5e-4}, "forgotten"),          # repaired, at the others' cost
])
def test_repair_check_rejects_bad_choices(repair_models, kw, words):
    result = check_repair_choice(_repair(**kw), *repair_models)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("choice, words", [
    ({**REFERENCE_REPAIR, "transfer": "everything"}, "not allowed"),
    ({**REFERENCE_REPAIR, "method": "kl"}, "not allowed"),
    ({**REFERENCE_REPAIR, "lr": "3e-3"}, "str"),
    ({**REFERENCE_REPAIR, "lr": 0}, "out of range"),
    ({**REFERENCE_REPAIR, "alpha": 2}, "out of range"),
    ({k: v for k, v in REFERENCE_REPAIR.items() if k != "alpha"}, "missing 'alpha'"),
    ({"skill_after": 1.0, "other_after": 1.0}, "settings"),     # a fake result
    (0.99, "settings"),                                        # a fake number
])
def test_repair_check_rejects_wrong_types_and_fake_results(choice, words):
    result = check_repair_choice(lambda: choice, None, None, None)  # never reached
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_repair_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 3.4: choose_repair")

    result = check_repair_choice(not_done, None, None, None)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_repair_choice(lambda: 1 / 0, None, None, None).status == "error"
    assert check_repair_choice([], None, None, None).status == "error"
