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
- :func:`top_k_table`, a next-token distribution as a table.

The ``transformers.Trainer`` that uses these losses is :mod:`utils.distill_trainer`; the
named students built with it are :mod:`utils.recipes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.train import IGNORE_INDEX

__all__ = [
    # lesson 01: classification
    "add_class_bias",
    "check_temperature",
    "distillation_loss",
    "fit_class_bias",
    "kd_loss",
    "kl_divergence",
    "log_softmax_with_temperature",
    "softmax_with_temperature",
    # lesson 03: language models
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "check_compatible",
    "forward_kl_loss",
    "generalized_jsd_loss",
    "lm_distillation_loss",
    "masked_mean",
    "reverse_kl_loss",
    "shift_for_next_token",
    "token_divergence",
    "top_k_table",
]


# --------------------------------------------------------------------------------------
# Lesson 01: soft targets, the KD loss and the alpha mix (classification)
# --------------------------------------------------------------------------------------

def check_temperature(temperature: float) -> float:
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
    z = logits / check_temperature(temperature)
    z = z - z.amax(dim=dim, keepdim=True)  # largest entry becomes 0: exp(z) <= 1
    e = z.exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax_with_temperature(logits: Tensor, temperature: float = 1.0,
                                 dim: int = -1) -> Tensor:
    """``log softmax(logits / T)`` along ``dim`` (stable: ``z - logsumexp(z)``). Lesson 01."""
    _check_logits(logits, "logits")
    z = logits / check_temperature(temperature)
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
    t = check_temperature(temperature)
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
    t = check_temperature(temperature)
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
    t = check_temperature(temperature)
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
    t = check_temperature(temperature)
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
        raise ValueError(f"alpha must be in [0, 1] (the weight of the distillation term), "
                         f"got {alpha}.")
    s, targets, mask = shift_for_next_token(student_logits, labels)
    t_logits = teacher_logits[:, :-1]
    kd = token_divergence(s, t_logits, mask, loss_type=loss_type, temperature=temperature,
                          beta=beta)
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
                             f"teacher's ({t_name!r}) and {b} for the student's ({s_name!r}). "
                             f"{fix}")
    if len(teacher_tokenizer) > t_v:
        raise ValueError(f"the tokenizer {t_name!r} has {len(teacher_tokenizer)} tokens but the "
                         f"models only {t_v} output logits. Fix: build the models with "
                         f"vocab_size >= len(tokenizer).")


def top_k_table(logits: Tensor, tokenizer: Any, k: int = 5, temperature: float = 1.0
                ) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens of one (V,) logit vector and their probabilities. Lesson 03."""
    probs = softmax_with_temperature(logits.float(), temperature)
    p, idx = probs.topk(k)
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(q))
            for q, i in zip(p, idx, strict=True)]
