"""Mutation tests for utils/checks/distill.py: the classic mistakes are rejected with the
right hint, the references pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.checks.distill import (
    SMALL_TRANSFER_BAR,
    SMALL_TRANSFER_SEEDS,
    _small_transfer_case,
    check_distillation_loss,
    check_distillation_settings,
    check_fit_class_bias,
    check_kd_loss,
    check_softmax_with_temperature,
    small_transfer_experiment,
)
from utils.distill import (
    add_class_bias,
    distillation_loss,
    fit_class_bias,
    kd_loss,
    log_softmax_with_temperature,
    softmax_with_temperature,
)


def _kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _lsm(x, T):
    return F.log_softmax(x / T, dim=-1)


# ------------------------------------------------------------------ softmax (1.1)

def softmax_no_max_subtraction(logits, temperature):
    e = (logits / temperature).exp()
    return e / e.sum(dim=-1, keepdim=True)


def softmax_times_t(logits, temperature):
    return torch.softmax(logits * temperature, dim=-1)


def softmax_dim0(logits, temperature):
    return torch.softmax(logits / temperature, dim=0)


def softmax_ignores_t(logits, temperature):
    return torch.softmax(logits, dim=-1)


def softmax_in_place(logits, temperature):
    logits /= temperature
    return torch.softmax(logits, dim=-1)


def softmax_unnormalised(logits, temperature):
    z = logits / temperature
    return (z - z.amax(-1, keepdim=True)).exp()


def softmax_subtracts_global_max(logits, temperature):
    z = logits / temperature
    e = (z - z.max()).exp()  # one max for the whole batch: a row far below it underflows
    return e / e.sum(-1, keepdim=True)


def softmax_not_done(logits, temperature):
    raise NotImplementedError("Exercise 1.1: softmax_with_temperature")


@pytest.mark.parametrize("wrong, words", [
    (softmax_no_max_subtraction, "maximum"),
    (softmax_times_t, "divide"),
    (softmax_dim0, "dim=-1"),
    (softmax_ignores_t, "ignored"),
    (softmax_in_place, "in place"),
    (softmax_unnormalised, "sum"),
    (softmax_subtracts_global_max, "maximum"),
])
def test_softmax_check_rejects_mistakes(wrong, words):
    result = check_softmax_with_temperature(wrong)
    assert result.status in {"failed", "error"}, wrong.__name__
    assert words in result.message, result.message


def test_softmax_check_accepts_reference_and_library():
    assert check_softmax_with_temperature(softmax_with_temperature).passed
    assert check_softmax_with_temperature(lambda x, t: torch.softmax(x / t, dim=-1)).passed


def test_softmax_check_not_done():
    assert check_softmax_with_temperature(softmax_not_done).status == "not_done"


# ------------------------------------------------------------------ kd_loss (1.2)

def kd_no_t2(s, t, T):
    return _kl(_lsm(t, T), _lsm(s, T)).mean()


def kd_reverse(s, t, T):
    return _kl(_lsm(s, T), _lsm(t, T)).mean() * T**2


def kd_t_on_teacher_only(s, t, T):
    return _kl(_lsm(t, T), _lsm(s, 1.0)).mean() * T**2


def kd_t_on_student_only(s, t, T):
    return _kl(_lsm(t, 1.0), _lsm(s, T)).mean() * T**2


def kd_sum_over_batch(s, t, T):
    return _kl(_lsm(t, T), _lsm(s, T)).sum() * T**2


def kd_mean_reduction(s, t, T):
    p_log, q_log = _lsm(t, T), _lsm(s, T)
    return (p_log.exp() * (p_log - q_log)).mean() * T**2  # mean over examples AND classes


def kd_times_t(s, t, T):
    return _kl(_lsm(t, T), _lsm(s, T)).mean() * T


def kd_cross_entropy(s, t, T):
    return -(_lsm(t, T).exp() * _lsm(s, T)).sum(-1).mean() * T**2


def kd_detached(s, t, T):
    return kd_loss(s.detach(), t, T)


def kd_returns_float(s, t, T):
    return float(kd_loss(s, t, T))


def kd_per_example(s, t, T):
    return _kl(_lsm(t, T), _lsm(s, T)) * T**2


def kd_unstable(s, t, T):
    ps = softmax_no_max_subtraction(s, T)
    pt = softmax_no_max_subtraction(t, T)
    return (pt * (pt.log() - ps.log())).sum(-1).mean() * T**2


@pytest.mark.parametrize("wrong, words", [
    (kd_no_t2, "T^2"),
    (kd_reverse, "direction"),
    (kd_t_on_teacher_only, "teacher only"),
    (kd_t_on_student_only, "student only"),
    (kd_sum_over_batch, "summed over the batch"),
    (kd_mean_reduction, "batchmean"),
    (kd_times_t, "not T^2"),
    (kd_cross_entropy, "cross-entropy"),
    (kd_detached, "autograd"),
    (kd_returns_float, "torch.Tensor"),
    (kd_per_example, "single number"),
])
def test_kd_check_rejects_mistakes(wrong, words):
    result = check_kd_loss(wrong)
    assert result.status in {"failed", "error"}, wrong.__name__
    assert words in result.message, result.message


def test_kd_check_accepts_reference_and_library():
    assert check_kd_loss(kd_loss).passed

    def library(s, t, T):
        return F.kl_div(_lsm(s, T), _lsm(t, T), reduction="batchmean", log_target=True) * T**2

    assert check_kd_loss(library).passed
    # A correct but naive version (no log-softmax) is fine on these well-scaled cases.
    assert check_kd_loss(kd_unstable).passed


# ------------------------------------------------------------------ distillation_loss (1.3)

def mix_swapped(s, t, y, T, alpha):
    return (1 - alpha) * kd_loss(s, t, T) + alpha * F.cross_entropy(s, y)


def mix_ce_at_t(s, t, y, T, alpha):
    return alpha * kd_loss(s, t, T) + (1 - alpha) * F.cross_entropy(s / T, y)


def mix_no_t2(s, t, y, T, alpha):
    return alpha * kd_no_t2(s, t, T) + (1 - alpha) * F.cross_entropy(s, y)


def mix_unweighted(s, t, y, T, alpha):
    return kd_loss(s, t, T) + F.cross_entropy(s, y)


def mix_alpha_both(s, t, y, T, alpha):
    return alpha * kd_loss(s, t, T) + alpha * F.cross_entropy(s, y)


def mix_reverse_kl(s, t, y, T, alpha):
    return alpha * kd_reverse(s, t, T) + (1 - alpha) * F.cross_entropy(s, y)


def mix_ce_summed(s, t, y, T, alpha):
    return alpha * kd_loss(s, t, T) + (1 - alpha) * F.cross_entropy(s, y, reduction="sum")


def mix_detached_kd(s, t, y, T, alpha):
    return alpha * kd_loss(s, t, T).detach() + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize("wrong, words", [
    (mix_swapped, "other way round"),
    (mix_ce_at_t, "temperature 1"),
    (mix_no_t2, "T^2"),
    (mix_unweighted, "alpha"),
    (mix_alpha_both, "1 - alpha"),
    (mix_reverse_kl, "direction"),
    (mix_ce_summed, "summed over the batch"),
    (mix_detached_kd, "gradient"),
])
def test_mix_check_rejects_mistakes(wrong, words):
    result = check_distillation_loss(wrong)
    assert result.status in {"failed", "error"}, wrong.__name__
    assert words in result.message, result.message


def test_mix_check_accepts_reference():
    assert check_distillation_loss(distillation_loss).passed


# ------------------------------------------------------------------ fit_class_bias (1.4)

def _errors(logits, labels):
    return int((logits.argmax(-1) != labels).sum())


def bias_wrong_sign(logits, labels, class_index, candidates):
    best = None
    for b in candidates:
        z = logits.clone()
        z[..., class_index] -= b
        key = (_errors(z, labels), abs(b))
        if best is None or key < best[0]:
            best = (key, b)
    return best[1], best[0][0]


def bias_in_place(logits, labels, class_index, candidates):
    best = None
    for b in candidates:
        logits[..., class_index] += b
        e = _errors(logits, labels)
        logits[..., class_index] -= b
        if best is None or (e, abs(b)) < best[0]:
            best = ((e, abs(b)), b)
    logits[..., class_index] += 0.5  # leaves the caller's tensor changed
    return best[1], best[0][0]


def bias_class_only(logits, labels, class_index, candidates):
    best = None
    mask = labels == class_index
    for b in candidates:
        z = add_class_bias(logits, class_index, b)
        e = int((z[mask].argmax(-1) != class_index).sum())
        if best is None or (e, abs(b)) < best[0]:
            best = ((e, abs(b)), b)
    return best[1], _errors(add_class_bias(logits, class_index, best[1]), labels)


def bias_last_tie(logits, labels, class_index, candidates):
    best = None
    for b in candidates:
        e = _errors(add_class_bias(logits, class_index, b), labels)
        if best is None or e <= best[0]:
            best = (e, b)
    return best[1], best[0]


def bias_errors_before(logits, labels, class_index, candidates):
    b, _ = fit_class_bias(logits, labels, class_index, candidates)
    return b, _errors(logits, labels)


def bias_most_errors(logits, labels, class_index, candidates):
    return max(((b, _errors(add_class_bias(logits, class_index, b), labels))
                for b in candidates), key=lambda p: p[1])


def bias_returns_bias_only(logits, labels, class_index, candidates):
    return fit_class_bias(logits, labels, class_index, candidates)[0]


def bias_always_zero(logits, labels, class_index, candidates):
    return 0.0, _errors(logits, labels)


@pytest.mark.parametrize("wrong, words", [
    (bias_wrong_sign, "sign"),
    (bias_in_place, "in place"),
    (bias_class_only, "all classes"),
    (bias_last_tie, "smallest |bias|"),
    (bias_errors_before, "you report"),
    (bias_most_errors, "fewest"),
    (bias_returns_bias_only, "tuple"),
    (bias_always_zero, "fewest"),
])
def test_bias_check_rejects_mistakes(wrong, words):
    result = check_fit_class_bias(wrong)
    assert result.status in {"failed", "error"}, wrong.__name__
    assert words in result.message, result.message


def test_bias_check_accepts_reference():
    assert check_fit_class_bias(fit_class_bias).passed


def test_checks_never_raise_on_garbage():
    for check in (check_softmax_with_temperature, check_kd_loss, check_distillation_loss,
                  check_fit_class_bias):
        assert check(lambda *a: None).status in {"failed", "error"}
        assert check(lambda *a: 1 / 0).status == "error"
        assert check(42).status == "error"


def test_reference_helpers_agree_with_each_other():
    x = torch.randn(4, 5)
    assert torch.allclose(log_softmax_with_temperature(x, 2.0).exp(),
                          softmax_with_temperature(x, 2.0), atol=1e-6)


# ------------------------------------------------------------------ open experiment (1.5)
# The check trains real students (a few seconds; teachers cached per process), so these tests
# also re-measure the bar's two ends: the reference choice meets it, the naive one does not.

REFERENCE_SETTINGS = {"temperature": 8.0, "alpha": 0.5}  # the solution notebook's choice


def settings_reference():
    return dict(REFERENCE_SETTINGS)


def settings_naive():
    return {"temperature": 1.0, "alpha": 0.0}  # alpha = 0: the student alone, exactly


def settings_not_done():
    raise NotImplementedError("Exercise 1.5: choose_distillation_settings")


@pytest.mark.parametrize("choice, words", [
    ((4.0, 0.9), "dict"),                                     # a tuple, not a dict
    ({"temperature": "4", "alpha": 0.9}, "str"),              # a string, not a number
    ({"temperature": 0.0, "alpha": 0.9}, "out of range"),     # T must be > 0
    ({"temperature": -2.0, "alpha": 0.9}, "out of range"),
    ({"temperature": 4.0, "alpha": 1.5}, "out of range"),     # alpha in [0, 1]
    ({"temperature": 4.0, "alpha": True}, "bool"),
    ({"temperature": float("nan"), "alpha": 0.9}, "not finite"),
    ({"temperature": 4.0}, "missing 'alpha'"),
    ({"temperature": 4.0, "alpha": 0.9, "epochs": 900}, "unknown 'epochs'"),
    (None, "dict"),
])
def test_settings_check_rejects_wrong_types(choice, words):
    result = check_distillation_settings(lambda: choice)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("fake", [
    lambda: 99,                                   # a made-up number of errors saved
    lambda: {"saved": 99},                        # a made-up result, not settings
    lambda: {"errors_saved": 99, "passed": True},
])
def test_settings_check_rejects_a_fake_result(fake):
    result = check_distillation_settings(fake)
    assert result.status == "failed" and "settings" in result.message, result


def test_settings_check_rejects_the_naive_choice():
    result = check_distillation_settings(settings_naive)
    assert result.status == "failed", result
    assert ": 0 saved" in result.message and "(missed)" in result.message, result.message


def test_settings_check_accepts_the_reference_with_a_margin():
    result = check_distillation_settings(settings_reference)
    assert result.passed, result
    measured = small_transfer_experiment(**REFERENCE_SETTINGS)
    assert f"{measured['saved']} saved" in result.message  # the message is the measurement
    assert measured["saved"] >= 1.25 * SMALL_TRANSFER_BAR, measured  # a real margin


def test_settings_check_really_runs_the_experiment():
    # alpha = 0 trains exactly the lone student: same errors on every seed
    r = small_transfer_experiment(1.0, 0.0)
    assert r["alone"] == r["distilled"] and r["saved"] == 0
    assert len(r["alone"]) == len(SMALL_TRANSFER_SEEDS)
    # and a temperature of 1 passes on almost nothing but the label (section 3)
    low_t = small_transfer_experiment(1.0, REFERENCE_SETTINGS["alpha"])
    assert low_t["saved"] < SMALL_TRANSFER_BAR, low_t


def test_settings_experiment_does_not_depend_on_what_ran_before():
    # the teachers use dropout, which draws from torch's global generator: the check seeds it,
    # so a notebook that ran other cells first measures the same numbers as a fresh process
    first = small_transfer_experiment(**REFERENCE_SETTINGS)
    _small_transfer_case.cache_clear()
    torch.manual_seed(12345)
    torch.rand(1000)
    assert small_transfer_experiment(**REFERENCE_SETTINGS) == first


def test_settings_check_not_done_and_errors():
    result = check_distillation_settings(settings_not_done)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_distillation_settings(lambda: 1 / 0).status == "error"
    assert check_distillation_settings(42).status == "error"
    with pytest.raises(ValueError, match="temperature > 0"):
        small_transfer_experiment(0.0, 0.5)


def test_small_transfer_experiment_runs_the_seeds_it_is_given():
    # lesson 01's pre-declared paired test (section 9) reruns the experiment on new seeds:
    # each seed's pair is its own, in the order given, and the same on a second call
    settings = dict(REFERENCE_SETTINGS, seeds=(4, 3))
    both = small_transfer_experiment(**settings)
    assert len(both["alone"]) == len(both["distilled"]) == 2
    one = small_transfer_experiment(**dict(settings, seeds=(3,)))
    assert (one["alone"], one["distilled"]) == ([both["alone"][1]], [both["distilled"][1]])
    assert both["saved"] == sum(both["alone"]) - sum(both["distilled"])
    assert not set(settings["seeds"]) & set(SMALL_TRANSFER_SEEDS)  # not the check's seeds
    _small_transfer_case.cache_clear()  # retrain the teachers: still the same numbers
    assert small_transfer_experiment(**settings) == both
