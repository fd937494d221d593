"""Lesson 03's ``transformers.Trainer`` for distilling a language model.

:class:`DistillationTrainer` subclasses ``transformers.Trainer`` and overrides
``compute_loss`` with :func:`utils.distill.lm_distillation_loss` against a frozen teacher,
plus GKD's on-policy batches (Agarwal et al. 2024). Because it is a ``Trainer``, the same code
runs under ``accelerate launch`` / ``torchrun`` (``scripts/distill_lm.py``). :func:`distill_lm`
is the twin of :func:`utils.train.train_lm`: same data pipeline, optimiser, schedule and budget,
so a distilled and a data-only student compare fairly.

Importing this module imports ``transformers.Trainer`` (a few seconds); lesson 01's losses
live in :mod:`utils.distill`, which stays light.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, Trainer

from utils.distill import LOSS_TYPES, check_compatible, check_temperature, lm_distillation_loss
from utils.train import (
    IGNORE_INDEX,
    PadCollator,
    TrainResult,
    lm_training_arguments,
    prepare_dataset,
    run_trainer,
)

__all__ = ["DistillResult", "DistillationTrainer", "distill_lm"]


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
        if teacher_model is None:
            raise TypeError("DistillationTrainer needs teacher_model=: the trained model to distil "
                            "from (e.g. load_model('teacher')[0]).")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, "
                             f"got {loss_type!r}.")
        check_temperature(temperature)
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
        new = {"input_ids": torch.full((len(rows), length), pad, dtype=ids.dtype,
                                       device=ids.device)}
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
            self.step_log.append({"step": int(self.state.global_step) + 1,
                                  "loss": float(loss.detach()),
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
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    check_compatible(teacher, student,
                     tokenizer if teacher_tokenizer is None else teacher_tokenizer, tokenizer)
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
        trainer = DistillationTrainer(
            model=student, args=args, teacher_model=teacher, loss_type=loss_type,
            temperature=temperature, alpha=alpha, beta=beta, lmbda=lmbda,
            max_new_tokens=max_new_tokens, seed=seed, teacher_tokenizer=teacher_tokenizer,
            loss_fn=loss_fn, train_dataset=train_tok, eval_dataset=eval_tok,
            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=callbacks)
        result = run_trainer(trainer, progress=progress)
    return DistillResult(**vars(result), step_log=list(trainer.step_log))
