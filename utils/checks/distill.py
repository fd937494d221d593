"""Checks for lesson 01 (distillation theory): known answers, invariants, friendly hints.

Each ``check_*`` runs the learner's function on small cases whose answers are known, tests
the invariants the lesson teaches (the KD loss is 0 when the student equals the teacher, its
gradient keeps its size as T grows thanks to T^2, the KL is taken under the teacher) and,
when a value is wrong, compares it with the classic mistakes to say *which* one it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.checks import CheckResult, close, diagnose, expect, expect_close, run_check
from utils.distill import (
    add_class_bias,
    distillation_loss,
    fit_class_bias,
    kd_loss,
    log_softmax_with_temperature,
)

__all__ = [
    "check_distillation_loss",
    "check_fit_class_bias",
    "check_kd_loss",
    "check_softmax_with_temperature",
]

_LOGITS = torch.tensor([[2.0, 1.0, 0.1, -1.0],
                        [0.5, 3.0, -0.5, 0.0],
                        [-1.0, 0.0, 1.0, 4.0]], dtype=torch.float64)  # (B=3, C=4)
_TEACHER = torch.tensor([[5.0, 1.0, -2.0, 0.0],
                         [0.0, 4.0, 1.5, -3.0],
                         [1.0, -1.0, 0.0, 6.0]], dtype=torch.float64)  # (3, 4)
_LABELS = torch.tensor([0, 2, 3])


def _scalar(value: Any, what: str) -> float:
    expect(isinstance(value, Tensor), f"{what} should return a torch.Tensor (so it can be "
           f"back-propagated), got {type(value).__name__}.")
    expect(value.numel() == 1, f"{what} should return a single number (a scalar tensor) "
           f"averaged over the batch, got shape {tuple(value.shape)}.")
    expect(torch.isfinite(value).all(), f"{what} returned NaN or inf.")
    return float(value)


def _close(a: float, b: float) -> bool:
    return close(a, b, atol=1e-7)


def _diagnose(got: float, expected: float, mistakes: dict[str, float], what: str) -> None:
    diagnose(got, expected, mistakes, what, atol=1e-7)


# ---------------------------------------------------------------- Exercise 1.1

def check_softmax_with_temperature(fn: Callable[..., Tensor]) -> CheckResult:
    """Exercise 1.1: ``fn(logits, temperature)`` is ``softmax(logits / T)`` over the last axis."""

    def cases(fn: Callable[..., Tensor]) -> None:
        x = _LOGITS.clone()
        for T in (1.0, 2.0):
            out = fn(x, T)
            expect(torch.equal(x, _LOGITS), "your function changed its input in place; "
                   "compute on a new tensor (e.g. z = logits / temperature) instead.")
        out = fn(x, 1.0)
        expect(isinstance(out, Tensor), f"return a torch.Tensor, got {type(out).__name__}.")
        expect(tuple(out.shape) == tuple(x.shape),
               f"the output should have the input's shape {tuple(x.shape)}, got "
               f"{tuple(out.shape)}: softmax keeps one probability per logit.")
        column_sums = out.sum(dim=0).double()  # (C,) sums down each column
        if torch.allclose(column_sums, torch.ones_like(column_sums), atol=1e-6):
            expect(False, "your probabilities sum to 1 down each column (dim=0); the classes "
                   "are on the last axis: normalise with dim=-1.")
        expect_close(out.sum(dim=-1), torch.ones(x.shape[0]), "each row's sum", atol=1e-6)
        expect_close(out, torch.softmax(x, dim=-1), "softmax_with_temperature(logits, 1.0)",
                     atol=1e-6)

        out2 = fn(x, 2.0)
        if torch.allclose(out2.double(), torch.softmax(x * 2.0, dim=-1), atol=1e-6):
            expect(False, "at T = 2 you made the distribution sharper: divide the logits by "
                   "the temperature, softmax(logits / T), do not multiply.")
        if torch.allclose(out2.double(), torch.softmax(x, dim=-1), atol=1e-6):
            expect(False, "at T = 2 you returned the same as at T = 1: the temperature is "
                   "ignored. Divide the logits by it before the softmax.")
        expect_close(out2, torch.softmax(x / 2.0, dim=-1), "softmax_with_temperature(logits, 2.0)",
                     atol=1e-6)

        big = torch.tensor([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])
        out_big = fn(big, 1.0)
        expect(torch.isfinite(out_big).all(),
               "with large logits like [1000, 1001, 1002] your softmax returns NaN or inf: "
               "exp(1000) overflows. Subtract each row's maximum before exp; it cancels in "
               "the ratio.")
        expect_close(out_big, torch.softmax(big, dim=-1), "softmax of [1000, 1001, 1002]",
                     atol=1e-6)

        x3 = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
        expect_close(fn(x3, 3.0), torch.softmax(x3 / 3.0, dim=-1),
                     "a (2, 3, 5) batch at T = 3 (classes on the last axis)", atol=1e-6)

        hot = fn(x, 100.0)
        expect(float((hot - 1 / x.shape[1]).abs().max()) < 0.02,
               "at a high temperature (T = 100) the distribution should be nearly uniform.")
        cold = fn(x, 0.01)
        expect(torch.equal(cold.argmax(dim=-1), x.argmax(dim=-1)) and
               float(cold.max(dim=-1).values.min()) > 0.99,
               "at a low temperature (T = 0.01) the distribution should be nearly one-hot on "
               "the largest logit.")

    return run_check("1.1", "softmax_with_temperature", fn, cases,
                     success="all checks passed: stable, normalised over classes, and T "
                             "flattens it.")


# ---------------------------------------------------------------- Exercise 1.2

def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _kd_mistakes(s: Tensor, t: Tensor, temperature: float) -> dict[str, float]:
    T = temperature
    ps, pt = log_softmax_with_temperature(s, T), log_softmax_with_temperature(t, T)
    s1, t1 = F.log_softmax(s, -1), F.log_softmax(t, -1)
    fwd = _kl(pt, ps)
    mistakes = {
        "It looks like the T^2 factor is missing: multiply the KL by temperature ** 2 (Hinton "
        "et al. keep the gradient's size independent of T this way).": float(fwd.mean()),
        "It looks like the KL direction is swapped: you computed KL(student || teacher). "
        "Hinton's loss is KL(teacher || student) = sum p_teacher * (log p_teacher - "
        "log p_student), the expectation under the teacher.": float(_kl(ps, pt).mean() * T**2),
        "It looks like the temperature is applied to the teacher only: soften the student's "
        "logits with the same T.": float(_kl(pt, s1).mean() * T**2),
        "It looks like the temperature is applied to the student only: soften the teacher's "
        "logits with the same T.": float(_kl(t1, ps).mean() * T**2),
        "It looks like you summed over the batch: average over the examples (the "
        "'batchmean' reduction).": float(fwd.sum() * T**2),
        "It looks like you averaged over the classes as well (reduction='mean'): sum over "
        "classes, average over examples ('batchmean').": float(fwd.mean() * T**2 / s.shape[-1]),
        "It looks like you divided by T^2 instead of multiplying.": float(fwd.mean() / T**2),
        "It looks like you multiplied by T, not T^2.": float(fwd.mean() * T),
        "It looks like the result is the cross-entropy with the soft targets, not the KL: "
        "subtract the teacher's entropy (or use p_t * (log p_t - log p_s)).":
            float(-(pt.exp() * ps).sum(-1).mean() * T**2),
    }
    return mistakes


def check_kd_loss(fn: Callable[..., Tensor]) -> CheckResult:
    """Exercise 1.2: ``fn(student_logits, teacher_logits, temperature)`` is Hinton's loss."""

    def cases(fn: Callable[..., Tensor]) -> None:
        s, t = _LOGITS.clone(), _TEACHER.clone()
        for T in (1.0, 3.0):
            got = _scalar(fn(s, t, T), f"kd_loss(student, teacher, T={T:g})")
            expected = float(kd_loss(s, t, T))
            _diagnose(got, expected, _kd_mistakes(s, t, T), f"kd_loss at T = {T:g}")
        expect(torch.equal(s, _LOGITS) and torch.equal(t, _TEACHER),
               "your function changed its inputs in place; compute on new tensors.")

        same = _scalar(fn(t, t.clone(), 3.0), "kd_loss(teacher, teacher, T=3)")
        expect(abs(same) < 1e-6, f"when the student's logits equal the teacher's the loss "
               f"should be 0 (KL of a distribution with itself), got {same:.3g}.")
        shifted = _scalar(fn(t + 7.0, t, 3.0), "kd_loss(teacher + 7, teacher, T=3)")
        expect(abs(shifted) < 1e-5, "adding the same constant to every logit of a row does not "
               f"change the softmax, so the loss should stay 0; got {shifted:.3g}.")

        # Direction: a confident teacher and a flat student give very different KLs.
        p = torch.tensor([[6.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        q = torch.zeros(1, 4, dtype=torch.float64)
        got = _scalar(fn(q, p, 1.0), "kd_loss(flat student, confident teacher, T=1)")
        _diagnose(got, float(kd_loss(q, p, 1.0)), _kd_mistakes(q, p, 1.0),
                  "KL direction with a confident teacher and a flat student")

        # Gradient: it must reach the student, match the reference, and keep its size with T.
        norms = {}
        for T in (10.0, 20.0):
            st = s.clone().requires_grad_(True)
            loss = fn(st, t, T)
            expect(isinstance(loss, Tensor) and loss.requires_grad,
                   "the loss does not depend on student_logits through autograd: do not "
                   "call .item(), .detach() or .numpy() on the student's side.")
            loss.backward()
            expect(st.grad is not None, "no gradient reached student_logits.")
            ref = s.clone().requires_grad_(True)
            kd_loss(ref, t, T).backward()
            expect_close(st.grad, ref.grad, f"the gradient with respect to student_logits at "
                         f"T = {T:g}", atol=1e-7)
            norms[T] = float(st.grad.norm())
        ratio = norms[20.0] / norms[10.0]
        expect(0.7 < ratio < 1.3, f"doubling T from 10 to 20 changed the gradient's size by "
               f"x{ratio:.2f}; with the T^2 factor it should stay about the same.")

    return run_check("1.2", "kd_loss", fn, cases,
                     success="all checks passed: forward KL under the teacher, batch-averaged, "
                             "scaled by T^2.")


# ---------------------------------------------------------------- Exercise 1.3

def check_distillation_loss(fn: Callable[..., Tensor]) -> CheckResult:
    """Exercise 1.3: ``fn(student_logits, teacher_logits, labels, temperature, alpha)``."""

    def cases(fn: Callable[..., Tensor]) -> None:
        s, t, y = _LOGITS.clone(), _TEACHER.clone(), _LABELS.clone()
        T = 3.0
        ce = float(F.cross_entropy(s, y))
        kd = float(kd_loss(s, t, T))
        got0 = _scalar(fn(s, t, y, T, 0.0), "distillation_loss(..., alpha=0)")
        got1 = _scalar(fn(s, t, y, T, 1.0), "distillation_loss(..., alpha=1)")
        if _close(got0, kd) and _close(got1, ce):
            expect(False, "alpha is the weight of the soft-target (KD) loss: alpha = 1 should "
                   "give kd_loss only and alpha = 0 the cross-entropy only. Yours is the other "
                   "way round.")
        ce_soft = float(F.cross_entropy(s / T, y))
        _diagnose(got0, ce, {
            "The hard-label cross-entropy uses the student's logits at temperature 1, not "
            "divided by T (Hinton et al. 2015, section 2).": ce_soft,
            "The hard-label term looks summed over the batch: average it (F.cross_entropy's "
            "default).": ce * len(y),
            "With alpha = 0 your loss is 0: the hard-label term should be weighted by "
            "1 - alpha, not alpha.": 0.0,
        }, "with alpha = 0 (cross-entropy only)")
        mistakes1 = {hint.replace("It looks like", "In the soft-target term it looks like"): v
                     for hint, v in _kd_mistakes(s, t, T).items()}
        _diagnose(got1, kd, mistakes1, "with alpha = 1 (soft-target loss only)")

        a = 0.3
        got = _scalar(fn(s, t, y, T, a), "distillation_loss(..., alpha=0.3)")
        _diagnose(got, a * kd + (1 - a) * ce, {
            "alpha looks swapped: the soft-target term gets alpha, the hard-label term "
            "1 - alpha.": (1 - a) * kd + a * ce,
            "The two terms look added without the weights: alpha * kd + (1 - alpha) * ce.":
                kd + ce,
            "It looks like the hard-label term uses alpha too: use (1 - alpha) for it.":
                a * kd + a * ce,
        }, "with alpha = 0.3")

        st = s.clone().requires_grad_(True)
        loss = fn(st, t, y, T, 0.5)
        expect(isinstance(loss, Tensor) and loss.requires_grad,
               "the loss does not depend on student_logits through autograd.")
        loss.backward()
        ref = s.clone().requires_grad_(True)
        distillation_loss(ref, t, y, T, 0.5).backward()
        expect(st.grad is not None, "no gradient reached student_logits.")
        expect_close(st.grad, ref.grad, "the gradient with respect to student_logits",
                     atol=1e-7)

    return run_check("1.3", "distillation_loss", fn, cases,
                     success="all checks passed: alpha * KD(T) + (1 - alpha) * CE at T = 1.")


# ---------------------------------------------------------------- Exercise 1.4

def _bias_case() -> tuple[Tensor, Tensor]:
    """Logits of 60 examples, 3 classes, where class 2 is under-predicted by about 2.5.

    Class 2 is missed whenever its logit is low; raising it too far makes false alarms on
    the other classes, so the best bias is a finite positive number.
    """
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(20)  # (60,)
    logits = torch.randn(60, 3, generator=g) * 0.8
    logits[torch.arange(60), labels] += 2.0  # each example prefers its class ...
    logits[:, 2] -= 2.5  # ... except that class 2 was never seen in the transfer set
    return logits, labels


def check_fit_class_bias(fn: Callable[..., Any]) -> CheckResult:
    """Exercise 1.4: ``fn(logits, labels, class_index, candidates) -> (bias, errors)``."""

    def cases(fn: Callable[..., Any]) -> None:
        logits, labels = _bias_case()
        before = logits.clone()
        candidates = [round(-4.0 + 0.25 * i, 2) for i in range(41)]  # -4 .. 6
        out = fn(logits, labels, 2, candidates)
        expect(torch.equal(logits, before), "your function changed the logits in place: add "
               "the bias to a copy (logits + shift, or logits.clone()).")
        expect(isinstance(out, tuple) and len(out) == 2,
               f"return a tuple (bias, errors), got {type(out).__name__}.")
        bias, errors = out
        exp_bias, exp_errors = fit_class_bias(logits, labels, 2, candidates)
        errors_at = {b: int((add_class_bias(logits, 2, b).argmax(-1) != labels).sum())
                     for b in candidates}
        expect(float(bias) in errors_at, f"the bias you return ({bias}) is not one of the "
               "candidates.")
        if _close(float(bias), -exp_bias) and exp_bias != 0:
            expect(False, f"you returned bias {float(bias):g} but {exp_bias:g} is best: the sign "
                   "is flipped. Add the bias to the class's logit (logits[:, c] + bias), so a "
                   "positive bias makes the class more likely.")
        per_class = {b: int((add_class_bias(logits, 2, b)[labels == 2].argmax(-1) != 2).sum())
                     for b in candidates}
        best_class_only = min(candidates, key=lambda b: (per_class[b], abs(b)))
        if _close(float(bias), best_class_only) and not _close(float(bias), exp_bias):
            expect(False, "you picked the bias that minimises errors on that class alone; "
                   "count errors over all classes (a large bias turns other digits into "
                   "false alarms).")
        expect(int(errors) == errors_at[float(bias)],
               f"you report {errors} errors for bias {float(bias):g}, but it makes "
               f"{errors_at[float(bias)]} (count argmax != label over all examples).")
        expect(errors_at[float(bias)] == exp_errors,
               f"bias {float(bias):g} makes {errors_at[float(bias)]} errors, but bias "
               f"{exp_bias:g} makes only {exp_errors}: keep the candidate with the fewest "
               "errors.")
        expect(_close(float(bias), exp_bias),
               f"several candidates make {exp_errors} errors; return the one with the "
               f"smallest |bias| ({exp_bias:g}), not {float(bias):g}.")

        # Nothing to correct: logits already right everywhere, so the answer is bias 0.
        clean = torch.nn.functional.one_hot(labels, 3).double() * 5.0
        b0, e0 = fn(clean, labels, 2, [-1.0, 0.0, 1.0])
        expect(float(b0) == 0.0 and int(e0) == 0,
               f"with logits that are already right, bias 0 makes 0 errors and should be "
               f"chosen (ties go to the smallest |bias|); got ({b0}, {e0}).")

    return run_check("1.4", "fit_class_bias", fn, cases,
                     success="all checks passed: the bias is added to the right class, "
                             "errors are counted over all classes.")
