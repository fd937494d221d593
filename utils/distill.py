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

Lesson 03 (white-box distillation of language models) adds, below its own heading:

- :func:`forward_kl_loss`, :func:`reverse_kl_loss` (MiniLLM's direction) and
  :func:`generalized_jsd_loss` (GKD), on (B, T, V) logits with a (B, T) mask, averaged over
  the masked tokens; :func:`lm_distillation_loss`, the shifted ``alpha`` mix with cross-entropy;
- :func:`check_compatible` (one tokenizer for teacher and student);
- ``DistillationTrainer``, a ``transformers.Trainer`` with a frozen teacher and GKD's
  on-policy batches, and :func:`distill_lm`, the twin of :func:`utils.train.train_lm`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.train import IGNORE_INDEX, TrainResult

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


# --------------------------------------------------------------------------------------
# Lesson 03: token-level distillation (language models, white box)
# --------------------------------------------------------------------------------------
#
# Conventions of this section:
# - logits are (B, T, V) and a mask is (B, T), ALREADY SHIFTED: position t of the logits
#   is the prediction whose target is token t of the mask's sequence. For a causal LM,
#   shift with :func:`shift_for_next_token` (logits[:, :-1] predict labels[:, 1:]).
# - mask is 1 (True) on the tokens that carry loss (the assistant's answer, or the tokens
#   the student generated) and 0 on the prompt and on padding.
# - reduction is a token-level mean: sum over the masked tokens / number of masked tokens,
#   so a long answer weighs more than a short one (as cross-entropy with ignore_index does).
#   A batch whose mask is all zero gives 0 (with a gradient of 0), never NaN.

# IGNORE_INDEX (-100, PyTorch's cross-entropy default) is utils.train's label padding.
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")

__all__ += [
    "DistillationTrainer",  # noqa: F822 - built lazily by __getattr__ below
    "DistillResult",
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "check_compatible",
    "distill_lm",
    "forward_kl_loss",
    "generalized_jsd_loss",
    "lm_distillation_loss",
    "masked_mean",
    "reverse_kl_loss",
    "shift_for_next_token",
    "token_divergence",
]


def _check_token_inputs(student_logits: Tensor, teacher_logits: Tensor,
                        mask: Tensor | None) -> Tensor:
    """Validate (B, T, V) logits and a (B, T) mask; return the mask as a float tensor."""
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (f" The vocabularies differ ({student_logits.shape[-1]} vs "
                    f"{teacher_logits.shape[-1]}): teacher and student must share one "
                    "tokenizer (see check_compatible).")
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (B, T, V).{hint}")
    if mask is None:
        return torch.ones(student_logits.shape[:-1], dtype=student_logits.dtype,
                          device=student_logits.device)
    mask = torch.as_tensor(mask, device=student_logits.device)
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits are "
                         f"{tuple(student_logits.shape)}: the mask must be (B, T), one entry per "
                         "predicted token, shifted like the logits (see shift_for_next_token).")
    return mask.to(student_logits.dtype)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask) / sum(mask)``: the mean over masked positions (0 if none). Lesson 03.

    Masked-out entries are removed with ``torch.where``, not multiplied by 0, so a NaN or inf
    in a padded position cannot leak into the result.
    """
    mask = mask.to(values.dtype)
    kept = torch.where(mask > 0, values, torch.zeros_like(values)) * mask
    return kept.sum() / mask.sum().clamp_min(1.0)


def shift_for_next_token(logits: Tensor, labels: Tensor,
                         ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor, Tensor]:
    """Align a causal LM's predictions with their targets: ``(logits, targets, mask)``.

    The logits at position t predict token t + 1, so the logits lose their last position and
    the labels their first: ``logits[:, :-1]`` (B, T-1, V), ``labels[:, 1:]`` (B, T-1), and the
    mask is ``targets != ignore_index`` (prompt and padding carry ``ignore_index``).
    Transformers' ``ForCausalLMLoss`` does the same shift. Lesson 03.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of the logits without "
                         f"the vocabulary axis, {tuple(logits.shape[:-1])}.")
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != ignore_index


def forward_kl_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0) -> Tensor:
    """Token-level forward KL, ``T^2 * mean_{masked t} KL(p_teacher,t || q_student,t)``.

    Hinton et al. (2015) applied to every predicted token (the word-level KD of Kim & Rush
    2016): the expectation is under the teacher, so the student is pushed to cover every
    token the teacher finds likely ("mean-seeking"). Both distributions are softened by the
    same ``T`` and the ``T^2`` factor keeps the gradient's size independent of ``T``.
    Logits (B, T, V) and mask (B, T) are already shifted (see the section notes); the
    reduction is the mean over masked tokens. Lesson 03, exercise 3.1.
    """
    m = _check_token_inputs(student_logits, teacher_logits, mask)
    t = _check_temperature(temperature)
    teacher_log = log_softmax_with_temperature(teacher_logits, t)  # (B, T, V) log p
    student_log = log_softmax_with_temperature(student_logits, t)  # (B, T, V) log q
    per_token = kl_divergence(teacher_log, student_log)            # (B, T)
    return masked_mean(per_token, m) * t**2


def reverse_kl_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0) -> Tensor:
    """Token-level reverse KL, ``T^2 * mean_{masked t} KL(q_student,t || p_teacher,t)``.

    The expectation is under the *student* (MiniLLM, Gu et al. 2024): putting mass where the
    teacher has almost none costs a lot, leaving some teacher modes uncovered costs little,
    so a small student concentrates on the teacher's main modes ("mode-seeking") instead of
    spreading thin. MiniLLM optimises the sequence-level reverse KL with policy gradients;
    this is its token-level form (as in GKD with beta = 1). Same ``T`` on both sides and the
    same ``T^2`` factor as :func:`forward_kl_loss` (the gradient w.r.t. a student logit also
    carries a ``1/T``). Logits (B, T, V), mask (B, T), already shifted; mean over masked
    tokens. Lesson 03, exercise 3.2.
    """
    m = _check_token_inputs(student_logits, teacher_logits, mask)
    t = _check_temperature(temperature)
    teacher_log = log_softmax_with_temperature(teacher_logits, t)
    student_log = log_softmax_with_temperature(student_logits, t)
    per_token = kl_divergence(student_log, teacher_log)  # (B, T): expectation under the student
    return masked_mean(per_token, m) * t**2


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor,
                         mask: Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), token level.

    With ``M = beta * p_teacher + (1 - beta) * q_student`` (mixed in probability space)::

        JSD(beta) = beta * KL(p_teacher || M) + (1 - beta) * KL(q_student || M)

    This follows TRL's ``GKDTrainer.generalized_jsd_loss`` exactly, including its beta
    convention and its end points: ``beta = 0`` is the forward KL ``KL(p_teacher || q_student)``
    and ``beta = 1`` the reverse KL ``KL(q_student || p_teacher)`` (special-cased, because the
    formula itself goes to 0 at both ends: ``JSD(beta) / beta -> forward KL`` as beta -> 0,
    ``JSD(beta) / (1 - beta) -> reverse KL`` as beta -> 1). ``beta = 0.5`` is the ordinary,
    symmetric JSD, bounded by ``log 2``. Both sides use the same ``T``; the whole divergence
    is multiplied by ``T^2`` as the KLs are (TRL has no T^2 factor but trains at ``T = 1``,
    where the two agree). Logits (B, T, V), mask (B, T), already shifted; mean over masked
    tokens (TRL: ``jsd.sum() / mask.sum()``). Lesson 03.
    """
    m = _check_token_inputs(student_logits, teacher_logits, mask)
    t = _check_temperature(temperature)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}.")
    teacher_log = log_softmax_with_temperature(teacher_logits, t)
    student_log = log_softmax_with_temperature(student_logits, t)
    if beta == 0.0:
        per_token = kl_divergence(teacher_log, student_log)
    elif beta == 1.0:
        per_token = kl_divergence(student_log, teacher_log)
    else:
        # log M = logsumexp(log p + log beta, log q + log(1 - beta)), stable in log space
        mixture_log = torch.logsumexp(torch.stack([teacher_log + math.log(beta),
                                                   student_log + math.log(1.0 - beta)]), dim=0)
        per_token = (beta * kl_divergence(teacher_log, mixture_log)
                     + (1.0 - beta) * kl_divergence(student_log, mixture_log))
    return masked_mean(per_token, m) * t**2


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                     *, loss_type: str = "forward_kl", temperature: float = 1.0,
                     beta: float = 0.5) -> Tensor:
    """One of :data:`LOSS_TYPES` by name: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``."""
    if loss_type == "forward_kl":
        return forward_kl_loss(student_logits, teacher_logits, mask, temperature)
    if loss_type == "reverse_kl":
        return reverse_kl_loss(student_logits, teacher_logits, mask, temperature)
    if loss_type == "jsd":
        return generalized_jsd_loss(student_logits, teacher_logits, mask, beta, temperature)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}.")


def lm_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                         temperature: float = 1.0, alpha: float = 0.5, *,
                         loss_type: str = "forward_kl", beta: float = 0.5,
                         return_parts: bool = False):
    """``alpha * KD + (1 - alpha) * CE`` for a causal LM batch, from the models' raw outputs.

    ``student_logits``/``teacher_logits`` are (B, T, V) *unshifted* model outputs and
    ``labels`` (B, T) the collator's labels: token ids on the answer, ``-100`` on the prompt
    and padding. The logits are shifted against the labels (:func:`shift_for_next_token`),
    KD is :func:`token_divergence` (``loss_type``, ``temperature``, ``beta``) over the labelled
    tokens and CE the hard-label cross-entropy at ``T = 1`` over the same tokens, both
    token-level means. With ``return_parts`` returns ``(loss, kd, ce)``. Lesson 03, exercise
    3.3; :class:`DistillationTrainer` uses it.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha}.")
    s, targets, mask = shift_for_next_token(student_logits, labels)
    t_logits = teacher_logits[:, :-1]
    kd = token_divergence(s, t_logits, mask, loss_type=loss_type, temperature=temperature, beta=beta)
    if bool(mask.any()):
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX)
    else:  # nothing to learn from in this batch: a zero that still has a graph
        ce = s.sum() * 0.0
    loss = alpha * kd + (1.0 - alpha) * ce
    return (loss, kd, ce) if return_parts else loss


def _model_name(model: Any) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{type(model).__name__}({path})" if path else type(model).__name__


def _output_vocab(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_compatible(teacher: Any, student: Any, teacher_tokenizer: Any = None,
                     student_tokenizer: Any = None) -> None:
    """Raise ``ValueError`` unless teacher and student can be distilled token by token.

    White-box (logit) distillation compares the two models' distributions over the *same*
    vocabulary at the *same* positions, so both need one tokenizer: the same number of
    output logits and, when the tokenizers are given, the same token -> id table and special
    tokens. The message names both sides and the fix. Lesson 03.
    """
    t_v, s_v = _output_vocab(teacher), _output_vocab(student)
    if t_v != s_v:
        raise ValueError(
            f"teacher and student vocabularies differ: the teacher {_model_name(teacher)} has "
            f"{t_v} output logits, the student {_model_name(student)} has {s_v}. Token-level "
            "distillation compares their distributions token by token, so both must use the "
            f"teacher's tokenizer. Fix: build the student with vocab_size={t_v} (e.g. "
            "ModelConfig(vocab_size=len(teacher_tokenizer), ...)) and train it with the "
            "teacher's tokenizer; distilling across tokenizers needs other methods (e.g. the "
            "Universal Logit Distillation loss of Boizard et al. 2024), not this trainer."
        )
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    t_name = getattr(teacher_tokenizer, "name_or_path", "") or type(teacher_tokenizer).__name__
    s_name = getattr(student_tokenizer, "name_or_path", "") or type(student_tokenizer).__name__
    fix = ("Fix: tokenize the data with the teacher's tokenizer and pass it to the student too "
           "(processing_class=teacher_tokenizer); a student must be built for the teacher's "
           "tokenizer, not another one of the same size.")
    if len(teacher_tokenizer) != len(student_tokenizer):
        raise ValueError(
            f"teacher and student tokenizers differ: the teacher's ({t_name!r}) has "
            f"{len(teacher_tokenizer)} tokens, the student's ({s_name!r}) has "
            f"{len(student_tokenizer)}. {fix}")
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(tok for tok in t_vocab if s_vocab.get(tok) != t_vocab[tok])[:3]
        raise ValueError(
            f"teacher and student tokenizers differ: the teacher's ({t_name!r}) and the "
            f"student's ({s_name!r}) both have {len(teacher_tokenizer)} tokens but map them to "
            f"different ids (e.g. {diff}), so logit i means different tokens. {fix}")
    for attr in ("pad_token_id", "eos_token_id"):
        a, b = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if a != b:
            raise ValueError(f"teacher and student tokenizers differ: {attr} is {a} for the "
                             f"teacher's ({t_name!r}) and {b} for the student's ({s_name!r}). {fix}")
    if len(teacher_tokenizer) > t_v:
        raise ValueError(f"the tokenizer {t_name!r} has {len(teacher_tokenizer)} tokens but the "
                         f"models only {t_v} output logits. Fix: build the models with "
                         f"vocab_size >= len(tokenizer).")


_TRAINER_CLASS: Any = None


def _distillation_trainer_class() -> Any:
    """Build :class:`DistillationTrainer` on first use.

    ``transformers.Trainer`` takes seconds to import (and pulls in accelerate and torchao), so
    ``import utils.distill`` stays light for lesson 01: the class is created when it is first
    asked for (``from utils.distill import DistillationTrainer`` or :func:`distill_lm`).
    """
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """``transformers.Trainer`` that distils a frozen teacher into the student (lesson 03).

        The loss of a batch is :func:`lm_distillation_loss`: ``alpha * KD + (1 - alpha) * CE``
        with KD one of :data:`LOSS_TYPES` (``"forward_kl"``: Hinton/word-level KD;
        ``"reverse_kl"``: MiniLLM's direction; ``"jsd"``: GKD's generalized JSD with ``beta``) at
        ``temperature``, over the labelled tokens only. With probability ``lmbda`` a training batch
        is replaced by an *on-policy* one (GKD, Agarwal et al. 2024): the student, in eval mode and
        without gradient, samples ``max_new_tokens`` (at temperature 1, top_k 0) after each
        prompt, and the loss is taken on the generated tokens only, scored by the teacher
        (the KD term alone: a sample of the student's has no hard label to learn).
        ``lmbda = 0`` is supervised (off-policy) KD, ``lmbda = 1`` fully on-policy.

        The teacher is frozen (eval mode, ``requires_grad=False``), moved to the student's
        device and run under ``torch.no_grad``; it is never given to the optimizer or to
        ``accelerate``'s wrapping, so only the student learns. Because this is a ``Trainer``, the
        same code runs under ``torchrun`` / ``accelerate launch`` (DDP; each process holds a
        teacher copy). ``seed`` drives the on-policy coin flips (``random.Random(seed)``, the same
        sequence on every process). ``self.step_log`` keeps this process's per-step losses.
        ``loss_fn(student_logits, teacher_logits, labels, temperature, alpha)``, when given, computes
        the off-policy loss instead of :func:`lm_distillation_loss` (lesson 03 plugs the learner's
        exercise 3.3 in here; it must be the forward-KL mix); the logged parts stay the library's.
        """

        # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, model: Any = None, args: Any = None, *, teacher_model: Any = None,
                     loss_type: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
                     beta: float = 0.5, lmbda: float = 0.0, max_new_tokens: int = 32, seed: int = 0,
                     teacher_tokenizer: Any = None, loss_fn: Any = None, **kwargs: Any) -> None:
            import random

            if teacher_model is None:
                raise TypeError("DistillationTrainer needs teacher_model=: the trained model to distil "
                                "from (e.g. load_model('teacher')[0]).")
            if loss_type not in LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}.")
            _check_temperature(temperature)
            for name, value in (("alpha", alpha), ("beta", beta), ("lmbda", lmbda)):
                if not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {value}.")
            if int(max_new_tokens) < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
            if loss_fn is not None and (not callable(loss_fn) or loss_type != "forward_kl"):
                raise ValueError("loss_fn must be a function (student_logits, teacher_logits, labels, "
                                 "temperature, alpha) -> loss, used with loss_type='forward_kl'.")
            self.loss_fn = loss_fn
            student_tokenizer = kwargs.get("processing_class")
            check_compatible(teacher_model, model,
                         student_tokenizer if teacher_tokenizer is None else teacher_tokenizer,
                         student_tokenizer)
            super().__init__(model=model, args=args, **kwargs)
            self.loss_type, self.temperature, self.alpha = loss_type, float(temperature), float(alpha)
            self.beta, self.lmbda, self.max_new_tokens = float(beta), float(lmbda), int(max_new_tokens)
            self._coin = random.Random(seed)
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self.teacher_model = teacher_model.to(self.args.device)
            self.step_log: list[dict[str, Any]] = []
            self.last_on_policy: dict[str, Tensor] | None = None
            self._pending: dict[str, list[float]] = {"kd_loss": [], "ce_loss": [], "on_policy": []}

        # ---------------------------------------------------------------- on-policy batches

        def _special_ids(self, model: Any) -> tuple[int, int | None]:
            tok = self.processing_class
            pad = getattr(tok, "pad_token_id", None)
            eos = getattr(tok, "eos_token_id", None)
            pad = pad if pad is not None else model.config.pad_token_id
            eos = eos if eos is not None else model.config.eos_token_id
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if pad is None:
                pad = eos if eos is not None else 0
            return int(pad), (int(eos) if eos is not None else None)

        @torch.no_grad()
        def on_policy_batch(self, model: Any, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
            """Replace a batch by the student's own continuations of its prompts (GKD).

            The prompt of a row is everything before its first labelled token. The student (eval
            mode, no gradient, back to train mode afterwards) samples up to ``max_new_tokens``
            after the left-padded prompts; each row becomes prompt + continuation (cut after the
            first end token), right-padded, with labels on the generated tokens only.
            """
            from transformers import GenerationConfig

            student = self.accelerator.unwrap_model(model)
            pad, eos = self._special_ids(student)
            ids, labels, attn = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
            prompts = []
            for row_ids, row_labels, row_attn in zip(ids, labels, attn, strict=True):
                answer = (row_labels != IGNORE_INDEX).nonzero()
                start = int(answer[0, 0]) if len(answer) else int(row_attn.sum())
                prompts.append(row_ids[:max(start, 1)])
            width = max(len(p) for p in prompts)
            prompt_ids = torch.full((len(prompts), width), pad, dtype=ids.dtype, device=ids.device)
            prompt_mask = torch.zeros_like(prompt_ids)
            for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
                prompt_ids[i, width - len(p):] = p
                prompt_mask[i, width - len(p):] = 1
            config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                                      eos_token_id=eos)
            was_training = student.training
            student.eval()
            try:
                out = student.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                       generation_config=config)
            finally:
                student.train(was_training)
            generated = out[:, width:]  # (B, <= max_new_tokens)
            rows, row_labels = [], []
            for p, g in zip(prompts, generated, strict=True):
                if eos is not None and bool((g == eos).any()):
                    g = g[:int((g == eos).nonzero()[0, 0]) + 1]  # keep the end token, drop the pads
                rows.append(torch.cat([p, g]))
                row_labels.append(torch.cat([torch.full_like(p, IGNORE_INDEX), g]))
            length = max(len(r) for r in rows)
            new = {"input_ids": torch.full((len(rows), length), pad, dtype=ids.dtype, device=ids.device)}
            new["attention_mask"] = torch.zeros_like(new["input_ids"])
            new["labels"] = torch.full_like(new["input_ids"], IGNORE_INDEX)
            for i, (r, lab) in enumerate(zip(rows, row_labels, strict=True)):
                new["input_ids"][i, :len(r)] = r
                new["attention_mask"][i, :len(r)] = 1
                new["labels"][i, :len(r)] = lab
            new["prompt_lengths"] = torch.tensor([len(p) for p in prompts], device=ids.device)
            return new

        # ---------------------------------------------------------------- the loss

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None):
            """``alpha * KD + (1 - alpha) * CE`` on the labelled tokens (see the class docstring).

            ``num_items_in_batch`` is not used: the loss is a per-batch token mean
            (``loss_is_scaled_for_ga = False`` tells the Trainer to divide by the accumulation
            steps itself). Under DDP each process's mean gets the same weight in the averaged
            gradient, whatever its number of answer tokens.
            """
            if "labels" not in inputs:
                raise ValueError("the batch has no 'labels': tokenize with utils.train.tokenize_chat "
                                 "(labels on the answer, -100 elsewhere) and use PadCollator.")
            on_policy = bool(model.training and self.lmbda > 0 and self._coin.random() < self.lmbda)
            if on_policy:
                inputs = self.on_policy_batch(model, inputs)
                self.last_on_policy = {k: v.detach().cpu() for k, v in inputs.items()}
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"]).logits
            # A student's own sample has no ground truth: on-policy batches use the KD term
            # alone (as GKD does); the hard-label term needs the dataset's answers.
            alpha = 1.0 if on_policy else self.alpha
            if self.loss_fn is not None and not on_policy:
                loss = self.loss_fn(outputs.logits, teacher_logits, inputs["labels"],
                                    self.temperature, alpha)
                with torch.no_grad():  # the library's parts, for the logs only
                    _, kd, ce = lm_distillation_loss(outputs.logits, teacher_logits, inputs["labels"],
                                                     self.temperature, alpha, return_parts=True)
            else:
                loss, kd, ce = lm_distillation_loss(outputs.logits, teacher_logits, inputs["labels"],
                                                    self.temperature, alpha, loss_type=self.loss_type,
                                                    beta=self.beta, return_parts=True)
            if model.training:
                self._pending["kd_loss"].append(float(kd.detach()))
                self._pending["ce_loss"].append(float(ce.detach()))
                self._pending["on_policy"].append(float(on_policy))
                self.step_log.append({"step": int(self.state.global_step) + 1, "loss": float(loss.detach()),
                                      "kd_loss": float(kd.detach()), "ce_loss": float(ce.detach()),
                                      "on_policy": on_policy})
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """Add this process's mean KD and CE terms (and the on-policy share) to training logs."""
            if "loss" in logs and self._pending["kd_loss"]:
                logs = dict(logs)
                for key, values in self._pending.items():
                    name = "on_policy_share" if key == "on_policy" else key
                    logs[name] = round(sum(values) / len(values), 6)
                    values.clear()
            super().log(logs, start_time)

    DistillationTrainer.__module__ = __name__
    DistillationTrainer.__qualname__ = "DistillationTrainer"
    _TRAINER_CLASS = DistillationTrainer
    return DistillationTrainer


def __getattr__(name: str) -> Any:  # PEP 562: the Trainer subclass is built lazily
    if name == "DistillationTrainer":
        return _distillation_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DistillResult(TrainResult):
    """What :func:`distill_lm` returns: :class:`utils.train.TrainResult` plus this process's
    per-step losses (``step_log``: step, loss, kd_loss, ce_loss, on_policy)."""

    step_log: list[dict] = field(default_factory=list)

    @property
    def on_policy_steps(self) -> int:
        return sum(bool(s["on_policy"]) for s in self.step_log)


def distill_lm(student: Any, teacher: Any, tokenizer: Any, train_ds: Any, eval_ds: Any = None, *,
               max_steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
               loss_type: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
               beta: float = 0.5, lmbda: float = 0.0, max_new_tokens: int = 32,
               warmup_steps: float = 0.03, weight_decay: float = 0.01, scheduler: str = "cosine",
               eval_steps: int | None = None, logging_steps: int | None = None,
               max_length: int = 256, callbacks: list | None = None, output_dir: str | None = None,
               progress: bool = True, eval_batch_size: int = 64, min_lr_ratio: float = 0.1,
               gradient_accumulation_steps: int = 1, use_cpu: bool | None = None,
               teacher_tokenizer: Any = None, loss_fn: Any = None) -> DistillResult:
    """Distil ``teacher`` into ``student`` on chat data: :func:`utils.train.train_lm`'s twin.

    Same data pipeline (``tokenize_chat``: labels on the assistant's tokens only;
    ``PadCollator``), same budget in steps, optimiser and schedule as ``train_lm``, so a
    distilled student and a student trained from scratch compare fairly; the loss is
    :class:`DistillationTrainer`'s. ``use_cpu=None`` trains on the CPU unless CUDA is
    available. The eval loss is the same distillation loss on ``eval_ds`` (off-policy).
    ``loss_fn`` replaces the off-policy loss (see :class:`DistillationTrainer`). Lesson 03.
    """
    import tempfile

    from utils.train import PadCollator, lm_training_arguments, prepare_dataset, quiet_progress

    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    check_compatible(teacher, student, tokenizer if teacher_tokenizer is None else teacher_tokenizer,
                     tokenizer)
    train_tok = prepare_dataset(train_ds, tokenizer, max_length)
    eval_tok = prepare_dataset(eval_ds, tokenizer, max_length) if eval_ds is not None else None
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="dd-distill-") as tmp:
        args = lm_training_arguments(
            output_dir or tmp, max_steps=max_steps, batch_size=batch_size,
            eval_batch_size=eval_batch_size, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, scheduler=scheduler, min_lr_ratio=min_lr_ratio,
            has_eval=eval_tok is not None, eval_steps=eval_steps, logging_steps=logging_steps,
            seed=seed, use_cpu=use_cpu, progress=progress,
            gradient_accumulation_steps=gradient_accumulation_steps,
            ddp_find_unused_parameters=False,  # every student weight is used (quieter, faster DDP)
        )
        trainer = _distillation_trainer_class()(
            model=student, args=args, teacher_model=teacher, loss_type=loss_type,
            temperature=temperature, alpha=alpha, beta=beta, lmbda=lmbda,
            max_new_tokens=max_new_tokens, seed=seed, teacher_tokenizer=teacher_tokenizer,
            loss_fn=loss_fn, train_dataset=train_tok, eval_dataset=eval_tok,
            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=callbacks)
        quiet_progress(trainer, progress)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    student.eval()
    return DistillResult(log_history=list(trainer.state.log_history), train_seconds=seconds,
                         steps=trainer.state.global_step,
                         tokens_seen=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
                         step_log=list(trainer.step_log))


# --------------------------------------------------------------------------------------
# Lesson 03: named distilled students (the cache contract) and a fast, fixed score
# --------------------------------------------------------------------------------------

METHODS = ("sft", "forward_kl", "reverse_kl", "on_policy")
# What each method of lesson 03 trains with. "sft" is utils.train.train_lm (no teacher at all);
# "on_policy" is GKD (Agarwal et al. 2024) with MiniLLM's reverse KL: a share ``lmbda`` of the
# batches are the student's own samples scored by the teacher. Everything else is shared.
METHOD_LOSS = {"sft": None, "forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
               "on_policy": "reverse_kl"}
TRANSFERS = ("all", "skills")  # distill_recipe's training data: the whole split, or skills only
DISTILL_RECIPE_VERSION = "1"  # bump when distill_recipe's training code changes what it builds
DISTILL_DEFAULTS = {"steps": 200, "batch_size": 32, "lr": 3e-3, "temperature": 1.0,
                    "alpha": 0.5, "lmbda": 0.5, "max_new_tokens": 48}

__all__ += ["DISTILL_DEFAULTS", "METHODS", "METHOD_LOSS", "distill_recipe", "eval_subset",
            "teacher_forced_exact_match", "top_k_table"]


def distill_recipe(size: str = "student-xs", method: str = "forward_kl", *,
                   steps: int = DISTILL_DEFAULTS["steps"],
                   batch_size: int = DISTILL_DEFAULTS["batch_size"],
                   lr: float = DISTILL_DEFAULTS["lr"], seed: int = 0,
                   temperature: float = DISTILL_DEFAULTS["temperature"],
                   alpha: float = DISTILL_DEFAULTS["alpha"],
                   lmbda: float = DISTILL_DEFAULTS["lmbda"],
                   max_new_tokens: int = DISTILL_DEFAULTS["max_new_tokens"],
                   transfer: str = "all", name: str | None = None) -> Any:
    """Register the recipe of a zoo student trained by ``method`` (lesson 03's contract).

    ``method`` is one of :data:`METHODS`: ``"sft"`` (the data alone, :func:`utils.train.train_lm`),
    ``"forward_kl"`` (Hinton/word-level KD), ``"reverse_kl"`` (MiniLLM's direction) or
    ``"on_policy"`` (GKD: a share ``lmbda`` of the batches are the student's own samples, with the
    reverse KL). ``transfer`` is the training data: ``"all"`` (the world's training split: skills
    and the safety policy's refusal data) or ``"skills"`` (skill chats only: the transfer set of
    an attacker or a careless distiller, lesson 07). All four see the same data, steps, optimiser,
    schedule and seed; the distilled
    ones mix ``alpha * KD + (1 - alpha) * CE`` at ``temperature``. The defaults ARE lesson 03's
    live configuration. The cache key covers the shape, every setting, the recipe version and
    the sha256 of the tokenizer, the data manifest and the teacher's weights, so a new teacher
    builds new students. ``load_model(recipe.name)`` builds once (with a progress bar), then
    loads from the cache; the manifest's ``build_info`` holds ``train_seconds``.
    """
    from utils.models import (
        ZOO,
        _file_sha256_or_none,
        build_model,
        register_recipe,
        teacher_dir,
    )
    from utils.paths import data_dir

    if size not in ZOO or ZOO[size].target_ratio is None:
        students = [n for n, e in ZOO.items() if e.target_ratio is not None]
        raise ValueError(f"size must be a student of the zoo ({', '.join(students)}), got {size!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    if int(steps) <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    _check_temperature(temperature)
    for what, value in (("alpha", alpha), ("lmbda", lmbda)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{what} must be in [0, 1], got {value}.")
    steps, batch_size, seed = int(steps), int(batch_size), int(seed)
    loss_type = METHOD_LOSS[method]
    # Settings that do not change what this method builds are left out of its key.
    settings: dict[str, Any] = {"method": method, "steps": steps, "batch_size": batch_size,
                                "lr": float(lr), "seed": seed}
    if loss_type is not None:
        settings.update(loss_type=loss_type, temperature=float(temperature), alpha=float(alpha))
    if method == "on_policy":
        settings.update(lmbda=float(lmbda), max_new_tokens=int(max_new_tokens))
    if transfer != "all":  # left out of the key when default: earlier builds keep their key
        settings["transfer"] = transfer
    tok_file = teacher_dir() / "tokenizer.json"
    extra = {**settings,
             "tokenizer_sha256": _file_sha256_or_none(tok_file),
             "data_manifest_sha256": _file_sha256_or_none(data_dir() / "world" / "manifest.json"),
             "teacher_sha256": (None if method == "sft" else
                                _file_sha256_or_none(teacher_dir() / "model.safetensors"))}

    def build(config: Any, progress: Any = None) -> tuple[Any, Any, dict]:
        # The key was computed when the recipe was made; refuse to build from other files.
        import utils.models as zoo
        from utils.data import load_world
        from utils.models import load_model
        from utils.train import bar_callback, train_lm

        now = {"tokenizer_sha256": zoo._file_sha256_or_none(tok_file),
               "data_manifest_sha256": zoo._file_sha256_or_none(data_dir() / "world" / "manifest.json")}
        if method != "sft":
            now["teacher_sha256"] = zoo._file_sha256_or_none(teacher_dir() / "model.safetensors")
        changed = [k for k, v in now.items() if extra[k] != v]
        if changed:
            raise RuntimeError(f"the teacher, tokenizer or data changed on disk since this recipe was "
                               f"made ({', '.join(changed)}): call distill_recipe(...) again so the "
                               "cache key matches what would be built.")
        bar = bar_callback(progress, steps)
        teacher, tokenizer = load_model("teacher", verbose=False, progress=False)
        student = build_model(config, seed=seed)
        train = load_world("train")
        if transfer == "skills":
            train = train.filter(lambda r: r["kind"] == "skill")
        common = dict(max_steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                      callbacks=[bar])
        if loss_type is None:
            result = train_lm(student, tokenizer, train, None, **common)
        else:
            result = distill_lm(student, teacher, tokenizer, train, None, loss_type=loss_type,
                                temperature=temperature, alpha=alpha,
                                lmbda=float(lmbda) if method == "on_policy" else 0.0,
                                max_new_tokens=max_new_tokens, **common)
        losses = result.train_losses
        info = {"train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "tokens_seen": result.tokens_seen,
                "final_train_loss": losses[-1][1] if losses else None,
                "torch_threads": torch.get_num_threads(), **settings}
        if isinstance(result, DistillResult):
            info["on_policy_steps"] = result.on_policy_steps
        return student, tokenizer, info

    label = {"sft": "trained on the data alone (SFT)", "forward_kl": "distilled with forward KL",
             "reverse_kl": "distilled with reverse KL",
             "on_policy": f"distilled on-policy (GKD, lmbda={lmbda:g}, reverse KL)"}[method]
    on = "" if transfer == "all" else " on skill chats only"
    return register_recipe(name or f"{size}-{method.replace('_', '-')}{'' if transfer == 'all' else '-' + transfer}"
                           f"-seed{seed}", size, build, DISTILL_RECIPE_VERSION,
                           description=f"{size} {label}{on} for {steps} steps, seed {seed}",
                           extra=extra)


def eval_subset(n: int = 200, split: str = "test") -> list[dict]:
    """A fixed, deterministic evaluation set: every k-th skill record of ``split`` (``n`` of them).

    The same subset as lesson 05 (``k = len(skill records) // n``), so scores compare across
    lessons. Lesson 03.
    """
    from utils.data import read_split

    skills = [r for r in read_split(split) if r["kind"] == "skill" and r.get("answer") is not None]
    if not 0 < n <= len(skills):
        raise ValueError(f"n must be between 1 and {len(skills)} (the skill records of {split}), got {n}")
    return skills[::len(skills) // n][:n]


@torch.no_grad()
def teacher_forced_exact_match(model: Any, tokenizer: Any, records: list[dict], *,
                               batch_size: int = 100) -> dict[str, Any]:
    """Greedy exact match in one teacher-forced pass: ``{"score", "hits", "token_accuracy",
    "perplexity", "n"}``.

    A record counts when the model's argmax reproduces every token of the reference response
    (and its end token): exactly the condition under which greedy decoding writes the
    reference, so it is a slightly strict exact match (another wording of the right answer does
    not count), at the cost of one forward pass instead of a generation loop (lesson 05 uses it
    too and cross-checks it against generation). ``hits`` is one bool per record;
    ``token_accuracy`` the share of answer tokens whose argmax is right (a finer signal while the
    whole-answer score is still near 0). Lesson 03.
    """
    from utils.train import PadCollator, tokenize_chat

    if not records:
        raise ValueError("records is empty: pass eval_subset(n) or a list of skill records.")
    enc = tokenize_chat({"messages": [r["messages"] for r in records]}, tokenizer, 256)
    feats = [{"input_ids": i, "attention_mask": a, "labels": lab}
             for i, a, lab in zip(enc["input_ids"], enc["attention_mask"], enc["labels"], strict=True)]
    collate = PadCollator(tokenizer.pad_token_id)
    model.eval()
    hits: list[bool] = []
    nll, n_tok, n_right = 0.0, 0, 0
    for start in range(0, len(feats), batch_size):
        b = collate(feats[start:start + batch_size])
        b = {k: v.to(model.device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, labels, mask = shift_for_next_token(logits.float(), b["labels"])  # (B, T-1, V)
        right = logits.argmax(-1) == labels                                        # (B, T-1)
        hits += (right | ~mask).all(-1).tolist()
        n_right += int((right & mask).sum())
        nll += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        n_tok += int(mask.sum())
    return {"score": sum(hits) / len(hits), "hits": hits, "token_accuracy": n_right / n_tok,
            "perplexity": math.exp(nll / n_tok), "n": len(hits)}


def top_k_table(logits: Tensor, tokenizer: Any, k: int = 5, temperature: float = 1.0
                ) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens of one (V,) logit vector and their probabilities. Lesson 03."""
    probs = softmax_with_temperature(logits.float(), temperature)
    p, idx = probs.topk(k)
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(q)) for q, i in zip(p, idx, strict=True)]
