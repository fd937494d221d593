"""Checks for lesson 05's exercises (quantization).

- :func:`check_quantize_dequantize`: ``fn(x, bits) -> (q, scale, zero_point)``, asymmetric
  per-tensor affine quantization (codes ``0 .. 2^bits - 1``, the range widened to contain 0);
- :func:`check_quantize_groupwise_int4`: ``fn(weight, group_size) -> (packed, scales, zeros)``,
  asymmetric 4-bit group-wise quantization along the input features, two codes per byte
  (element ``2i`` in the low nibble);
- :func:`check_kl_and_flip_rate`: ``fn(ref_logits, logits, mask) -> (kl, flip_rate)``,
  ``KL(P_ref || P_quant)`` averaged over the kept positions and the share of kept positions
  whose top-1 token changed.

Each compares the learner's answer with :mod:`utils.quantize` on known cases and says which
classic mistake the difference points to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from utils.checks import CheckFailed, CheckResult, expect, expect_close, run_check
from utils.quantize import (
    affine_quantize,
    dequantize,
    kl_to_reference,
    quantize_groupwise_int4,
    top1_flip_rate,
    unpack_int4,
)

__all__ = ["check_kl_and_flip_rate", "check_quantization_choice", "check_quantize_dequantize",
           "check_quantize_groupwise_int4", "quantization_experiment"]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value).detach().cpu()
    except Exception as exc:  # noqa: BLE001 - turned into a learner-facing message
        raise CheckFailed(f"{what}: could not read it as a tensor ({exc})") from None


def _codes_agree(q: torch.Tensor, q_ref: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor) -> torch.Tensor:
    """Per element: the same code, or one code away where ``x / scale`` sits on a .5 tie.

    ``round(x / scale)`` and ``round(x * (1 / scale))`` (PyTorch's way) can differ there.
    """
    v = x.double() / scale.double()
    near_tie = ((v - v.floor()) - 0.5).abs() < 1e-3
    diff = (q.to(torch.int64) - q_ref.to(torch.int64)).abs()
    return (diff == 0) | (near_tie & (diff <= 1))


def _triple(out: Any, names: str) -> tuple[Any, Any, Any]:
    expect(isinstance(out, tuple | list) and len(out) == 3,
           f"return a tuple {names}, got {type(out).__name__}"
           + (f" of length {len(out)}" if isinstance(out, tuple | list) else ""))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------
# Exercise 5.1: scale, zero point, quantize
# --------------------------------------------------------------------------------------

def check_quantize_dequantize(fn: Callable[..., Any], exercise: str = "5.1") -> CheckResult:
    """Check ``fn(x, bits) -> (q, scale, zero_point)`` (asymmetric, per tensor)."""

    def one(x: torch.Tensor, bits: int, label: str) -> tuple:
        q, scale, zp = _triple(fn(x.clone(), bits), "(q, scale, zero_point)")
        q = _as_tensor(q, f"q for {label}").double()
        scale = float(_as_tensor(scale, f"scale for {label}").reshape(-1)[0])
        zp_t = _as_tensor(zp, f"zero_point for {label}").double().reshape(-1)
        expect(zp_t.numel() == 1, f"{label}: per-tensor quantization has ONE zero point, "
                                  f"got {zp_t.numel()}")
        zp = float(zp_t[0])
        expect(tuple(q.shape) == tuple(x.shape),
               f"{label}: q should have the shape of x {tuple(x.shape)}, got {tuple(q.shape)}")
        expect(math.isfinite(scale) and scale > 0,
               f"{label}: scale must be a positive finite number, got {scale}")
        expect(torch.equal(q, q.round()) and zp == round(zp),
               f"{label}: q and zero_point must be whole numbers (integer codes); "
               "did you forget to round?")
        return q, scale, zp

    def cases(fn: Callable[..., Any]) -> None:
        # 1. a known example: range [-1, 2], 8 bits
        x = torch.tensor([-1.0, 0.0, 0.6, 2.0])
        q_ref, s_ref, z_ref = affine_quantize(x, 8)
        q, scale, zp = one(x, 8, "x = [-1, 0, 0.6, 2], bits=8")
        if abs(scale - float(s_ref)) > 1e-6 * float(s_ref):
            hint = ""
            if math.isclose(scale, 2.0 / 255, rel_tol=1e-4):
                hint = " It looks like max / (2^bits - 1): use the whole range, (max - min)."
            elif math.isclose(scale, 3.0 / 256, rel_tol=1e-4):
                hint = " It looks like (max - min) / 2^bits: there are 2^bits - 1 steps."
            raise CheckFailed(f"scale for x = [-1, 0, 0.6, 2], bits=8: expected "
                              f"(max - min) / (2^bits - 1) = {float(s_ref):.6g}, got {scale:.6g}."
                              + hint)
        expect(zp == float(z_ref),
               f"zero_point for x = [-1, 0, 0.6, 2], bits=8: expected round(-min / scale) = "
               f"{int(z_ref)}, got {zp:g} (off by {zp - float(z_ref):+g}). The zero point is "
               "the code that stands for 0.0"
               + (": 0 is the symmetric choice, this exercise is asymmetric (codes 0 .. "
                  "2^bits - 1)." if zp == 0 else "."))
        expect(bool(_codes_agree(q, q_ref, x, s_ref, z_ref).all()),
               f"q for x = [-1, 0, 0.6, 2], bits=8: expected {q_ref.tolist()}, got "
               f"{q.long().tolist()}")

        # 2. random values: rounding (not floor) and the round-trip bound |x - x_hat| <= scale/2
        g = torch.Generator().manual_seed(0)
        for bits in (8, 4):
            x = torch.randn(64, generator=g) * 3 + 0.5
            q_ref, s_ref, z_ref = affine_quantize(x, bits)
            q, scale, zp = one(x, bits, f"random x, bits={bits}")
            expect_close(scale, float(s_ref), f"scale for random x, bits={bits}", rtol=1e-5)
            expect(zp == float(z_ref), f"zero_point for random x, bits={bits}: expected "
                                       f"{int(z_ref)}, got {zp:g}")
            floor = torch.clamp(torch.floor(x / s_ref) + z_ref, 0, 2**bits - 1).double()
            if not bool(_codes_agree(q, q_ref, x, s_ref, z_ref).all()):
                if torch.equal(q, floor):
                    raise CheckFailed(f"q for random x, bits={bits}: you rounded down (floor or "
                                      "int()); use round-to-nearest (torch.round).")
                raise CheckFailed(f"q for random x, bits={bits}: {int((q != q_ref).sum())} of "
                                  f"{q.numel()} codes differ from round(x / scale) + zero_point")
            x_hat = (q - zp) * scale
            err = float((x.double() - x_hat).abs().max())
            expect(err <= scale / 2 + 1e-6,
                   f"random x, bits={bits}: the round trip error {err:.3g} exceeds scale/2 = "
                   f"{scale / 2:.3g}")

        # 3. clamping: the maximum lands on code 15.5 -> rounds to 16 unless clamped
        x = torch.tensor([-1.375, 0.0, 2.375])
        q, scale, zp = one(x, 4, "x = [-1.375, 0, 2.375], bits=4")
        expect(float(q.min()) >= 0 and float(q.max()) <= 15,
               f"x = [-1.375, 0, 2.375], bits=4: codes must stay in 0..15, got "
               f"{q.long().tolist()}. Clamp q to [0, 2^bits - 1] after adding the zero point.")

        # 4. all values positive: the range must still contain 0
        x = torch.tensor([0.5, 1.0, 2.0])
        q_ref, s_ref, z_ref = affine_quantize(x, 4)
        q, scale, zp = one(x, 4, "x = [0.5, 1, 2], bits=4")
        expect(math.isclose(scale, float(s_ref), rel_tol=1e-5) and zp == float(z_ref),
               f"x = [0.5, 1, 2], bits=4: expected scale {float(s_ref):.6g} and zero_point "
               f"{int(z_ref)}, got {scale:.6g} and {zp:g}. Widen the range to include 0 "
               "(min = min(x.min(), 0), max = max(x.max(), 0)) so 0.0 is exact.")

        # 5. edge cases: all equal and all zero
        x = torch.full((5,), 0.7)
        q, scale, zp = one(x, 8, "x = five times 0.7, bits=8")
        x_hat = (q - zp) * scale
        expect(float((x_hat - 0.7).abs().max()) <= 1e-6,
               f"x = five times 0.7: should come back as 0.7, got {x_hat.tolist()[:2]}")
        x = torch.zeros(4)
        q, scale, zp = one(x, 8, "x = all zeros, bits=8")
        x_hat = (q - zp) * scale
        expect(bool((x_hat == 0).all()),
               "x = all zeros: should come back as zeros. A zero range gives scale 0: replace "
               "it by 1 (any positive number) before dividing.")

    return run_check(exercise, "quantize_dequantize", fn, cases)


# --------------------------------------------------------------------------------------
# Exercise 5.2: group-wise int4 with packing
# --------------------------------------------------------------------------------------

def check_quantize_groupwise_int4(fn: Callable[..., Any], exercise: str = "5.2") -> CheckResult:
    """Check ``fn(weight, group_size) -> (packed uint8, scales, zeros)`` (4-bit, asymmetric)."""

    def cases(fn: Callable[..., Any]) -> None:
        g = torch.Generator().manual_seed(1)
        # rows with very different magnitudes: grouping along the wrong axis shows at once
        weight = torch.randn(16, 32, generator=g) * torch.logspace(-2, 1, 16).unsqueeze(1)
        group_size = 8
        packed, scales, zeros = _triple(fn(weight.clone(), group_size),
                                        "(packed, scales, zeros)")
        p_ref, s_ref, z_ref = quantize_groupwise_int4(weight, group_size)
        packed = _as_tensor(packed, "packed")
        scales = _as_tensor(scales, "scales").float()
        zeros = _as_tensor(zeros, "zeros")
        expect(tuple(scales.shape) == tuple(s_ref.shape),
               f"scales: expected shape {tuple(s_ref.shape)} (out_features, in_features / "
               f"group_size), got {tuple(scales.shape)}. Groups are consecutive input features "
               "(the last dimension) of each row.")
        expect(zeros.numel() == z_ref.numel(),
               f"zeros: expected shape {tuple(z_ref.shape)} (one zero point per group), got "
               f"{tuple(zeros.shape)}")
        zeros = zeros.reshape(scales.shape)
        if not torch.allclose(scales, s_ref, rtol=1e-5, atol=1e-8):
            wrong_axis = quantize_groupwise_int4(weight.T.contiguous(), group_size)[1]
            hint = ""
            if torch.allclose(torch.sort(scales.reshape(-1)).values,
                              torch.sort(wrong_axis.reshape(-1)).values, rtol=1e-5):
                hint = (" Your groups run along the output dimension; group consecutive INPUT "
                        "features of each row (weight.reshape(out, in // g, g)).")
            raise CheckFailed("scales differ from (max - min) / 15 of each group of "
                              f"{group_size} consecutive input features (max |diff| = "
                              f"{float((scales - s_ref).abs().max()):.3g})." + hint)
        expect(torch.equal(zeros.to(torch.int64), z_ref.to(torch.int64)),
               "zeros differ from round(-min / scale) of each group (with the group's range "
               "widened to include 0)")
        expect(packed.dtype == torch.uint8,
               f"packed must be uint8 bytes, got {packed.dtype}")
        expect(tuple(packed.shape) == tuple(p_ref.shape),
               f"packed: expected shape {tuple(p_ref.shape)} (two 4-bit codes per byte), got "
               f"{tuple(packed.shape)}")
        codes = unpack_int4(packed).to(torch.int64)
        ref_codes = unpack_int4(p_ref).to(torch.int64)
        agree = _codes_agree(codes, ref_codes, weight, s_ref.repeat_interleave(group_size, -1),
                             z_ref)
        if not bool(agree.all()):
            swapped = (p_ref >> 4) | ((p_ref & 0x0F) << 4)
            if torch.equal(packed, swapped):
                raise CheckFailed("packed: the nibbles are swapped. Element 2i goes in the LOW "
                                  "nibble and element 2i+1 in the high one: q[..., 0::2] | "
                                  "(q[..., 1::2] << 4).")
            raise CheckFailed(f"packed: {int((~agree).sum())} of {codes.numel()} "
                              "codes differ from clamp(round(w / scale) + zero, 0, 15) "
                              "(unpacked as low nibble first)")
        # round trip: within half a step of each group
        codes = unpack_int4(packed).to(torch.int32)
        w_hat = dequantize(codes, scales, zeros.to(torch.int32), group_size=group_size)
        step = scales.repeat_interleave(group_size, dim=-1)
        expect(bool(((weight - w_hat).abs() <= step / 2 + 1e-6).all()),
               "the dequantized weight is further than scale/2 from the original")

        # 3 rows, one group per row (group_size = in_features)
        weight = torch.randn(3, 16, generator=g)
        packed, scales, zeros = _triple(fn(weight.clone(), 16), "(packed, scales, zeros)")
        p_ref, s_ref, _ = quantize_groupwise_int4(weight, 16)
        packed = _as_tensor(packed, "packed")
        expect(packed.shape == p_ref.shape and packed.dtype == torch.uint8 and
               bool(_codes_agree(unpack_int4(packed), unpack_int4(p_ref), weight,
                                 s_ref.repeat_interleave(16, -1), 0).all()) and
               torch.allclose(_as_tensor(scales, "scales").float(), s_ref, rtol=1e-5),
               "a (3, 16) weight with group_size=16 (one group per row) gives a different "
               "result from the reference")

    return run_check(exercise, "quantize_groupwise_int4", fn, cases)


# --------------------------------------------------------------------------------------
# Exercise 5.3: KL to the reference and top-1 flip rate
# --------------------------------------------------------------------------------------

def check_kl_and_flip_rate(fn: Callable[..., Any], exercise: str = "5.3") -> CheckResult:
    """Check ``fn(ref_logits, logits, mask) -> (kl, flip_rate)`` on ``(B, T, V)`` logits."""

    def call(ref: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, label: str):
        out = fn(ref.clone(), logits.clone(), mask.clone())
        expect(isinstance(out, tuple | list) and len(out) == 2,
               f"return a tuple (kl, flip_rate), got {type(out).__name__}")
        try:
            kl, flip = float(out[0]), float(out[1])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckFailed(f"{label}: kl and flip_rate must be numbers ({exc})") from None
        expect(math.isfinite(kl) and math.isfinite(flip),
               f"{label}: got kl={kl}, flip_rate={flip}; both must be finite")
        return kl, flip

    def cases(fn: Callable[..., Any]) -> None:
        g = torch.Generator().manual_seed(2)
        ref = torch.randn(2, 5, 7, generator=g) * 2  # (B, T, V)
        mask = torch.ones(2, 5, dtype=torch.bool)

        kl, flip = call(ref, ref, mask, "identical logits")
        expect(abs(kl) < 1e-6, f"identical logits: expected kl = 0, got {kl:.3g}")
        expect(flip == 0, f"identical logits: expected flip_rate = 0, got {flip:.3g}")

        # a shift of all logits by a constant changes nothing (softmax is shift-invariant)
        kl, flip = call(ref, ref + 3.0, mask, "logits + 3")
        expect(abs(kl) < 1e-6,
               f"logits shifted by a constant: the distributions are the same, expected kl = 0, "
               f"got {kl:.3g}. Compare log_softmax, not raw logits.")
        expect(flip == 0,
               f"logits shifted by a constant: every top token is the same, expected "
               f"flip_rate = 0, got {flip:.3g}. Compare the argmax indices, not the maximum "
               "values.")

        # one known position where the two KL directions differ
        r = torch.tensor([[[3.0, 0.0, 0.0]]])
        q = torch.tensor([[[1.0, 1.0, 0.0]]])
        m1 = torch.ones(1, 1, dtype=torch.bool)
        kl, flip = call(r, q, m1, "one position")
        kl_ref = kl_to_reference(r, q, m1)
        kl_rev = kl_to_reference(q, r, m1)
        if not math.isclose(kl, kl_ref, rel_tol=1e-4, abs_tol=1e-6):
            if math.isclose(kl, kl_rev, rel_tol=1e-4):
                raise CheckFailed(f"kl for ref=[3,0,0], logits=[1,1,0]: got {kl:.4f}, which is "
                                  f"KL(P_quant || P_ref). The expectation is under the reference: "
                                  f"sum p_ref * (log p_ref - log p_quant) = {kl_ref:.4f}.")
            raise CheckFailed(f"kl for ref=[3,0,0], logits=[1,1,0]: expected {kl_ref:.4f} nats, "
                              f"got {kl:.4f}")
        expect(flip == 0.0, f"flip_rate for ref=[3,0,0], logits=[1,1,0]: both put token 0 "
                            f"first (a tie in logits goes to the first index, as torch.argmax "
                            f"does), expected 0, got {flip:g}")

        # random pairs with a mask: mean over the KEPT positions only
        noisy = ref + 1.5 * torch.randn(ref.shape, generator=g)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
        noisy[~mask] = -ref[~mask]  # masked positions flip for sure: they must not count
        kl, flip = call(ref, noisy, mask, "random logits with a mask")
        kl_ref = kl_to_reference(ref, noisy, mask)
        flip_ref = top1_flip_rate(ref, noisy, mask)
        kl_all = kl_to_reference(ref, noisy)
        flip_all = top1_flip_rate(ref, noisy)
        if not math.isclose(flip, flip_ref, abs_tol=1e-6):
            hint = ""
            if math.isclose(flip, flip_all, abs_tol=1e-6):
                hint = " You counted the masked positions too: keep only mask == True."
            elif math.isclose(flip, flip_ref * int(mask.sum()) / mask.numel(), abs_tol=1e-6):
                hint = " Divide by the number of kept positions, not by all positions."
            raise CheckFailed(f"flip_rate with a mask: expected {flip_ref:.4f}, got "
                              f"{flip:.4f}." + hint)
        if not math.isclose(kl, kl_ref, rel_tol=1e-4, abs_tol=1e-6):
            hint = ""
            if math.isclose(kl, kl_all, rel_tol=1e-4):
                hint = " You averaged over the masked positions too."
            elif math.isclose(kl, kl_ref * int(mask.sum()), rel_tol=1e-4):
                hint = " You summed over positions: take the mean over kept positions."
            elif math.isclose(kl, kl_ref * int(mask.sum()) / mask.numel(), rel_tol=1e-4):
                hint = " Divide by the number of kept positions, not by all positions."
            raise CheckFailed(f"kl with a mask: expected {kl_ref:.5f}, got {kl:.5f}." + hint)

        # ties: same logits with a tied maximum is not a flip; a different winner is
        tie = torch.tensor([[[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]])
        other = torch.tensor([[[2.0, 2.0, 0.0], [0.5, 1.0, 0.0]]])
        m2 = torch.ones(1, 2, dtype=torch.bool)
        _, flip = call(tie, other, m2, "tied maxima")
        expect(math.isclose(flip, 0.5, abs_tol=1e-6),
               f"flip_rate with a tied maximum: position 1 is unchanged (same logits), position "
               f"2's top token moved from 0 to 1, so expected 0.5, got {flip:g}. Compare the "
               "argmax indices, not the maximum values.")

    return run_check(exercise, "kl_and_flip_rate", fn, cases)


# ---------------------------------------------------------------- Exercise 5.4 (open experiment)
# Quantize the distilled student (section 10) to fit a size budget while staying close to its
# fp32 self. The check packs the student with the learner's settings (the size), fake-quantizes
# it with the same numbers and measures KL to fp32 and exact match on the lesson's evaluation
# set (every k-th test skill prompt, QUANT_N_EVAL of them, teacher-forced as in section 4).
QUANT_N_EVAL = 200  # the lesson's N_EVAL
# The budget: bytes of the student's quantized Linear weights (codes, scales, zero points) and
# the quality bars: KL to the fp32 student, nats per answer token, and at most this many more
# wrong answers than fp32 on the QUANT_N_EVAL prompts. Measured on the course machine,
# 2026-12-05 (tests/test_checks_quantize.py re-measures both ends): per-channel int8 takes
# 121,248 bytes (KL 2e-5); every layer at 4 bits keeps KL at 0.0029 or above (group 16, 104,208
# bytes, 4 answers lost; group 32, 84,168 bytes, KL 0.0048); 4 bits with group 64 but layers 0
# and 2 kept at int8 takes 104,472 bytes for KL 0.0016 and 1 answer gained.
QUANT_SIZE_BUDGET = 110_000
QUANT_KL_BAR = 0.0025
QUANT_MAX_ANSWERS_LOST = 2


# The evaluation batches per tokenizer (kept with it, so a reused id() cannot mix them up).
_EVAL_BATCHES: dict[int, tuple[Any, list[dict[str, torch.Tensor]]]] = {}


def _quant_eval_batches(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """The lesson's evaluation set (section 4): every k-th test skill prompt, padded batches."""
    entry = _EVAL_BATCHES.get(id(tokenizer))
    if entry is not None and entry[0] is tokenizer:
        return entry[1]
    from utils.data import load_world
    from utils.train import PadCollator, tokenize_chat

    test = [dict(r) for r in load_world("test")]
    skill = [r for r in test if r["kind"] == "skill" and r.get("answer") is not None]
    records = skill[::len(skill) // QUANT_N_EVAL][:QUANT_N_EVAL]
    enc = tokenize_chat({"messages": [r["messages"] for r in records]}, tokenizer, 256)
    features = [{"input_ids": i, "attention_mask": a, "labels": lab}
                for i, a, lab in zip(enc["input_ids"], enc["attention_mask"], enc["labels"],
                                     strict=True)]
    batches = [PadCollator(tokenizer.pad_token_id)(features[i:i + 100])
               for i in range(0, len(features), 100)]
    _EVAL_BATCHES[id(tokenizer)] = (tokenizer, batches)
    return batches


@torch.no_grad()
def _answer_logits(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    from utils.train import IGNORE_INDEX

    out = []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        out.append((logits[:, :-1].float(), labels, labels != IGNORE_INDEX))  # (B, T-1, V)
    return out


def _score_kl(ref: list[tuple], got: list[tuple]) -> tuple[int, float]:
    correct, kl_sum, n = 0, 0.0, 0
    for (r, labels, mask), (q, _, _) in zip(ref, got, strict=True):
        correct += int((((q.argmax(-1) == labels) | ~mask).all(-1)).sum())
        kl_sum += kl_to_reference(r, q, mask) * int(mask.sum())
        n += int(mask.sum())
    return correct, kl_sum / n


def quantization_experiment(model: Any, tokenizer: Any, *, bits: int, group_size: int | None,
                            symmetric: bool = False, keep_8bit: Any = ()) -> dict[str, Any]:
    """Exercise 5.4's experiment: size and quality of ``model`` quantized with these settings.

    Every Linear weight gets ``bits`` with ``group_size`` (``symmetric`` or not), except the
    layers whose name contains one of the strings in ``keep_8bit`` (e.g. ``"down_proj"``,
    ``"layers.0."``): those get section 5's int8 (per output channel, symmetric), the mixed
    precision that section 10's sensitivity suggests. Returns the packed Linear bytes, bits
    per weight, KL to the fp32 model (nats per answer token), exact answers of fp32 and of the
    quantized model on the lesson's evaluation set, and which layers stayed at 8 bits. A few
    seconds for the student. Call it to try settings before you commit to a choice.
    """
    import copy

    from utils.device import torch_threads
    from utils.quantize import quantizable_linears, quantize_groupwise

    keep = [str(k) for k in keep_8bit]
    batches = _quant_eval_batches(tokenizer)
    quantized = copy.deepcopy(model).eval()
    size, n_weights, kept = 0, 0, []
    with torch.no_grad():
        for name, lin in quantizable_linears(quantized).items():
            if any(k in name for k in keep):
                qt = quantize_groupwise(lin.weight, 8, None, True)
                kept.append(name)
            else:
                qt = quantize_groupwise(lin.weight, bits, group_size, symmetric)
            size += qt.nbytes
            n_weights += lin.weight.numel()
            lin.weight.copy_(qt.dequantize(lin.weight.dtype))
    with torch_threads(1):  # the same numbers in the notebook and in the tests
        ref = _answer_logits(model, batches)
        got = _answer_logits(quantized, batches)
    fp32_correct, _ = _score_kl(ref, ref)
    correct, kl = _score_kl(ref, got)
    return {"bytes": size, "bits_per_weight": 8 * size / n_weights, "kl_to_fp32": kl,
            "correct": correct, "fp32_correct": fp32_correct, "kept_8bit": kept,
            "n_eval": sum(len(b["input_ids"]) for b in batches)}


def check_quantization_choice(fn: Callable[[], Any], model: Any, tokenizer: Any,
                              exercise: str = "5.4") -> CheckResult:
    """Exercise 5.4: ``fn()`` returns ``{"bits", "group_size", "symmetric", "keep_8bit"}``;
    the quantized ``model`` must fit :data:`QUANT_SIZE_BUDGET` bytes with a KL to fp32 of at
    most :data:`QUANT_KL_BAR` and at most :data:`QUANT_MAX_ANSWERS_LOST` answers lost."""
    from utils.checks.experiment import Outcome, Setting, run_experiment
    from utils.quantize import SUPPORTED_BITS

    settings = (
        Setting("bits", kind="choice", choices=SUPPORTED_BITS, meaning="bits per code"),
        Setting("group_size", kind="int", low=2, high=4096, optional=True,
                meaning="weights sharing one scale (None: one per output row)"),
        Setting("symmetric", kind="choice", choices=(False, True),
                meaning="no zero point (True) or a zero point per group (False)"),
        Setting("keep_8bit", kind="names",
                meaning="parts of layer names kept at int8, e.g. ['down_proj'] or []"),
    )

    def measure(choice: dict[str, Any]) -> Outcome:
        from utils.quantize import quantizable_linears

        names = list(quantizable_linears(model))
        for part in choice["keep_8bit"]:
            expect(any(part in n for n in names),
                   f"keep_8bit: {part!r} is part of no Linear layer's name; the names look like "
                   f"{names[0]!r} ... {names[-1]!r}.")
        try:
            r = quantization_experiment(model, tokenizer, **choice)
        except ValueError as exc:  # e.g. a group size that does not hold whole bytes
            raise CheckFailed(f"these settings cannot be packed: {exc}") from None
        lost = r["fp32_correct"] - r["correct"]
        said = ", ".join(f"{k} = {v}" for k, v in choice.items())
        what = (f"{said} ({len(r['kept_8bit'])} layers at int8): {r['bytes']:,} bytes of Linear "
                f"weights ({r['bits_per_weight']:.2f} "
                f"bits per weight; budget {QUANT_SIZE_BUDGET:,}), KL to fp32 "
                f"{r['kl_to_fp32']:.4f} nats/token (bar {QUANT_KL_BAR:g}), {r['correct']} of "
                f"{r['n_eval']} answers exact vs {r['fp32_correct']} in fp32 ("
                f"{f'{lost} lost' if lost >= 0 else f'{-lost} gained'}; at most "
                f"{QUANT_MAX_ANSWERS_LOST} may be lost)")
        fits = r["bytes"] <= QUANT_SIZE_BUDGET
        good = r["kl_to_fp32"] <= QUANT_KL_BAR and lost <= QUANT_MAX_ANSWERS_LOST
        if fits and good:
            return Outcome(True, what + ". Both met.")
        if not fits:
            return Outcome(False, what + ". Over the size budget.",
                           "Work out what each setting costs per weight (the codes, and a scale "
                           "and zero point per group: section 9 prints the arithmetic) before "
                           "you measure.")
        return Outcome(False, what + ". Too far from fp32.",
                       "Within the budget, where does the error come from (section 3: "
                       "granularity; section 10: this student's sensitivity)? Spend the bytes "
                       "there; quantization_experiment(...) tries a setting in seconds.")

    return run_experiment(exercise, "choose_quantization", fn, settings, measure)
