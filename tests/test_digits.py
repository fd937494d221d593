"""Unit tests for utils/digits.py (lesson 01: Hinton et al. 2015 section 3 on digits)."""

from __future__ import annotations

import pytest
import torch

from utils.digits import (
    TrainConfig,
    count_errors,
    errors_on_class,
    jitter_images,
    load_digits_split,
    make_mlp,
    predict_logits,
    train_classifier,
    without_class,
)
from utils.distill import distillation_loss


def test_split_sizes_stratified_and_seeded():
    d = load_digits_split(0)
    assert sum(d.sizes.values()) == 1797
    assert d.sizes["test"] == 599
    assert d.x_train.shape[1] == 64 and d.x_train.dtype == torch.float32
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 57 and int(counts.max()) <= 62  # stratified: ~60 per digit
    again = load_digits_split(0)
    assert torch.equal(d.x_test, again.x_test)
    assert not torch.equal(d.y_test, load_digits_split(1).y_test)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(0, test_fraction=1.2)


def test_without_class():
    d = load_digits_split(0)
    x, y = without_class(d.x_train, d.y_train, 3)
    assert (y != 3).all() and len(y) == int((d.y_train != 3).sum()) and x.shape[0] == len(y)


def test_jitter_moves_a_pixel_by_at_most_the_shift():
    x = torch.zeros(200, 64)
    x[:, 3 * 8 + 4] = 1.0  # one bright pixel at row 3, column 4
    out = jitter_images(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == (200, 64)
    assert torch.equal(out.sum(1), torch.ones(200))  # moved, never lost (it is inside)
    pos = out.argmax(1)
    rows, cols = pos // 8, pos % 8
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {3, 4, 5}
    assert torch.equal(jitter_images(x, 0), x)


def test_make_mlp_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = make_mlp(16, seed=3), make_mlp(16, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    drop = make_mlp(16, dropout=0.5, input_dropout=0.2)
    assert sum(isinstance(m, torch.nn.Dropout) for m in drop) == 3


def test_training_learns_and_distillation_runs():
    torch.set_num_threads(1)
    d = load_digits_split(0)
    cfg = TrainConfig(epochs=8, batch_size=64, lr=1e-2)
    model = train_classifier(make_mlp(32, seed=0), d.x_train, d.y_train, cfg, seed=0)
    teacher_logits = predict_logits(model, d.x_test)
    assert count_errors(teacher_logits, d.y_test) < 0.15 * len(d.y_test)
    t_train = predict_logits(model, d.x_train)
    student = train_classifier(
        make_mlp(16, seed=1), d.x_train, d.y_train, cfg, seed=0, teacher_logits=t_train,
        loss_fn=lambda s, t, y: distillation_loss(s, t, y, 4.0, 0.9))
    assert count_errors(predict_logits(student, d.x_test), d.y_test) < 0.3 * len(d.y_test)
    with pytest.raises(ValueError, match="rows"):
        train_classifier(make_mlp(8), d.x_train, d.y_train, cfg, seed=0,
                         teacher_logits=t_train[:5])
    with pytest.raises(ValueError, match="jitter"):
        train_classifier(make_mlp(8), d.x_train, d.y_train, TrainConfig(jitter=1), seed=0,
                         teacher_logits=t_train)


def test_error_counts():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    assert count_errors(logits, labels) == 2
    assert errors_on_class(logits, labels, 0) == 1 and errors_on_class(logits, labels, 1) == 1
