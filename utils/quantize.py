"""Quantization by hand, then by the libraries, measured the same way (lesson 05).

Affine quantization maps a float ``x`` to an integer code ``q`` and back::

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Conventions used everywhere in this module (they are PyTorch's and torchao's, so the
hand-written int8 agrees with ``quantize_dynamic`` and torchao bit for bit):

- **asymmetric** (``symmetric=False``): codes ``0 .. 2^b - 1``; the range ``[lo, hi]`` is
  the data range widened to include 0 (so 0 is exact: padding and ReLU zeros survive),
  ``scale = (hi - lo) / (2^b - 1)``, ``zero_point = clamp(round(-lo / scale), 0, 2^b - 1)``;
- **symmetric** (``symmetric=True``): codes ``-2^(b-1) .. 2^(b-1) - 1``, ``zero_point = 0``,
  ``scale = max|x| / (2^(b-1) - 0.5)`` (``max|x| / 127.5`` at 8 bits; the one code that
  ``max|x|`` would round to out of range is clamped, an error of exactly ``scale / 2``);
- rounding is ``torch.round`` (half to even) of ``x * (1 / scale)``, as PyTorch and torchao
  compute it; a zero range (all-zero tensor) gets scale 1;
- granularity: per tensor (``axis=None``), per channel (``axis=k``: one scale per index of
  dimension ``k``; ``axis=0`` is per output row of an ``nn.Linear`` weight), or group-wise
  (``group_size=g``: one scale per ``g`` consecutive values of the last dimension, i.e.
  along the input features of a weight, as GPTQ/AWQ/llama.cpp do);
- 4-bit codes are stored two per byte (:func:`pack_int4`: element ``2i`` in the low
  nibble, ``2i + 1`` in the high nibble), 2-bit codes four per byte, 3-bit codes eight per
  three bytes, 8-bit codes one per byte (:func:`pack_bits`), so sizes are real sizes;
- model level: every ``nn.Linear`` is quantized, except ``lm_head`` unless
  ``include_lm_head=True`` (skipping it is also transformers' ``TorchAoConfig`` default).
  In the course's models ``lm_head`` is tied to the token embedding; including it *unties*
  it: ``lm_head`` gets its own quantized copy and the embedding stays in float. GGUF files
  are the exception: llama.cpp stores the tied matrix once, as ``token_embd``, quantized.

Papers: Jacob et al. (2018) integer-arithmetic inference; Dettmers et al. (2022) LLM.int8()
(outliers); Frantar et al. (2022) GPTQ; Lin et al. (2023) AWQ; Dutta et al. (2024)
"Accuracy is not all you need" (KL divergence and flips instead of accuracy alone).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QuantizedTensor",
    "SUPPORTED_BITS",
    "affine_quantize",
    "awq_quantize_model",
    "dequantize",
    "fake_quantize_model",
    "gguf_tensor_types",
    "kl_and_flip_rate",
    "kl_to_reference",
    "latency_ms",
    "linear_weight_bytes",
    "load_gguf_model",
    "load_packed",
    "load_with_torchao_config",
    "outlier_effect",
    "pack_bits",
    "pack_int4",
    "pack_model",
    "packed_size_bytes",
    "quant_params",
    "quant_range",
    "quantizable_linears",
    "quantization_error",
    "quantize",
    "quantize_dequantize",
    "quantize_dynamic_int8",
    "quantize_groupwise",
    "quantize_groupwise_int4",
    "read_gguf_tensors",
    "save_packed",
    "top1_flip_rate",
    "torchao_int8_weight_only",
    "unpack_bits",
    "unpack_int4",
    "unpack_model",
    "write_gguf",
]

SUPPORTED_BITS = (2, 3, 4, 8)


# --------------------------------------------------------------------------------------
# Scale and zero point, quantize and dequantize (lesson 05, sections 1-2)
# --------------------------------------------------------------------------------------

def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) \
            or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: use one of {SUPPORTED_BITS} "
                         "(8 for int8, 4 for int4; 2 and 3 for the bits-vs-quality curve)")
    return int(bits)


def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) \
            or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size!r} is not supported: use a positive even "
                         "integer (32, 64 and 128 are the usual choices), or None for one "
                         "scale per output channel")
    return int(group_size)


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``(-2^(b-1), 2^(b-1) - 1)`` symmetric, ``(0, 2^b - 1)`` asymmetric."""
    bits = _check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _reduce_dims(x: Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.dim()))
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}: "
                         f"use 0..{x.dim() - 1} (0 = per output channel of a Linear weight) "
                         "or None for one scale per tensor")
    axis %= x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def _to_groups(x: Tensor, group_size: int) -> Tensor:
    """``(..., n)`` -> ``(..., n // g, g)``; ``n`` must be a multiple of ``g``."""
    n = x.shape[-1]
    if n % group_size:
        raise ValueError(f"the last dimension ({n}) is not a multiple of group_size={group_size}: "
                         "use quantize_groupwise(), which pads the last group, or pick a "
                         f"group_size that divides {n}")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def quant_params(x: Tensor, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                 group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point of affine quantization (Jacob et al. 2018), lesson 05.

    Per tensor (``axis=None``): scalar tensors. Per channel (``axis=k``): shapes that
    broadcast against ``x`` (size 1 except along ``k``). Group-wise (``group_size=g``):
    shape ``(*x.shape[:-1], n // g)``, one entry per group of the last dimension; pass the
    same ``group_size`` to :func:`quantize` / :func:`dequantize`.
    Returns ``(scale float32, zero_point int32)``.
    """
    bits = _check_bits(bits)
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = x.detach().float()
    if group_size is not None:
        if axis is not None:
            raise ValueError("pass either axis (per channel) or group_size (group-wise), not both")
        group_size = _check_group_size(group_size)
        grouped = _to_groups(x, group_size)
        lo = grouped.amin(dim=-1)
        hi = grouped.amax(dim=-1)
    else:
        dims = _reduce_dims(x, axis)
        lo = x.amin(dim=dims, keepdim=axis is not None)
        hi = x.amax(dim=dims, keepdim=axis is not None)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("x contains NaN or inf: quantization needs finite values")
    qmin, qmax = quant_range(bits, symmetric)
    lo = torch.clamp(lo, max=0.0)  # the range always contains 0, so 0 is exactly representable
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _expand(t: Tensor, group_size: int | None) -> Tensor:
    return t if group_size is None else t.repeat_interleave(group_size, dim=-1)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8, *,
             symmetric: bool = False, group_size: int | None = None) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (int32), lesson 05.

    Computed as ``round(x * (1 / scale))`` like PyTorch and torchao (bit-identical codes).

    ``symmetric`` picks the code range (signed ``-2^(b-1) .. 2^(b-1) - 1`` or unsigned
    ``0 .. 2^b - 1``): pass the same value as to :func:`quant_params`. It cannot be read
    from the zero point, which is 0 for symmetric AND for asymmetric data that is never
    negative. Values outside the range clamp to its ends.
    """
    bits = _check_bits(bits)
    qmin, qmax = quant_range(bits, symmetric)
    s = _expand(scale.float(), group_size)
    z = _expand(zero_point, group_size)
    # x * (1 / scale), not x / scale: the same number in exact arithmetic, and what PyTorch
    # and torchao compute, so the codes agree with theirs bit for bit (a division differs
    # by one code on about 0.1 % of values, those that sit on a .5 boundary).
    q = torch.round(x.detach().float() * (1.0 / s)) + z
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, *,
               group_size: int | None = None) -> Tensor:
    """Back to floats: ``(q - zero_point) * scale`` (float32), lesson 05."""
    s = _expand(scale.float(), group_size)
    z = _expand(zero_point, group_size)
    return (q.to(torch.int32) - z).float() * s


def affine_quantize(x: Tensor, bits: int = 8, symmetric: bool = False,
                    axis: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, zero_point)`` in one call: lesson 05's exercise 5.1 (per tensor by default)."""
    scale, zero_point = quant_params(x, bits, symmetric, axis=axis)
    return quantize(x, scale, zero_point, bits, symmetric=symmetric), scale, zero_point


def quantize_dequantize(x: Tensor, bits: int = 8, symmetric: bool = False,
                        axis: int | None = None, group_size: int | None = None) -> Tensor:
    """``dequantize(quantize(x))`` with fresh parameters ("fake quantization"), lesson 05."""
    scale, zero_point = quant_params(x, bits, symmetric, axis=axis, group_size=group_size)
    q = quantize(x, scale, zero_point, bits, symmetric=symmetric, group_size=group_size)
    return dequantize(q, scale, zero_point, group_size=group_size).to(x.dtype)


# --------------------------------------------------------------------------------------
# Packing: real 4-bit (and 2-bit) storage (lesson 05, section 3)
# --------------------------------------------------------------------------------------

def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit codes per byte: element ``2i`` in the low nibble, ``2i+1`` in the high one.

    ``q`` holds unsigned codes 0..15 (any integer dtype) with an even last dimension; the
    result is uint8 with half the last dimension. Same layout as PyTorch's ``quint4x2``.
    """
    if q.is_floating_point():
        raise TypeError(f"pack_int4 needs integer codes, got dtype {q.dtype}: quantize first")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}: "
                         "pad with one zero code first")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"4-bit codes must be in 0..15, got {int(q.min())}..{int(q.max())}: "
                         "shift signed codes by +8 before packing")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., n/2)`` -> uint8 codes ``(..., n)``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 needs uint8 bytes, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


_CODES_PER_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}  # codes packed together into whole bytes


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Unsigned codes -> uint8 bytes: 4 codes per byte at 2 bits, 2 at 4 bits, 1 at 8 bits,
    and 8 codes in 3 bytes at 3 bits (code ``i`` of each 8 at bit ``3i`` of a 24-bit word).

    The last dimension must be a multiple of 4 (2 bits), 8 (3 bits) or 2 (4 bits).
    """
    bits = _check_bits(bits)
    if bits == 4:
        return pack_int4(q)
    if q.is_floating_point():
        raise TypeError(f"pack_bits needs integer codes, got dtype {q.dtype}: quantize first")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 2**bits - 1):
        raise ValueError(f"{bits}-bit codes must be in 0..{2**bits - 1}, "
                         f"got {int(q.min())}..{int(q.max())}")
    unit = _CODES_PER_UNIT[bits]
    if q.shape[-1] % unit:
        raise ValueError(f"{bits}-bit packing needs a last dimension divisible by {unit}, got "
                         f"{tuple(q.shape)}")
    if bits == 8:
        return q.to(torch.uint8)
    if bits == 2:
        q = q.to(torch.uint8)
        return q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)
    words = q.to(torch.int32).reshape(*q.shape[:-1], -1, 8)  # bits == 3
    word = sum(words[..., i] << (3 * i) for i in range(8))  # 24 bits
    packed = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1)
    return packed.reshape(*q.shape[:-1], -1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits` (uint8 codes)."""
    bits = _check_bits(bits)
    if bits == 4:
        return unpack_int4(packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs uint8 bytes, got {packed.dtype}")
    if bits == 8:
        return packed
    if bits == 2:
        parts = [(packed >> s) & 0x03 for s in (0, 2, 4, 6)]
        return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    if packed.shape[-1] % 3:
        raise ValueError(f"3-bit data comes in 3-byte words, got {tuple(packed.shape)}")
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = torch.stack([(word >> (3 * i)) & 0x07 for i in range(8)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


@dataclass
class QuantizedTensor:
    """A group-wise quantized 2-D weight in its storage form (lesson 05).

    ``data``: uint8 packed codes ``(rows, padded_cols * bits / 8)`` (see :func:`pack_bits`);
    codes are unsigned (symmetric codes are stored shifted by ``2^(b-1)``);
    ``scales``: float32 ``(rows, n_groups)``; ``zeros``: uint8 ``(rows, n_groups)`` or
    ``None`` when symmetric; ``shape``: the original ``(rows, cols)``; ``group_size``: the
    group length along the columns (input features); ``cols`` is padded up to a multiple of
    it with zeros, which :meth:`dequantize` cuts off again.
    """

    data: Tensor
    scales: Tensor
    zeros: Tensor | None
    shape: tuple[int, int]
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def padded_cols(self) -> int:
        return self.scales.shape[-1] * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes + scales + zero points."""
        total = self.data.numel() * self.data.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def codes(self) -> Tensor:
        """The unsigned integer codes, unpacked, ``(rows, padded_cols)`` int32."""
        return unpack_bits(self.data, self.bits).to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``(rows, cols)`` these codes stand for."""
        q = self.codes()
        if self.zeros is None:
            zero = torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.int32)
        else:
            zero = self.zeros.to(torch.int32)
        w = dequantize(q, self.scales, zero, group_size=self.group_size)
        return w[:, : self.shape[1]].to(dtype)


def quantize_groupwise(weight: Tensor, bits: int = 4, group_size: int | None = 64,
                       symmetric: bool = False) -> QuantizedTensor:
    """Group-wise quantization of a 2-D weight ``(out, in)`` along ``in`` (lesson 05).

    One scale (and zero point) per ``group_size`` consecutive input features of each output
    row, as GPTQ, AWQ and llama.cpp's Q4_0 (32) do. ``group_size=None`` means one group per
    row (per-channel), and so does a ``group_size`` larger than the row. Columns are
    zero-padded to a multiple of the group size (zeros do not change a group's range, which
    always contains 0). Group sizes must hold whole bytes of codes: a multiple of 2 (4 bits),
    4 (2 bits) or 8 (3 bits).
    """
    bits = _check_bits(bits)
    if not torch.is_tensor(weight) or weight.dim() != 2:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"quantize_groupwise expects a 2-D weight (out_features, in_features), "
                         f"got {shape}")
    rows, cols = weight.shape
    unit = max(2, _CODES_PER_UNIT[bits])
    if group_size is not None:
        group_size = _check_group_size(group_size)
        if group_size % unit:
            raise ValueError(f"group_size={group_size} with bits={bits}: use a multiple of "
                             f"{unit} ({unit} codes of {bits} bits fill whole bytes)")
    whole_row = cols + (-cols) % unit
    if group_size is None or group_size > whole_row:
        group_size = whole_row  # one group per row: no padding past the row
    w = weight.detach().float()
    pad = (-cols) % group_size
    if pad:
        w = F.pad(w, (0, pad))
    scale, zero = quant_params(w, bits, symmetric, group_size=group_size)
    q = quantize(w, scale, zero, bits, symmetric=symmetric, group_size=group_size)
    if symmetric:
        q = q + 2 ** (bits - 1)  # stored unsigned
        zeros = None
    else:
        zeros = zero.to(torch.uint8)
    return QuantizedTensor(data=pack_bits(q, bits), scales=scale.contiguous(), zeros=zeros,
                           shape=(rows, cols), bits=bits, group_size=group_size)


def quantize_groupwise_int4(weight: Tensor, group_size: int = 64
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(packed uint8 (out, in/2), scales (out, in/g), zeros uint8 (out, in/g))``.

    Asymmetric 4-bit group-wise quantization with packing, lesson 05's exercise 5.2; the
    tuple form of :func:`quantize_groupwise` (``in`` must be a multiple of ``group_size``).
    """
    if weight.dim() != 2 or weight.shape[1] % group_size:
        raise ValueError(f"weight must be 2-D with in_features a multiple of group_size="
                         f"{group_size}, got shape {tuple(weight.shape)}")
    qt = quantize_groupwise(weight, bits=4, group_size=group_size, symmetric=False)
    return qt.data, qt.scales, qt.zeros


# --------------------------------------------------------------------------------------
# Error analysis (lesson 05, section 2)
# --------------------------------------------------------------------------------------

def quantization_error(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    """MSE, max |error| and SQNR in dB (``10 log10(sum x^2 / sum (x - x_hat)^2)``), lesson 05.

    SQNR is ``inf`` when the reconstruction is exact; about 6 dB per bit for uniform data.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    x = x.detach().double()
    err = x - x_hat.detach().double()
    noise = float((err**2).sum())
    signal = float((x**2).sum())
    if noise == 0:
        sqnr = math.inf
    elif signal == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(signal / noise)
    return {"mse": float((err**2).mean()), "max_abs": float(err.abs().max()), "sqnr_db": sqnr}


def outlier_effect(x: Tensor, outlier: float = 60.0, bits: int = 8,
                   symmetric: bool = True) -> dict[str, float]:
    """What one outlier does to a per-tensor scale (Dettmers et al. 2022, LLM.int8()).

    Quantizes ``x`` per tensor, then the same ``x`` with its first entry set to
    ``outlier``, and reports both scales, the SQNR on the *other* entries, and the share of
    those entries that now round to code 0 (their information is gone). Lesson 05.
    """
    flat = x.detach().float().reshape(-1).clone()
    if flat.numel() < 2:
        raise ValueError("outlier_effect needs at least 2 values")
    with_outlier = flat.clone()
    with_outlier[0] = outlier
    rest = slice(1, None)
    out: dict[str, float] = {}
    for tag, t in (("clean", flat), ("outlier", with_outlier)):
        scale, zp = quant_params(t, bits, symmetric)
        q = quantize(t, scale, zp, bits, symmetric=symmetric)
        t_hat = dequantize(q, scale, zp)
        out[f"scale_{tag}"] = float(scale)
        out[f"sqnr_db_{tag}"] = quantization_error(t[rest], t_hat[rest])["sqnr_db"]
        out[f"zero_code_share_{tag}"] = float((q[rest] == zp).float().mean())
    out["scale_ratio"] = out["scale_outlier"] / out["scale_clean"]
    return out


# --------------------------------------------------------------------------------------
# Whole models: fake quantization (quality) and packed storage (size), lesson 05
# --------------------------------------------------------------------------------------

def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by name, ``lm_head`` only when ``include_lm_head``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_lm_head or not _is_lm_head(name))}


def _untie_lm_head(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight, so quantizing it leaves the embedding in float."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False
        # transformers re-ties on some calls (e.g. save_pretrained) when this map says so
        if getattr(model, "_tied_weights_keys", None):
            model._tied_weights_keys = {}


def _copy_for_quantization(model: nn.Module, include_lm_head: bool) -> nn.Module:
    q = copy.deepcopy(model).eval()
    if include_lm_head:
        _untie_lm_head(q)
    return q


def fake_quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 64,
                        symmetric: bool = False, include_lm_head: bool = False) -> nn.Module:
    """A copy whose Linear weights are quantized then dequantized ("fake quant"), lesson 05.

    Same numbers as the packed model (:func:`pack_model` then :func:`unpack_model`), kept in
    float so the quality can be measured with the ordinary forward pass.
    ``group_size=None``: per output channel. The original model is not changed.
    """
    _check_bits(bits)
    q = _copy_for_quantization(model, include_lm_head)
    with torch.no_grad():
        for lin in quantizable_linears(q, include_lm_head).values():
            qt = quantize_groupwise(lin.weight, bits, group_size, symmetric)
            lin.weight.copy_(qt.dequantize(lin.weight.dtype))
    return q


def pack_model(model: nn.Module, bits: int = 4, group_size: int | None = 64,
               symmetric: bool = False, include_lm_head: bool = False
               ) -> dict[str, QuantizedTensor]:
    """``{"<module>.weight": QuantizedTensor}`` for every quantized Linear, lesson 05."""
    return {f"{name}.weight": quantize_groupwise(lin.weight, bits, group_size, symmetric)
            for name, lin in quantizable_linears(model, include_lm_head).items()}


def packed_size_bytes(packed: Mapping[str, QuantizedTensor]) -> int:
    """Bytes the packed weights take in memory (codes + scales + zero points)."""
    return sum(qt.nbytes for qt in packed.values())


def unpack_model(model: nn.Module, packed: Mapping[str, QuantizedTensor],
                 rest: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` with the packed weights dequantized into its Linear layers.

    ``rest`` (the second value of :func:`load_packed`) fills in the float tensors too, so a
    freshly built model of the same config plus the file gives the quantized model back.
    """
    q = copy.deepcopy(model).eval()
    if any(_is_lm_head(k.removesuffix(".weight")) for k in packed):
        _untie_lm_head(q)
    with torch.no_grad():
        if rest is not None:
            own = q.state_dict()
            unknown = sorted(set(rest) - set(own))
            if unknown:
                raise ValueError(f"tensors {unknown[:3]} are not in this model: was the file "
                                 "saved from a model of another config?")
            tensors = dict(q.named_parameters()) | dict(q.named_buffers())
            for key, value in rest.items():
                tensors[key].copy_(value)
        for key, qt in packed.items():
            param = q.get_parameter(key)
            if tuple(param.shape) != qt.shape:
                raise ValueError(f"{key}: the packed weight has shape {qt.shape}, the model's "
                                 f"is {tuple(param.shape)}: was it packed from another model?")
            param.copy_(qt.dequantize(param.dtype))
    return q


_PACKED_SUFFIXES = (".qdata", ".scales", ".zeros")


def save_packed(path: str | os.PathLike, packed: Mapping[str, QuantizedTensor],
                model: nn.Module | None = None) -> Path:
    """Write packed weights (and, given ``model``, its other tensors) as one safetensors file.

    The file is the real storage size: uint8 codes, float32 scales, uint8 zero points, and
    the float tensors that were not quantized (embeddings, norms). Written atomically.
    """
    from safetensors.torch import save

    from utils.io import atomic_write_bytes

    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for key, qt in packed.items():
        tensors[f"{key}.qdata"] = qt.data.contiguous()
        tensors[f"{key}.scales"] = qt.scales.contiguous()
        if qt.zeros is not None:
            tensors[f"{key}.zeros"] = qt.zeros.contiguous()
        layout[key] = {"shape": list(qt.shape), "bits": qt.bits, "group_size": qt.group_size}
    if model is not None:
        seen: set[int] = set()
        for key, t in model.state_dict().items():
            if key in packed or t.data_ptr() in seen:  # a tied weight is stored once
                continue
            seen.add(t.data_ptr())
            tensors[key] = t.detach().contiguous().clone()
    metadata = {"format": "utils.quantize.packed/1", "layout": json.dumps(layout, sort_keys=True)}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def safetensors_breakdown(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of a safetensors file by part: Linear weights, embedding, norms, header (lesson 05).

    Linear weights include their codes, scales and zero points (:func:`save_packed`'s
    ``.qdata``, ``.scales``, ``.zeros``) or their float ``.weight``; ``header`` is what the
    file holds beyond the tensors (the JSON header with names, shapes and metadata). The parts
    sum to the file size. This is why a file shrinks less than its Linear weights: the
    embedding and norms stay float.
    """
    from safetensors import safe_open

    path = Path(path)
    parts = {"linear weights": 0, "embedding": 0, "norms": 0, "other tensors": 0}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            n = math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
            if "embed_tokens" in key or key.startswith("lm_head"):
                parts["embedding"] += n
            elif "norm" in key:
                parts["norms"] += n
            elif key.endswith((".qdata", ".scales", ".zeros", ".weight", ".bias")):
                parts["linear weights"] += n
            else:
                parts["other tensors"] += n
    parts["header"] = path.stat().st_size - sum(parts.values())
    return parts


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}


def load_packed(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], dict[str, Tensor]]:
    """Read :func:`save_packed`'s file: ``(packed weights, other float tensors)``."""
    from safetensors import safe_open

    packed: dict[str, QuantizedTensor] = {}
    rest: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "utils.quantize.packed/1":
            raise ValueError(f"{path} is not a packed-weights file written by save_packed "
                             f"(metadata format {meta.get('format')!r})")
        layout = json.loads(meta["layout"])
        for key, info in layout.items():
            zeros_key = f"{key}.zeros"
            packed[key] = QuantizedTensor(
                data=f.get_tensor(f"{key}.qdata"), scales=f.get_tensor(f"{key}.scales"),
                zeros=f.get_tensor(zeros_key) if zeros_key in f.keys() else None,
                shape=tuple(info["shape"]), bits=int(info["bits"]),
                group_size=int(info["group_size"]))
        for key in f.keys():
            if not key.endswith(_PACKED_SUFFIXES) or key.rsplit(".", 1)[0] not in layout:
                rest[key] = f.get_tensor(key)
    return packed, rest


# --------------------------------------------------------------------------------------
# Activation-aware scaling in the spirit of AWQ (Lin et al. 2023), lesson 05
# --------------------------------------------------------------------------------------

def _collect_linear_inputs(model: nn.Module, linears: Mapping[str, nn.Linear],
                           input_ids: Tensor, max_rows: int) -> tuple[dict, dict]:
    mean_abs: dict[str, Tensor] = {}
    samples: dict[str, Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_module, args, _output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (rows, in)
            mean_abs[name] = mean_abs.get(name, 0) + x.abs().sum(0)
            kept = samples.get(name)
            samples[name] = x if kept is None else torch.cat([kept, x])[:max_rows]
        return fn

    for name, lin in linears.items():
        hooks.append(lin.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    for name in mean_abs:
        mean_abs[name] = mean_abs[name] / samples[name].shape[0]
    return mean_abs, samples


def awq_quantize_model(model: nn.Module, calibration_ids: Tensor, bits: int = 4,
                       group_size: int | None = 64, symmetric: bool = False,
                       include_lm_head: bool = False, n_grid: int = 11,
                       max_rows: int = 1024) -> tuple[nn.Module, dict[str, float]]:
    """Activation-aware scaling before round-to-nearest, after AWQ (Lin et al. 2023).

    For each Linear, input channels with large mean |activation| (measured on
    ``calibration_ids``) are scaled up by ``s = mean|x|^alpha`` before quantization and the
    dequantized weight is divided by ``s`` again (AWQ folds that ``1/s`` into the previous
    op; numerically it is the same). ``alpha`` is searched on a grid in [0, 1] to minimise
    the layer's output error ``||X W^T - X Q(W s)^T / s||^2`` on the calibration rows;
    ``alpha = 0`` is plain round-to-nearest, so per layer it never does worse than RTN.
    A simplification: AWQ searches per block with the block's output, we do it per layer.
    Returns ``(model copy, {layer: chosen alpha})``.
    """
    _check_bits(bits)
    q = _copy_for_quantization(model, include_lm_head)
    linears = quantizable_linears(q, include_lm_head)
    mean_abs, samples = _collect_linear_inputs(q, linears, calibration_ids, max_rows)
    alphas: dict[str, float] = {}
    grid = torch.linspace(0, 1, n_grid).tolist()
    with torch.no_grad():
        for name, lin in linears.items():
            w = lin.weight.detach().float()
            x = samples[name]  # (rows, in)
            ref = x @ w.T
            act = mean_abs[name].clamp(min=1e-8)
            best = (math.inf, 0.0, None)
            for alpha in grid:
                s = act**alpha
                s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
                w_hat = quantize_groupwise(w * s, bits, group_size, symmetric).dequantize() / s
                err = float(((x @ w_hat.T - ref) ** 2).mean())
                if err < best[0]:
                    best = (err, alpha, w_hat)
            alphas[name] = best[1]
            lin.weight.copy_(best[2].to(lin.weight.dtype))
    return q, alphas


# --------------------------------------------------------------------------------------
# Measurements: KL to the reference, top-1 flips, latency, size (lesson 05)
# --------------------------------------------------------------------------------------

def _check_logits(ref_logits: Tensor, logits: Tensor, mask: Tensor | None) -> Tensor:
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and logits "
                         f"{tuple(logits.shape)} must have the same shape (..., V)")
    lead = ref_logits.shape[:-1]
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=ref_logits.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have shape {tuple(lead)} (the logits without the vocabulary "
                         f"axis), got {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("mask selects no position: nothing to measure")
    return mask


def kl_to_reference(ref_logits: Tensor, logits: Tensor, mask: Tensor | None = None) -> float:
    """Mean ``KL(P_ref || P_quant)`` in nats over the positions ``mask`` keeps, lesson 05.

    llama.cpp's ``llama-perplexity --kl-divergence`` statistic: the reference (full
    precision) distribution is the one the expectation is taken under. Logits ``(..., V)``.
    """
    mask = _check_logits(ref_logits, logits, mask)
    ref_logp = F.log_softmax(ref_logits.detach().double(), dim=-1)
    logp = F.log_softmax(logits.detach().double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (...,)
    return float(kl[mask].mean())


def top1_flip_rate(ref_logits: Tensor, logits: Tensor, mask: Tensor | None = None) -> float:
    """Share of kept positions whose most likely token changed (1 - llama.cpp's "same top p").

    Dutta et al. (2024): quantized models can keep their accuracy while flipping many
    answers. Ties are broken the way ``torch.argmax`` does (first index). Lesson 05.
    """
    mask = _check_logits(ref_logits, logits, mask)
    flips = ref_logits.argmax(-1) != logits.argmax(-1)
    return float(flips[mask].float().mean())


def kl_and_flip_rate(ref_logits: Tensor, logits: Tensor,
                     mask: Tensor | None = None) -> tuple[float, float]:
    """``(kl_to_reference, top1_flip_rate)`` in one call (lesson 05's exercise)."""
    return kl_to_reference(ref_logits, logits, mask), top1_flip_rate(ref_logits, logits, mask)


def scale_bits_per_weight(scale_bits: int, group_size: int, zero_point_bits: int = 0) -> float:
    """Extra bits each weight pays for its group's scale (and zero point), lesson 05.

    One ``scale_bits``-bit scale shared by ``group_size`` weights costs
    ``scale_bits / group_size`` bits per weight: an fp32 scale at group 32 costs
    32 / 32 = 1.0, an fp16 scale 16 / 32 = 0.5 (Q4_0: 4 + 0.5 = 4.5 bits per weight).
    """
    if scale_bits <= 0 or group_size <= 0 or zero_point_bits < 0:
        raise ValueError("scale_bits and group_size must be positive, zero_point_bits >= 0")
    return (scale_bits + zero_point_bits) / group_size


def weight_statistics(model: nn.Module, bits: int = 4, group_size: int | None = 32
                      ) -> list[dict[str, Any]]:
    """Per quantizable Linear: shape, excess kurtosis, outlier share and round-trip SQNR.

    ``kurtosis`` is the excess kurtosis of the weights (0 for a Gaussian; heavy tails, i.e.
    a few large weights that stretch a group's scale, make it positive);
    ``outlier_share`` the share of weights beyond 4 standard deviations of their matrix
    (a Gaussian has 0.006 %); ``sqnr_db`` the signal-to-noise ratio of the
    ``bits``/``group_size`` round trip; ``group_max_over_std`` the median over groups of
    ``max|w| / std(w)`` inside the group, which sets how coarse the group's code step is
    (lesson 05, why a model loses more at 4 bits).
    """
    rows = []
    for name, lin in quantizable_linears(model).items():
        w = lin.weight.detach().double()
        z = (w - w.mean()) / w.std()
        qt = quantize_groupwise(lin.weight.detach(), bits, group_size)
        flat = w.flatten()
        g = group_size or w.shape[1]
        usable = (w.shape[1] // g) * g
        groups = w[:, :usable].reshape(w.shape[0], -1, g) if usable else w[:, None, :]
        ratio = groups.abs().amax(-1) / groups.std(-1).clamp_min(1e-12)
        rows.append({"layer": name, "shape": tuple(w.shape),
                     "kind": name.rsplit(".", 1)[-1],
                     "kurtosis": float((z ** 4).mean() - 3.0),
                     "outlier_share": float((z.abs() > 4).double().mean()),
                     "group_max_over_std": float(ratio.median()),
                     "sqnr_db": quantization_error(flat.float(),
                                                   qt.dequantize().flatten().float())["sqnr_db"]})
    return rows


def layer_sensitivity(model: nn.Module, logits_fn: Any, reference: Sequence[tuple], bits: int = 4,
                      group_size: int | None = 32) -> list[dict[str, Any]]:
    """KL to the float model and top-1 flips when **one** Linear at a time is quantized.

    ``logits_fn(model)`` returns batches ``(logits, labels, mask)`` on a fixed evaluation set,
    and ``reference`` is ``logits_fn(model)`` of the float model. Each layer's weight is
    round-tripped (``bits``, ``group_size``) in place, measured, then restored: the model is
    unchanged afterwards. Token-weighted means over the batches. Lesson 05.
    """
    n = sum(int(mask.sum()) for _, _, mask in reference)
    rows = []
    for name, lin in quantizable_linears(model).items():
        saved = lin.weight.detach().clone()
        try:
            with torch.no_grad():
                lin.weight.copy_(quantize_groupwise(saved, bits, group_size)
                                 .dequantize(saved.dtype))
            batches = logits_fn(model)
        finally:
            with torch.no_grad():
                lin.weight.copy_(saved)
        kl = flips = 0.0
        for (ref, _, mask), (got, _, _) in zip(reference, batches, strict=True):
            k, f = kl_and_flip_rate(ref, got, mask)
            kl, flips = kl + k * int(mask.sum()) / n, flips + f * int(mask.sum()) / n
        rows.append({"layer": name, "kind": name.rsplit(".", 1)[-1], "kl_to_fp32": kl,
                     "top1_flip_rate": flips})
    return rows


def top1_margins(batches: Sequence[tuple]) -> Tensor:
    """Gap between the largest and second-largest logit at every kept position (lesson 05).

    A small gap means a close call: the same rounding noise flips it more easily.
    """
    gaps = []
    for logits, _, mask in batches:
        top2 = logits.float().topk(2, dim=-1).values           # (B, T, 2)
        gaps.append((top2[..., 0] - top2[..., 1])[mask.bool()])
    return torch.cat(gaps)


def latency_ms(model: nn.Module, input_ids: Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of one forward pass in milliseconds (after ``warmup`` passes)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(input_ids=input_ids)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


def _tensor_bytes(t: Tensor) -> int:
    """Bytes a weight takes as stored, looking inside quantized tensor types."""
    if type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        # a tensor subclass (torchao Int8Tensor...): the sum of the tensors it is made of
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names
                   if torch.is_tensor(getattr(t, n, None)))
    if t.is_quantized:  # torch.ao qint8: 1 byte per value + its scales
        total = t.numel() * t.element_size()
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            total += 8 * (t.q_per_channel_scales().numel()
                          + t.q_per_channel_zero_points().numel())
        else:
            total += 8 + 8
        return total
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module | Mapping[str, QuantizedTensor],
                        include_lm_head: bool = False) -> int:
    """Bytes of the Linear weights as stored (float, torchao int8, torch.ao int8 or packed).

    ``lm_head`` is counted only with ``include_lm_head`` (it is the embedding when tied).
    """
    if isinstance(model, Mapping):
        return packed_size_bytes({k: v for k, v in model.items()
                                  if include_lm_head or not _is_lm_head(k.removesuffix(".weight"))})
    total = 0
    for name, module in model.named_modules():
        if _is_lm_head(name) and not include_lm_head:
            continue
        if isinstance(module, nn.Linear):
            total += _tensor_bytes(module.weight)
        elif hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            total += _tensor_bytes(module.weight())  # torch.ao dynamic quantized Linear
    return total


# --------------------------------------------------------------------------------------
# The libraries: torch.ao quantize_dynamic, torchao, TorchAoConfig (lesson 05)
# --------------------------------------------------------------------------------------

def _silence_torchao() -> None:
    for name in ("torchao", "torch.ao", "torch._dynamo", "torch._inductor",
                 "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quantize_dynamic_int8(model: nn.Module, include_lm_head: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` copy: int8 weights, int8 activations per call.

    Weights per tensor symmetric (``max|w| / 127.5``, as :func:`quant_params`); activations
    are quantized dynamically per tensor at every forward. Deprecated upstream in favour of
    torchao but still the quickest CPU speed-up. Lesson 05.
    """
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    q = _copy_for_quantization(model, include_lm_head)
    spec = {name: default_dynamic_qconfig for name in quantizable_linears(q, include_lm_head)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(q, spec, dtype=torch.qint8, inplace=True)


def torchao_int8_weight_only(model: nn.Module, include_lm_head: bool = False) -> nn.Module:
    """torchao ``quantize_(model, Int8WeightOnlyConfig())`` on a copy (per-row symmetric int8)."""
    _silence_torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        q = _copy_for_quantization(model, include_lm_head)
        keep = set(quantizable_linears(q, include_lm_head))
        quantize_(q, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in keep)
    return q


def load_with_torchao_config(folder: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, quantization_config=TorchAoConfig(int8))``.

    transformers quantizes the Linear layers while loading and leaves the output embedding
    (``lm_head``) in float by default, like ``include_lm_head=False`` here. Lesson 05.
    """
    _silence_torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
        kwargs.setdefault("dtype", torch.float32)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                    **kwargs).eval()


# --------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format) with the gguf package, loaded back by transformers
# --------------------------------------------------------------------------------------

GGUF_QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's Q/K row order (``convert_hf_to_gguf.py`` ``LlamaModel.permute``).

    transformers' GGUF loader applies the inverse when it reads the file back.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """Vocabulary, merges and special ids of a byte-level BPE tokenizer, llama.cpp's "gpt2".

    transformers rebuilds a GGUF tokenizer from ``tokenizer.ggml.model`` = ``gpt2``
    (byte-level BPE, what GPT-2/Llama-3/Qwen use), ``llama`` (SentencePiece) or ``t5``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"tokenizer must be a transformers fast tokenizer or a tokenizers."
                        f"Tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(
            f"write_gguf can store a byte-level BPE tokenizer (tokenizer.ggml.model='gpt2'); this "
            f"one is a {model.get('type')} model with pre-tokenizer {pre[:80]}. Pass "
            "tokenizer=None to write the weights only (the model still loads with gguf_file=, "
            "the tokenizer then comes from the folder's tokenizer.json).")
    vocab = dict(model["vocab"])
    special_ids = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special_ids.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for tok, idx in vocab.items():
        tokens[idx] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = [3 if i in special_ids else 1 for i in range(size)]  # 3 CONTROL, 1 NORMAL
    fields: dict[str, Any] = {"tokens": tokens, "merges": merges, "types": types}
    for name in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{name}_token", None)
        if isinstance(token, str) and token in vocab:
            fields[f"{name}_id"] = vocab[token]
    return fields


def write_gguf(model: nn.Module, path: str | os.PathLike, qtype: str = "Q8_0",
               tokenizer: Any = None, embedding_qtype: str | None = None,
               name: str = "distill-and-deploy") -> dict[str, str]:
    """Write a Llama model as a GGUF file (llama.cpp's format) with the ``gguf`` package.

    2-D weights are quantized with ``gguf.quants.quantize`` to ``qtype`` (Q8_0: 8-bit
    blocks of 32 with an fp16 scale; Q4_0: 4-bit blocks of 32, symmetric); a weight whose
    row length is not a multiple of 32 falls back to F16 (llama.cpp does the same); norms
    stay F32. ``embedding_qtype`` overrides the type of the token embedding (default: the
    same as ``qtype``). With a byte-level BPE ``tokenizer`` its vocabulary is stored too, so
    ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` works; without one the file
    holds the weights and the config (enough for ``AutoModelForCausalLM``). Written
    atomically. Returns ``{gguf tensor name: type written}``. Lesson 05.
    """
    import gguf

    qtype = qtype.upper()
    emb_qtype = (embedding_qtype or qtype).upper()
    for q in (qtype, emb_qtype):
        if q not in GGUF_QTYPES:
            raise ValueError(f"qtype {q!r} is not supported here: use one of {GGUF_QTYPES}")
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        raise ValueError("write_gguf writes the llama architecture: pass a LlamaForCausalLM "
                         f"(got model_type {getattr(config, 'model_type', None)!r})")
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    written: dict[str, str] = {}
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(rope_theta)
        writer.add_vocab_size(config.vocab_size)
        file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
                     "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}[qtype]
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            tok = _gguf_tokenizer_fields(tokenizer)
            extra = config.vocab_size - len(tok["tokens"])
            if extra < 0:
                raise ValueError(f"the tokenizer has {len(tok['tokens'])} tokens, more than the "
                                 f"model's vocab_size {config.vocab_size}: pass the model's own "
                                 "tokenizer")
            # rows of the embedding no token uses (a vocabulary padded to a round size)
            tok["tokens"] += [f"[PAD{i}]" for i in range(len(tok["tokens"]), config.vocab_size)]
            tok["types"] += [5] * extra  # 5: UNUSED
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tok["tokens"])
            writer.add_token_types(tok["types"])
            writer.add_token_merges(tok["merges"])
            for key, add in (("bos_id", writer.add_bos_token_id),
                             ("eos_id", writer.add_eos_token_id),
                             ("unk_id", writer.add_unk_token_id),
                             ("pad_id", writer.add_pad_token_id)):
                if key in tok:
                    add(tok[key])
        else:
            for key, add in (("bos_token_id", writer.add_bos_token_id),
                             ("eos_token_id", writer.add_eos_token_id),
                             ("pad_token_id", writer.add_pad_token_id)):
                value = getattr(config, key, None)
                if isinstance(value, int):
                    add(value)

        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        state = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp writes output.weight only when it is not the embedding
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(base)
            if gguf_name is None:
                if "rotary_emb" in hf_name:
                    continue
                raise ValueError(f"no GGUF name for tensor {hf_name!r}")
            gguf_name = f"{gguf_name}.{suffix}"
            data = tensor.detach().float().cpu().numpy()
            if hf_name.endswith("q_proj.weight"):
                data = _llama_permute(data, n_head, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = _llama_permute(data, n_head, n_kv)
            want = emb_qtype if gguf_name.startswith("token_embd") else qtype
            if data.ndim == 1:
                want = "F32"
            elif want.startswith("Q") and data.shape[-1] % 32:
                want = "F16"
            ggml_type = gguf.GGMLQuantizationType[want]
            q = gguf.quants.quantize(np.ascontiguousarray(data), ggml_type)
            writer.add_tensor(gguf_name, q, raw_dtype=ggml_type if want.startswith("Q") else None)
            written[gguf_name] = want
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: ggml type name}`` of a GGUF file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def read_gguf_tensors(path: str | os.PathLike, unpermute: bool = True) -> dict[str, Tensor]:
    """Every tensor of a llama GGUF file, dequantized to float32, under transformers' names.

    Uses ``gguf.GGUFReader`` and ``gguf.quants.dequantize`` only (no transformers), and
    undoes llama.cpp's Q/K row permutation when ``unpermute``. Lesson 05.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    n_layers = int(field("llama.block_count"))
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv") or n_head)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    reverse: dict[str, str] = {}
    hf_names = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(n_layers):
        hf_names += [f"model.layers.{i}.{m}" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")]
    for hf in hf_names:
        g = name_map.get_name(hf)
        if g is not None:
            reverse[g] = hf
    out: dict[str, Tensor] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        hf = reverse.get(base)
        if hf is None:
            raise ValueError(f"unexpected tensor {t.name!r} in {path}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        if unpermute and re.search(r"attn_[qk]$", base):
            heads = n_head if base.endswith("attn_q") else n_kv
            dim = data.shape[0] // heads // 2
            data = data.reshape(heads, dim, 2, *data.shape[1:]).swapaxes(1, 2).reshape(shape)
        out[f"{hf}.{suffix}"] = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    return out


def load_gguf_model(folder: str | os.PathLike, gguf_file: str, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` in float32, eval mode.

    transformers 5 reads llama GGUF files through its legacy loader, which dequantizes every
    tensor at load time: the file is small, the model in memory is float again.
    """
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    # The loader draws a tqdm bar on stderr that no transformers setting turns off.
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file,
                                                        **kwargs).eval()
    finally:
        gguf_utils.tqdm = original
