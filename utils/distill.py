"""Knowledge-distillation losses, written by hand so each line can be read.

Lesson 01 (distillation theory) introduces the classification losses of Hinton, Vinyals and
Dean (2015), "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531):

- :func:`softmax_with_temperature` and :func:`log_softmax_with_temperature`;
- :func:`kd_loss`, the soft-target loss ``T^2 * KL(teacher_T || student_T)``;
- :func:`distillation_loss`, the ``alpha`` mix of the soft-target loss and cross-entropy on
  the hard labels;
- :func:`add_class_bias` and :func:`fit_class_bias`, the logit-bias correction of the
  omitted-class experiment (Hinton et al. 2015, section 3).

Every loss takes logits of shape ``(..., C)``: the class (or vocabulary) axis is last and
the loss is averaged over all leading positions, so a ``(B, C)`` batch of images and a
``(B, T, V)`` batch of tokens use the same code. Token-level losses for language models
(masks, reverse KL, ...) are added below by the later lessons.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "add_class_bias",
    "distillation_loss",
    "fit_class_bias",
    "kd_loss",
    "kl_divergence",
    "log_softmax_with_temperature",
    "softmax_with_temperature",
]


# --------------------------------------------------------------------------------------
# Lesson 01: soft targets, the KD loss and the alpha mix (classification)
# --------------------------------------------------------------------------------------

def _check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}") from None
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(
            f"temperature must be a positive finite number, got {temperature!r}: T = 1 is the "
            "ordinary softmax, T > 1 softens the distribution."
        )
    return t


def _check_logits(logits: Tensor, name: str) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., C), got "
                        f"{type(logits).__name__}; wrap it with torch.as_tensor(...).")
    if logits.ndim == 0:
        raise ValueError(f"{name} must have a class axis (shape (..., C)), got a scalar.")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}; use .float().")


def softmax_with_temperature(logits: Tensor, temperature: float = 1.0, dim: int = -1) -> Tensor:
    """``softmax(logits / T)`` along ``dim``, computed stably.

    Subtracting the row maximum before ``exp`` changes nothing mathematically (it cancels
    in the ratio) but keeps ``exp`` from overflowing on large logits. Hinton et al. (2015),
    eq. (1); introduced in lesson 01.
    """
    _check_logits(logits, "logits")
    z = logits / _check_temperature(temperature)
    z = z - z.amax(dim=dim, keepdim=True)  # largest entry becomes 0: exp(z) <= 1
    e = z.exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax_with_temperature(logits: Tensor, temperature: float = 1.0,
                                 dim: int = -1) -> Tensor:
    """``log softmax(logits / T)`` along ``dim`` (stable: ``z - logsumexp(z)``). Lesson 01."""
    _check_logits(logits, "logits")
    z = logits / _check_temperature(temperature)
    return z - torch.logsumexp(z, dim=dim, keepdim=True)


def kl_divergence(p_log: Tensor, q_log: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last axis, from log-probs.

    Returns one value per leading position, shape ``(...)``. Note the order: the first
    argument is the distribution the expectation is taken under. Lesson 01.
    """
    p = p_log.exp()
    return (p * (p_log - q_log)).sum(dim=-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton et al. (2015) soft-target loss: ``T^2 * KL(teacher_T || student_T)``.

    ``teacher_T = softmax(teacher_logits / T)`` and ``student_T = softmax(student_logits / T)``,
    both over the last axis of shape ``(..., C)``. The KL is *forward*: the teacher is the
    target distribution and the expectation is under it, so minimising it over the student
    is cross-entropy with soft targets minus the teacher's (constant) entropy. It is
    averaged over the leading positions (``reduction="batchmean"`` for ``(B, C)``).

    The ``T^2`` factor keeps the gradient's size roughly independent of ``T``: the gradient
    of the KL with respect to a student logit is ``(q_i - p_i) / T``, and for large ``T``
    ``q_i - p_i`` itself shrinks like ``1/T``. Pass teacher logits computed without
    gradient (``torch.no_grad()`` or ``.detach()``). Introduced in lesson 01.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., C)."
        )
    t = _check_temperature(temperature)
    teacher_log = log_softmax_with_temperature(teacher_logits, t)  # (..., C) log p
    student_log = log_softmax_with_temperature(student_logits, t)  # (..., C) log q
    return kl_divergence(teacher_log, student_log).mean() * t**2


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      temperature: float = 1.0, alpha: float = 0.5) -> Tensor:
    """``alpha * kd_loss(T) + (1 - alpha) * cross_entropy(student_logits, labels)``.

    The hard-label term uses the student's logits at temperature 1 (Hinton et al. 2015,
    section 2: "the second objective ... using exactly the same logits in the softmax of the
    distilled model but at a temperature of 1"). ``alpha = 1`` is pure distillation,
    ``alpha = 0`` ordinary training. ``labels`` are class indices of shape ``(...)``.
    Introduced in lesson 01.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the soft-target loss), "
                         f"got {alpha}.")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of student_logits without "
            f"its class axis, {tuple(student_logits.shape[:-1])}."
        )
    soft = kd_loss(student_logits, teacher_logits, temperature)
    hard = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]),
                           labels.reshape(-1))
    return alpha * soft + (1.0 - alpha) * hard


def add_class_bias(logits: Tensor, class_index: int, bias: float) -> Tensor:
    """A copy of ``logits`` (..., C) with ``bias`` added to class ``class_index``.

    A positive ``bias`` raises that class's probability for every input: the correction
    Hinton et al. (2015, section 3) apply to a student that never saw the class in its
    transfer set. The input is not modified. Introduced in lesson 01.
    """
    _check_logits(logits, "logits")
    n_classes = logits.shape[-1]
    if not -n_classes <= int(class_index) < n_classes:
        raise IndexError(f"class_index {class_index} is out of range for {n_classes} classes.")
    shift = torch.zeros(n_classes, dtype=logits.dtype, device=logits.device)
    shift[int(class_index)] = float(bias)
    return logits + shift  # broadcasts over the leading axes; a new tensor


def fit_class_bias(logits: Tensor, labels: Tensor, class_index: int,
                   candidates: Iterable[float]) -> tuple[float, int]:
    """The candidate bias for ``class_index`` that makes the fewest errors overall.

    Errors are counted over *all* classes (raising one class's logit trades its misses for
    false alarms on the others), on held-out labelled data, never on the test set. Ties go
    to the smallest ``|bias|``. Returns ``(bias, errors)``. Introduced in lesson 01.
    """
    best: tuple[int, float, float] | None = None
    for b in candidates:
        b = float(b)
        errors = int((add_class_bias(logits, class_index, b).argmax(dim=-1) != labels).sum())
        key = (errors, abs(b), b)
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError("candidates is empty: pass e.g. torch.linspace(0, 10, 101).tolist().")
    return best[2], best[0]
