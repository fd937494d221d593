"""Unit tests for utils/distill.py (lesson 01): hand-written losses agree with PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.distill import (
    add_class_bias,
    distillation_loss,
    fit_class_bias,
    kd_loss,
    kl_divergence,
    log_softmax_with_temperature,
    softmax_with_temperature,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 20.0])
def test_softmax_matches_torch(logits, T):
    s, _ = logits
    assert torch.allclose(softmax_with_temperature(s, T), torch.softmax(s / T, -1), atol=1e-6)
    assert torch.allclose(log_softmax_with_temperature(s, T), F.log_softmax(s / T, -1),
                          atol=1e-5)


def test_softmax_is_stable_and_flattens():
    big = torch.tensor([[1000.0, 1001.0, 1002.0]])
    assert torch.allclose(softmax_with_temperature(big), torch.softmax(big, -1))
    x = torch.tensor([[3.0, 1.0, 0.0]])
    entropies = [float(-(p * p.log()).sum()) for p in
                 (softmax_with_temperature(x, T) for T in (1.0, 2.0, 5.0, 50.0))]
    assert entropies == sorted(entropies)  # higher T, flatter, higher entropy


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_named(bad):
    with pytest.raises(ValueError, match="temperature"):
        softmax_with_temperature(torch.zeros(2, 3), bad)


def test_bad_logits_are_named():
    with pytest.raises(TypeError, match="torch.Tensor"):
        kd_loss([1.0, 2.0], torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        softmax_with_temperature(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_kd_loss_matches_library_kl_div(logits, T):
    s, t = logits
    library = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                       reduction="batchmean", log_target=True) * T**2
    assert torch.allclose(kd_loss(s, t, T), library, atol=1e-5)


def test_kd_loss_is_forward_kl(logits):
    s, t = logits
    T = 2.0
    forward = kl_divergence(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)).mean() * T**2
    reverse = kl_divergence(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)).mean() * T**2
    assert torch.allclose(kd_loss(s, t, T), forward)
    assert not torch.allclose(kd_loss(s, t, T), reverse, rtol=1e-2)


def test_kd_loss_zero_and_nonnegative(logits):
    s, t = logits
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(s, t, 3.0)) > 0


def test_kd_gradient_is_temperature_independent_with_t2():
    # Hinton et al. (2015) section 2.1: for large T the gradient is (z - v) / (N T^2) per
    # logit; times T^2 it no longer depends on T (zero-mean logits).
    g = torch.Generator().manual_seed(1)
    s = torch.randn(16, 10, generator=g)
    t = torch.randn(16, 10, generator=g)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    norms = []
    for T in (10.0, 100.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, T).backward()
        norms.append(float(x.grad.norm()))
        limit = (s - t) / (s.shape[-1] * s.shape[0])  # (z - v) / (N B)
        assert torch.allclose(x.grad, limit, atol=2e-2 if T == 10 else 2e-4)
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.05)


def test_kd_loss_token_shaped():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)  # (B, T, V)
    flat = kd_loss(s.reshape(10, 7), t.reshape(10, 7), 2.0)
    assert torch.allclose(kd_loss(s, t, 2.0), flat)


def test_distillation_loss_mix(logits):
    s, t = logits
    y = torch.arange(8) % 10
    ce = F.cross_entropy(s, y)
    kd = kd_loss(s, t, 4.0)
    assert torch.allclose(distillation_loss(s, t, y, 4.0, 0.0), ce)
    assert torch.allclose(distillation_loss(s, t, y, 4.0, 1.0), kd)
    assert torch.allclose(distillation_loss(s, t, y, 4.0, 0.25), 0.25 * kd + 0.75 * ce)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, y, 4.0, 1.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, t, y[:3], 4.0, 0.5)


def test_add_class_bias_is_a_copy_with_the_right_sign():
    x = torch.zeros(4, 3)
    y = add_class_bias(x, 1, 2.5)
    assert torch.equal(x, torch.zeros(4, 3))
    assert torch.equal(y[:, 1], torch.full((4,), 2.5)) and torch.equal(y[:, [0, 2]],
                                                                       torch.zeros(4, 2))
    assert (softmax_with_temperature(y)[:, 1] > softmax_with_temperature(x)[:, 1]).all()
    with pytest.raises(IndexError, match="out of range"):
        add_class_bias(x, 3, 1.0)


def test_fit_class_bias_recovers_a_lowered_class():
    labels = torch.arange(3).repeat(10)  # (30,)
    logits = F.one_hot(labels, 3).float() * 2.0
    logits[:, 2] -= 3.0  # class 2 never wins now
    assert int((logits.argmax(-1) != labels).sum()) == 10
    bias, errors = fit_class_bias(logits, labels, 2, [i * 0.5 for i in range(-4, 13)])
    assert errors == 0 and 1.0 < bias < 5.0
    assert fit_class_bias(F.one_hot(labels, 3).float(), labels, 2, [-1.0, 0.0, 1.0]) == (0.0, 0)
    with pytest.raises(ValueError, match="empty"):
        fit_class_bias(logits, labels, 2, [])


def test_import_does_nothing():
    import subprocess
    import sys

    code = ("import torch; s = torch.initial_seed(); import utils.distill, utils.digits, "
            "utils.checks.distill; assert torch.initial_seed() == s")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr
