"""Hinton et al. (2015) section 3, reproduced offline on scikit-learn's 8x8 digits.

The paper trains a large, strongly regularised MLP on MNIST (dropout, input jitter), a small
unregularised MLP on the hard labels alone, and the same small MLP distilled from the large
one; then it distils on a transfer set with every "3" left out and shows that a single bias
correction brings the 3s back. This module holds the pieces as small pure functions (data
split, jitter, models, one training loop, evaluation) so lesson 01 can run each step and
average over seeds in seconds on a CPU. Introduced in lesson 01.

scikit-learn's ``load_digits`` is bundled with the library (1,797 images of 8x8 pixels,
values 0..16), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DigitsSplit",
    "TrainConfig",
    "count_errors",
    "errors_on_class",
    "jitter_images",
    "load_digits_split",
    "make_mlp",
    "predict_logits",
    "train_classifier",
    "without_class",
]

IMAGE_SIDE = 8
N_CLASSES = 10

# loss_fn(student_logits (B, C), teacher_logits (B, C) or None, labels (B,)) -> scalar
LossFn = Callable[[Tensor, Tensor | None, Tensor], Tensor]


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train / validation / test split of the digits; pixels scaled to [0, 1]."""

    x_train: Tensor  # (N_train, 64) float32
    y_train: Tensor  # (N_train,) int64
    x_val: Tensor  # (N_val, 64)
    y_val: Tensor  # (N_val,)
    x_test: Tensor  # (N_test, 64)
    y_test: Tensor  # (N_test,)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass(frozen=True)
class TrainConfig:
    """How one classifier is trained (Adam, mini-batches, a fixed number of epochs)."""

    epochs: int = 60  # passes over the training (transfer) set
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # L2 on the weights (0: no regularisation)
    jitter: int = 0  # shift inputs by up to this many pixels each step (0: off)


def load_digits_split(seed: int = 0, test_fraction: float = 1 / 3,
                      val_fraction: float = 0.1) -> DigitsSplit:
    """scikit-learn's bundled digits, split stratified by class with ``seed``.

    ``test_fraction`` of all images is the test set, ``val_fraction`` of all images a
    validation set (used only to pick the bias correction), the rest trains.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 - test_fraction:
        raise ValueError(f"need 0 < test_fraction < 1 and 0 <= val_fraction < 1 - test_fraction,"
                         f" got {test_fraction} and {val_fraction}")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if val_fraction > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=val_fraction / (1 - test_fraction),
            random_state=seed + 1, stratify=y_rest)
    else:
        x_train, y_train = x_rest, y_rest
        x_val, y_val = x_rest[:0], y_rest[:0]

    def t(a: np.ndarray, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    return DigitsSplit(t(x_train, torch.float32), t(y_train, torch.int64),
                       t(x_val, torch.float32), t(y_val, torch.int64),
                       t(x_test, torch.float32), t(y_test, torch.int64))


def without_class(x: Tensor, y: Tensor, class_index: int) -> tuple[Tensor, Tensor]:
    """The examples whose label is not ``class_index`` (the omitted-digit transfer set)."""
    keep = y != class_index
    return x[keep], y[keep]


def jitter_images(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each 8x8 image (rows of ``x``, shape (N, 64)) by up to ``max_shift`` pixels.

    Each image gets its own random shift in both directions; pixels shifted in are 0 (the
    background). Hinton et al. (2015) jitter MNIST by up to two pixels; 8x8 digits take one.
    """
    if max_shift <= 0:
        return x
    n = x.shape[0]
    m = int(max_shift)
    img = F.pad(x.reshape(n, IMAGE_SIDE, IMAGE_SIDE), (m, m, m, m))  # (N, 8+2m, 8+2m)
    dy = torch.randint(-m, m + 1, (n,), generator=generator)
    dx = torch.randint(-m, m + 1, (n,), generator=generator)
    base = torch.arange(IMAGE_SIDE) + m
    rows = (base[None, :] - dy[:, None])[:, :, None]  # (N, 8, 1)
    cols = (base[None, :] - dx[:, None])[:, None, :]  # (N, 1, 8)
    out = img[torch.arange(n)[:, None, None], rows, cols]  # (N, 8, 8)
    return out.reshape(n, IMAGE_SIDE * IMAGE_SIDE)


def make_mlp(hidden: int, *, layers: int = 2, dropout: float = 0.0,
             input_dropout: float = 0.0, seed: int | None = None) -> nn.Sequential:
    """An MLP 64 -> hidden (x layers, ReLU) -> 10, with optional dropout.

    Hinton et al. (2015) use two hidden layers of 1200 units with dropout for the teacher
    and two layers of 800 without regularisation for the student on MNIST.
    """
    with torch.random.fork_rng(devices=[]):  # seeding here leaves the global RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        return _build_mlp(hidden, layers, dropout, input_dropout)


def _build_mlp(hidden: int, layers: int, dropout: float, input_dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    if input_dropout > 0:
        mods.append(nn.Dropout(input_dropout))
    width = IMAGE_SIDE * IMAGE_SIDE
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        width = hidden
    mods.append(nn.Linear(width, N_CLASSES))
    return nn.Sequential(*mods)


def hard_label_loss(student_logits: Tensor, teacher_logits: Tensor | None,
                    labels: Tensor) -> Tensor:
    """Cross-entropy on the labels; ignores the teacher (the baseline's loss)."""
    return F.cross_entropy(student_logits, labels)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig, *,
                     seed: int, loss_fn: LossFn = hard_label_loss,
                     teacher_logits: Tensor | None = None) -> nn.Module:
    """Train ``model`` on ``(x, y)`` with Adam; returns it in eval mode.

    ``loss_fn(student_logits, teacher_logits, labels)`` defines the objective: the default is
    cross-entropy, a distillation loss uses ``teacher_logits`` (N, C), precomputed once for
    the transfer set (the teacher is fixed). ``seed`` fixes batch order and jitter.
    """
    if teacher_logits is not None and teacher_logits.shape[0] != x.shape[0]:
        raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows for "
                         f"{x.shape[0]} examples: compute it on the same transfer set.")
    if config.jitter and teacher_logits is not None:
        raise ValueError("jitter with precomputed teacher_logits would pair shifted images "
                         "with soft targets of unshifted ones; use jitter=0 for students.")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = x.shape[0]
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            xb = jitter_images(x[idx], config.jitter, gen)  # (B, 64)
            tb = None if teacher_logits is None else teacher_logits[idx]  # (B, C)
            loss = loss_fn(model(xb), tb, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits (N, C) in eval mode (dropout off), without gradient."""
    model.eval()
    return model(x)


def count_errors(logits: Tensor, labels: Tensor) -> int:
    """How many argmax predictions differ from the labels."""
    return int((logits.argmax(dim=-1) != labels).sum())


def errors_on_class(logits: Tensor, labels: Tensor, class_index: int) -> int:
    """Errors among the examples whose true label is ``class_index``."""
    mask = labels == class_index
    return int((logits[mask].argmax(dim=-1) != class_index).sum())
