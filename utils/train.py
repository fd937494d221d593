"""Supervised fine-tuning of a chat model on the world, loss on assistant tokens only (lesson 02).

The model learns to *answer*, not to predict the user's prompt: labels are the input ids on
assistant tokens and ``ignore_index`` (-100, PyTorch's cross-entropy default) elsewhere, as in
InstructGPT-style SFT (Ouyang et al. 2022) and TRL's ``assistant_only_loss``. Training runs
through ``transformers.Trainer`` so the same code scales to ``accelerate``/``torchrun``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100


def mask_labels(input_ids, assistant_mask, ignore_index: int = IGNORE_INDEX):
    """Labels for SFT: ``input_ids`` where ``assistant_mask`` is 1, ``ignore_index`` elsewhere.

    Works on tensors (any shape) and on (nested) lists; returns the same kind it was given.
    Lesson 02, exercise 2.1.
    """
    if isinstance(input_ids, torch.Tensor):
        mask = torch.as_tensor(assistant_mask, device=input_ids.device).bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"assistant_mask has shape {tuple(mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}: they must match token for token")
        return torch.where(mask, input_ids, torch.full_like(input_ids, ignore_index))
    if len(input_ids) != len(assistant_mask):
        raise ValueError(f"assistant_mask has {len(assistant_mask)} entries but input_ids has "
                         f"{len(input_ids)}: they must match token for token")
    if input_ids and isinstance(input_ids[0], (list, tuple)):
        return [mask_labels(i, m, ignore_index)
                for i, m in zip(input_ids, assistant_mask, strict=True)]
    return [int(t) if m else ignore_index for t, m in zip(input_ids, assistant_mask, strict=True)]


def tokenize_chat(examples: dict[str, list], tokenizer, max_length: int = 256) -> dict[str, list]:
    """A batched ``Dataset.map`` function: chat ``messages`` -> input_ids, attention_mask, labels.

    Uses the tokenizer's chat template with ``return_assistant_tokens_mask=True`` and
    :func:`mask_labels`, so only the assistant's tokens (and its end token) carry loss.
    Conversations longer than ``max_length`` tokens are truncated on the right.
    """
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
    for messages in examples["messages"]:
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        if not any(mask):
            raise ValueError("a conversation has no assistant tokens (within max_length="
                             f"{max_length}): check the data or raise max_length")
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(mask_labels(ids, mask))
        out["length"].append(len(ids))
    return out


def prepare_dataset(dataset, tokenizer, max_length: int = 256):
    """Tokenize a world ``Dataset`` (records with ``messages``) for training, dropping the rest."""
    if "input_ids" in dataset.column_names:
        return dataset
    return dataset.map(tokenize_chat, batched=True,
                       fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                       remove_columns=dataset.column_names, desc=None)


@dataclass
class PadCollator:
    """Right-pads a list of tokenized examples into tensors (labels padded with -100)."""

    pad_token_id: int
    ignore_index: int = IGNORE_INDEX

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PadCollator got an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * n)
            batch["attention_mask"].append(list(f.get("attention_mask", [1] * len(f["input_ids"])))
                                           + [0] * n)
            labels = f.get("labels", f["input_ids"])
            batch["labels"].append(list(labels) + [self.ignore_index] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@dataclass
class TrainResult:
    """What :func:`train_lm` returns: the Trainer's log history and the measured time."""

    log_history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    tokens_seen: int = 0

    @property
    def train_losses(self) -> list[tuple[int, float]]:
        return [(h["step"], h["loss"]) for h in self.log_history if "loss" in h]

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return [(h["step"], h["eval_loss"]) for h in self.log_history if "eval_loss" in h]

    @property
    def final_eval_loss(self) -> float:
        losses = self.eval_losses
        return losses[-1][1] if losses else math.nan


def lm_training_arguments(output_dir: str, *, max_steps: int, batch_size: int,
                          eval_batch_size: int, lr: float, weight_decay: float,
                          warmup_steps: float, scheduler: str, min_lr_ratio: float,
                          has_eval: bool, eval_steps: int | None, logging_steps: int | None,
                          seed: int, use_cpu: bool, progress: bool, **extra: Any):
    """The course's ``TrainingArguments`` (shared by :func:`train_lm` and lesson 03's
    ``distill_lm`` so a distilled and a scratch student train alike): AdamW with beta2 0.98,
    clipping at 1, warm-up then cosine decay to ``min_lr_ratio * lr``, evaluation about 10
    times, nothing saved. ``extra`` adds or overrides arguments."""
    from transformers import TrainingArguments

    sched_kwargs: dict[str, Any] = {}
    if scheduler == "cosine" and min_lr_ratio > 0:
        scheduler, sched_kwargs = "cosine_with_min_lr", {"min_lr_rate": min_lr_ratio}
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size, learning_rate=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, lr_scheduler_type=scheduler, lr_scheduler_kwargs=sched_kwargs,
        adam_beta2=0.98, max_grad_norm=1.0,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps or max(1, max_steps // 10),
        logging_strategy="steps", logging_steps=logging_steps or max(1, min(50, max_steps // 20)),
        logging_first_step=True, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        use_cpu=use_cpu, dataloader_num_workers=0, disable_tqdm=not progress,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def quiet_progress(trainer, progress: bool) -> None:
    """The progress bar alone, without a dict printed at every log (notebook outputs stay
    readable); with ``progress=False`` nothing is printed: pass a callback to watch losses."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # no dict under the bar
            return None

    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress)


def run_trainer(trainer: Any, *, progress: bool) -> TrainResult:
    """Run ``trainer.train()`` (quiet logs, a bar when ``progress``), time it, leave the model in
    eval mode and return the :class:`TrainResult`: the one tail of every course Trainer
    (``train_lm``, lesson 03's ``distill_lm``, lesson 04's top-k distillation)."""
    quiet_progress(trainer, progress)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.eval()
    return TrainResult(log_history=list(trainer.state.log_history), train_seconds=seconds,
                       steps=trainer.state.global_step,
                       tokens_seen=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0))


def bar_callback(progress: Any, total: int):
    """A ``TrainerCallback`` that advances a recipe's tqdm bar one step per optimizer step.

    ``progress`` is the bar :func:`utils.models.load_model` hands a recipe (or ``None``: then
    the callback does nothing); it is reset to ``total`` steps here, which also resizes a
    notebook (widget) bar.
    """
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress.update(1)

    if progress is not None:
        progress.reset(total=total)
    return _Bar()


def train_lm(model, tokenizer, train_ds, eval_ds=None, *, max_steps: int, batch_size: int = 32,
             lr: float = 3e-3, seed: int = 0, warmup_steps: float = 0.03,
             weight_decay: float = 0.01, scheduler: str = "cosine",
             eval_steps: int | None = None, logging_steps: int | None = None,
             max_length: int = 256, callbacks: list | None = None, output_dir: str | None = None,
             progress: bool = True, group_by_length: bool = False, eval_batch_size: int = 64,
             min_lr_ratio: float = 0.1) -> TrainResult:
    """Train ``model`` on chat data with ``transformers.Trainer``; loss on assistant tokens only.

    The budget is in *steps* (``max_steps`` batches of ``batch_size``), so the result does not
    depend on how busy the machine is. Same ``seed`` and data -> same losses. ``callbacks``
    (``transformers.TrainerCallback``) see every log, e.g. to draw a live loss curve. The
    learning rate warms up, then follows a cosine decay to ``min_lr_ratio * lr``.
    Lesson 02.
    """
    import tempfile

    from transformers import Trainer

    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    train_tok = prepare_dataset(train_ds, tokenizer, max_length)
    eval_tok = prepare_dataset(eval_ds, tokenizer, max_length) if eval_ds is not None else None
    with tempfile.TemporaryDirectory(prefix="dd-train-") as tmp:
        args = lm_training_arguments(
            output_dir or tmp, max_steps=max_steps, batch_size=batch_size,
            eval_batch_size=eval_batch_size, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, scheduler=scheduler, min_lr_ratio=min_lr_ratio,
            has_eval=eval_tok is not None, eval_steps=eval_steps, logging_steps=logging_steps,
            seed=seed, use_cpu=True, progress=progress,
            train_sampling_strategy="group_by_length" if group_by_length else "random")
        trainer = Trainer(model=model, args=args, train_dataset=train_tok, eval_dataset=eval_tok,
                          data_collator=PadCollator(tokenizer.pad_token_id),
                          processing_class=tokenizer, callbacks=callbacks)
        result = run_trainer(trainer, progress=progress)
    return result
