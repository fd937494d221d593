"""Mutation tests of lesson 05's checks: the classic mistakes must fail, right answers pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.checks.quantize import (
    QUANT_KL_BAR,
    QUANT_SIZE_BUDGET,
    check_kl_and_flip_rate,
    check_quantization_choice,
    check_quantize_dequantize,
    check_quantize_groupwise_int4,
    quantization_experiment,
)
from utils.quantize import affine_quantize, kl_and_flip_rate, pack_int4, quantize_groupwise_int4


def _status(result) -> str:
    return result.status


# ------------------------------------------------------------------ 5.1 quantize / dequantize

def _affine(x, bits, *, zp_offset=0, clamp=True, scale_from_max=False, rounding=torch.round,
            include_zero=True, levels=None, round_zp=True):
    """A textbook asymmetric quantizer with switches for the classic mistakes."""
    qmax = 2**bits - 1
    lo, hi = x.min(), x.max()
    if include_zero:
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    steps = levels if levels is not None else qmax
    scale = hi / steps if scale_from_max else (hi - lo) / steps
    if scale == 0:
        scale = torch.tensor(1.0)
    zp = -lo / scale
    zp = (torch.round(zp) if round_zp else zp) + zp_offset
    zp = torch.clamp(zp, 0, qmax)
    q = rounding(x / scale) + zp
    if clamp:
        q = torch.clamp(q, 0, qmax)
    return q, scale, zp


def test_quantize_dequantize_accepts_the_reference_and_a_textbook_version():
    assert check_quantize_dequantize(affine_quantize, exercise="t5.1").passed
    assert check_quantize_dequantize(lambda x, b: _affine(x, b), exercise="t5.1").passed


def test_quantize_dequantize_rejects_classic_mistakes(capsys):
    mutants = {
        "off-by-one zero point": lambda x, b: _affine(x, b, zp_offset=1),
        "no clamping": lambda x, b: _affine(x, b, clamp=False),
        "scale from max, not max - min": lambda x, b: _affine(x, b, scale_from_max=True),
        "floor instead of round": lambda x, b: _affine(x, b, rounding=torch.floor),
        "range not widened to 0": lambda x, b: _affine(x, b, include_zero=False),
        "2^b levels instead of 2^b - 1": lambda x, b: _affine(x, b, levels=2**b),
        "zero point not rounded": lambda x, b: _affine(x, b, round_zp=False),
        "symmetric instead of asymmetric": lambda x, b: affine_quantize(x, b, symmetric=True),
        "zero scale not guarded": lambda x, b: ((x - x.min()) / (x.max() - x.min()) * (2**b - 1),
                                                (x.max() - x.min()) / (2**b - 1), torch.tensor(0)),
        "returns two values": lambda x, b: affine_quantize(x, b)[:2],
    }
    for name, fn in mutants.items():
        result = check_quantize_dequantize(fn, exercise="t5.1")
        assert result.status in ("failed", "error"), f"{name} passed the check"
    out = capsys.readouterr().out
    assert "off by +1" in out
    assert "Clamp q" in out
    assert "(max - min)" in out
    assert "rounded down" in out
    assert "include 0" in out


def test_quantize_dequantize_not_done_and_crash():
    def todo(x, bits):
        raise NotImplementedError("Exercise 5.1: quantize_dequantize")

    assert check_quantize_dequantize(todo, exercise="t5.1").status == "not_done"
    assert check_quantize_dequantize(lambda x, b: 1 / 0, exercise="t5.1").status == "error"


# ------------------------------------------------------------------ 5.2 group-wise int4

def _groupwise(weight, group_size, *, swap_nibbles=False, wrong_axis=False, pack=True,
               per_row=False, rounding=torch.round, symmetric=False):
    w = weight.T.contiguous() if wrong_axis else weight
    rows, cols = w.shape
    g = cols if per_row else group_size
    grouped = w.reshape(rows, cols // g, g)
    if symmetric:
        scale = grouped.abs().amax(-1) / 7.5
        zero = torch.full_like(scale, 8)
    else:
        lo = grouped.amin(-1).clamp(max=0)
        hi = grouped.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(rounding(grouped / scale[..., None]) + zero[..., None], 0, 15)
    q = q.reshape(rows, cols).to(torch.uint8)
    if wrong_axis:
        q = q.T.contiguous()
    if not pack:
        return q, scale, zero.to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    if swap_nibbles:
        packed = (q[:, 0::2] << 4) | q[:, 1::2]
    if per_row:
        scale = scale.repeat_interleave(weight.shape[1] // group_size, dim=-1)
        zero = zero.repeat_interleave(weight.shape[1] // group_size, dim=-1)
    return packed, scale, zero.to(torch.uint8)


def test_groupwise_accepts_the_reference_and_a_textbook_version():
    assert check_quantize_groupwise_int4(quantize_groupwise_int4, exercise="t5.2").passed
    assert check_quantize_groupwise_int4(_groupwise, exercise="t5.2").passed


def test_groupwise_rejects_classic_mistakes(capsys):
    mutants = {
        "nibble order swapped": lambda w, g: _groupwise(w, g, swap_nibbles=True),
        "groups along the output axis": lambda w, g: _groupwise(w, g, wrong_axis=True),
        "groups along the output axis, reshaped back": lambda w, g: tuple(
            t.T.reshape(w.shape[0], -1) if i else t
            for i, t in enumerate(_groupwise(w, g, wrong_axis=True))),
        "codes not packed": lambda w, g: _groupwise(w, g, pack=False),
        "one scale per row": lambda w, g: _groupwise(w, g, per_row=True),
        "floor instead of round": lambda w, g: _groupwise(w, g, rounding=torch.floor),
        "symmetric instead of asymmetric": lambda w, g: _groupwise(w, g, symmetric=True),
        "packed with torch.int8 view": lambda w, g: tuple(
            t.view(torch.int8) if i == 0 else t
            for i, t in enumerate(quantize_groupwise_int4(w, g))),
        "packs along the wrong axis": lambda w, g: (
            pack_int4(_groupwise(w, g, pack=False)[0].T.contiguous()).T.contiguous(),
            *quantize_groupwise_int4(w, g)[1:]),
    }
    for name, fn in mutants.items():
        result = check_quantize_groupwise_int4(fn, exercise="t5.2")
        assert result.status in ("failed", "error"), f"{name} passed the check"
    out = capsys.readouterr().out
    assert "nibbles are swapped" in out
    assert "INPUT features" in out or "consecutive input features" in out
    assert "two 4-bit codes per byte" in out


# ------------------------------------------------------------------ 5.3 KL and flip rate

def _kl_flip(ref, logits, mask, *, reverse=False, ignore_mask=False, all_positions=False,
             sum_positions=False, flip_by_value=False, ties_as_flips=False, raw=False):
    mask = torch.ones_like(mask) if ignore_mask else mask.bool()
    if raw:
        per_pos = ((ref - logits) ** 2).mean(-1)
    else:
        p_log = F.log_softmax(ref, -1)
        q_log = F.log_softmax(logits, -1)
        if reverse:
            p_log, q_log = q_log, p_log
        per_pos = (p_log.exp() * (p_log - q_log)).sum(-1)
    if flip_by_value:
        flips = ref.max(-1).values != logits.max(-1).values
    elif ties_as_flips:
        top = ref.argmax(-1, keepdim=True)
        at_top = logits.gather(-1, top).squeeze(-1)
        n_max = (logits == logits.max(-1, keepdim=True).values).sum(-1)
        flips = (at_top < logits.max(-1).values) | (n_max > 1)
    else:
        flips = ref.argmax(-1) != logits.argmax(-1)
    kept = per_pos[mask]
    kl = kept.sum() if sum_positions else kept.sum() / (mask.numel() if all_positions
                                                         else mask.sum())
    flip = flips[mask].float().sum() / (mask.numel() if all_positions else mask.sum())
    return float(kl), float(flip)


def test_kl_and_flip_rate_accepts_the_reference_and_a_textbook_version():
    assert check_kl_and_flip_rate(kl_and_flip_rate, exercise="t5.3").passed
    assert check_kl_and_flip_rate(_kl_flip, exercise="t5.3").passed

    def with_kl_div(ref, logits, mask):  # the library way: F.kl_div(log Q, log P, log_target)
        m = mask.bool()
        kl = F.kl_div(F.log_softmax(logits[m], -1), F.log_softmax(ref[m], -1),
                      reduction="batchmean", log_target=True)
        flip = (ref.argmax(-1) != logits.argmax(-1))[m].float().mean()
        return kl, flip  # tensors are fine

    assert check_kl_and_flip_rate(with_kl_div, exercise="t5.3").passed


def test_kl_and_flip_rate_rejects_classic_mistakes(capsys):
    mutants = {
        "KL direction swapped": lambda r, q, m: _kl_flip(r, q, m, reverse=True),
        "F.kl_div with arguments swapped": lambda r, q, m: (
            F.kl_div(F.log_softmax(r[m.bool()], -1), F.softmax(q[m.bool()], -1),
                     reduction="batchmean"),
            _kl_flip(r, q, m)[1]),
        "mask ignored": lambda r, q, m: _kl_flip(r, q, m, ignore_mask=True),
        "divided by all positions": lambda r, q, m: _kl_flip(r, q, m, all_positions=True),
        "KL summed over positions": lambda r, q, m: _kl_flip(r, q, m, sum_positions=True),
        "flips by top value, not index": lambda r, q, m: _kl_flip(r, q, m, flip_by_value=True),
        "ties counted as flips": lambda r, q, m: _kl_flip(r, q, m, ties_as_flips=True),
        "squared logit error, not KL": lambda r, q, m: _kl_flip(r, q, m, raw=True),
        "returns only the KL": lambda r, q, m: _kl_flip(r, q, m)[0],
    }
    for name, fn in mutants.items():
        result = check_kl_and_flip_rate(fn, exercise="t5.3")
        assert result.status in ("failed", "error"), f"{name} passed the check"
    out = capsys.readouterr().out
    assert "KL(P_quant || P_ref)" in out
    assert "masked positions" in out
    assert "argmax indices" in out or "torch.argmax" in out


# ------------------------------------------------------------------ 5.4 open experiment
# The check quantizes the shipped distilled student and measures it on the lesson's evaluation
# set (seconds), so these tests re-measure the bar's ends.

REFERENCE_QUANT = {"bits": 4, "group_size": 64, "symmetric": False,
                   "keep_8bit": ["layers.0.", "layers.2."]}  # the solution's choice


@pytest.fixture(scope="module")
def student():
    from utils.models import load_model

    model, tok = load_model("student-xs-forward-kl", verbose=False)
    return model.eval(), tok


def _quant(**kw):
    choice = {"bits": 4, "group_size": 32, "symmetric": False, "keep_8bit": [], **kw}
    return lambda: choice


def test_quant_check_accepts_the_reference_with_a_margin(student):
    model, tok = student
    result = check_quantization_choice(lambda: dict(REFERENCE_QUANT), model, tok)
    assert result.passed, result
    r = quantization_experiment(model, tok, **REFERENCE_QUANT)
    assert r["bytes"] <= 0.97 * QUANT_SIZE_BUDGET and r["kl_to_fp32"] <= 0.8 * QUANT_KL_BAR, r
    assert f"{r['bytes']:,} bytes" in result.message  # the message is the measurement


@pytest.mark.parametrize("kw, words", [
    ({"bits": 8, "group_size": None, "symmetric": True}, "Over the size budget"),  # int8
    ({"bits": 4, "group_size": 32}, "Too far from fp32"),        # section 10's 4-bit g32 RTN
    ({"bits": 4, "group_size": 16}, "Too far from fp32"),        # the budget spent on scales
    ({"bits": 2, "group_size": 32}, "Too far from fp32"),
    ({"bits": 4, "group_size": 64, "keep_8bit": ["layers."]}, "Over the size budget"),
    ({"bits": 4, "group_size": 4}, "Over the size budget"),      # scales cost more than codes
])
def test_quant_check_rejects_bad_choices(student, kw, words):
    model, tok = student
    result = check_quantization_choice(_quant(**kw), model, tok)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("choice, words", [
    ({"bits": 5, "group_size": 32, "symmetric": False, "keep_8bit": []}, "not allowed"),
    ({"bits": "4", "group_size": 32, "symmetric": False, "keep_8bit": []}, "not allowed"),
    ({"bits": 4, "group_size": 32.5, "symmetric": False, "keep_8bit": []}, "whole number"),
    ({"bits": 4, "group_size": 32, "symmetric": "no", "keep_8bit": []}, "not allowed"),
    ({"bits": 4, "group_size": 32, "symmetric": False, "keep_8bit": "down_proj"}, "list"),
    ({"bits": 4, "group_size": 32, "symmetric": False, "keep_8bit": [0]}, "list"),
    ({"bits": 4, "group_size": 32, "symmetric": False}, "missing 'keep_8bit'"),
    ({"bytes": 50_000, "kl_to_fp32": 0.0}, "settings"),      # a fake result
    (0.001, "settings"),                                     # a fake number
])
def test_quant_check_rejects_wrong_types_and_fake_results(choice, words):
    result = check_quantization_choice(lambda: choice, None, None)  # never reached
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_quant_check_unpackable_group_size_and_unknown_layer(student):
    model, tok = student
    result = check_quantization_choice(_quant(bits=3, group_size=12), model, tok)
    assert result.status == "failed" and "cannot be packed" in result.message, result
    result = check_quantization_choice(_quant(keep_8bit=["layer.0"]), model, tok)
    assert result.status == "failed" and "part of no Linear layer" in result.message, result


def test_quant_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 5.4: choose_quantization")

    result = check_quantization_choice(not_done, None, None)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_quantization_choice(lambda: 1 / 0, None, None).status == "error"
    assert check_quantization_choice(4, None, None).status == "error"
