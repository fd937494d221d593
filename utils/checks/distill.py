"""Checks for lesson 01 (distillation theory): known answers, invariants, friendly hints.

Each ``check_*`` runs the learner's function on small cases whose answers are known, tests
the invariants the lesson teaches (the KD loss is 0 when the student equals the teacher, its
gradient keeps its size as T grows thanks to T^2, the KL is taken under the teacher) and,
when a value is wrong, compares it with the classic mistakes to say *which* one it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.checks import CheckResult, close, diagnose, expect, expect_close, run_check
from utils.checks.experiment import Outcome, Setting, run_experiment
from utils.device import torch_threads
from utils.distill import (
    add_class_bias,
    distillation_loss,
    fit_class_bias,
    kd_loss,
    log_softmax_with_temperature,
)

__all__ = [
    "check_distillation_loss",
    "check_distillation_settings",
    "check_fit_class_bias",
    "check_kd_loss",
    "check_softmax_with_temperature",
    "small_transfer_experiment",
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


# ---------------------------------------------------------------- Exercise 1.5 (open experiment)
# Hinton et al. (2015, section 5): soft targets as a regulariser when the transfer set is small.
# The check trains the lesson's teacher on the full training split, then two students on only
# SMALL_TRANSFER_PER_CLASS images per digit: one on the labels alone, one with the learner's
# T and alpha. Same seeds, same initialisation and batches: the only difference is the loss.
SMALL_TRANSFER_SEEDS = (0, 1, 2)  # splits; each also seeds the models and batches
SMALL_TRANSFER_PER_CLASS = 10  # transfer-set images per digit (100 of about 1,000)
SMALL_TRANSFER_EPOCHS = 300  # passes over the 100 images (one Adam step each)
# The bar: test errors the distilled students save against the students alone, summed over the
# seeds (the students alone make 175). Measured on the course machine, 2026-12-05, over T in
# {1, 2, 4, 8, 20} x alpha in {0.5, 0.9, 1} (tests/test_checks_distill.py re-measures both
# ends): alpha = 0 saves 0 (it is the same training as alone), T = 1 saves 7-11, T = 2 40-42,
# T = 4 82-84, T = 8 and 20 91-93. The bar sits above T <= 2 and well below the best pairs.
SMALL_TRANSFER_BAR = 60
_TEACHER_HIDDEN, _TEACHER_DROPOUT, _STUDENT_HIDDEN = 256, 0.3, 128  # lesson 01's sizes


@functools.lru_cache(maxsize=len(SMALL_TRANSFER_SEEDS) + 2)
def _small_transfer_case(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """(x_small, y_small, teacher logits on x_small, x_test, y_test, errors of the student
    trained alone) for one seed; the teacher and the lone student are the same for every
    choice, so they are trained once per process."""
    from utils.digits import (
        TrainConfig,
        count_errors,
        load_digits_split,
        make_mlp,
        predict_logits,
        train_classifier,
    )

    split = load_digits_split(seed)
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it
        torch.manual_seed(seed)  # here, so the teacher is the same whatever ran before
        teacher = train_classifier(make_mlp(_TEACHER_HIDDEN, dropout=_TEACHER_DROPOUT, seed=seed),
                                   split.x_train, split.y_train,
                                   TrainConfig(epochs=100, batch_size=128, lr=1e-3), seed=seed)
    g = torch.Generator().manual_seed(seed)
    keep = torch.cat([torch.nonzero(split.y_train == d).flatten()[
        torch.randperm(int((split.y_train == d).sum()), generator=g)[:SMALL_TRANSFER_PER_CLASS]]
        for d in range(10)])  # (10 * per_class,) indices, stratified
    x_small, y_small = split.x_train[keep], split.y_train[keep]
    alone = train_classifier(make_mlp(_STUDENT_HIDDEN, seed=seed + 1000), x_small, y_small,
                             _small_student_config(), seed=seed)
    return (x_small, y_small, predict_logits(teacher, x_small), split.x_test, split.y_test,
            count_errors(predict_logits(alone, split.x_test), split.y_test))


def _small_student_config() -> Any:
    from utils.digits import TrainConfig

    return TrainConfig(epochs=SMALL_TRANSFER_EPOCHS, batch_size=128, lr=1e-3)


def small_transfer_experiment(temperature: float, alpha: float,
                              seeds: tuple[int, ...] = SMALL_TRANSFER_SEEDS) -> dict[str, Any]:
    """Exercise 1.5's experiment: test errors of students trained on 10 images per digit.

    Returns ``{"alone": [...], "distilled": [...], "saved": int}`` (per seed, and the errors
    the distilled students save in total). A few seconds; the teachers are trained once per
    process. Call it to try settings before you commit to a choice.
    """
    from utils.digits import count_errors, make_mlp, predict_logits, train_classifier

    temperature, alpha = float(temperature), float(alpha)
    if not temperature > 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got T = {temperature} "
                         f"and alpha = {alpha}")

    def objective(student_logits: Tensor, teacher_logits: Tensor | None,
                  labels: Tensor) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)

    alone, distilled = [], []
    with torch_threads(1):  # the same numbers in the notebook and in the tests
        for seed in seeds:
            x_small, y_small, soft, x_test, y_test, alone_errors = _small_transfer_case(seed)
            student = train_classifier(make_mlp(_STUDENT_HIDDEN, seed=seed + 1000), x_small,
                                       y_small, _small_student_config(), seed=seed,
                                       loss_fn=objective, teacher_logits=soft)
            alone.append(alone_errors)
            distilled.append(count_errors(predict_logits(student, x_test), y_test))
    return {"alone": alone, "distilled": distilled, "saved": sum(alone) - sum(distilled)}


_DISTILL_SETTINGS = (
    Setting("temperature", low=0.0, open_low=True, high=1000.0,
            meaning="the distillation temperature T"),
    Setting("alpha", low=0.0, high=1.0, meaning="the weight of the soft-target loss"),
)


def check_distillation_settings(fn: Callable[[], Any]) -> CheckResult:
    """Exercise 1.5: ``fn()`` returns ``{"temperature": T, "alpha": a}``; the distilled students
    on the small transfer set must save at least :data:`SMALL_TRANSFER_BAR` test errors."""

    def measure(choice: dict[str, Any]) -> Outcome:
        T, a = choice["temperature"], choice["alpha"]
        r = small_transfer_experiment(T, a)
        n_test = len(_small_transfer_case(SMALL_TRANSFER_SEEDS[0])[4])
        what = (f"T = {T:g}, alpha = {a:g}: over {len(SMALL_TRANSFER_SEEDS)} seeds the distilled "
                f"students made {sum(r['distilled'])} test errors (per seed {r['distilled']}), "
                f"the students alone {sum(r['alone'])} ({r['alone']}, of {n_test} each): "
                f"{r['saved']} saved; the bar is {SMALL_TRANSFER_BAR}")
        if r["saved"] >= SMALL_TRANSFER_BAR:
            return Outcome(True, what + " (met).")
        return Outcome(False, what + " (missed).",
                       "Look at what each knob does to the soft targets the student sees (the "
                       "slider of section 2, the dark-knowledge map of section 3) and how much "
                       "of the loss they get; try a few values with "
                       "small_transfer_experiment(T, alpha) and compare.")

    return run_experiment("1.5", "choose_distillation_settings", fn, _DISTILL_SETTINGS, measure)
