"""Quantization by hand (utils/quantize.py): parameters, round trips, packing, models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.models import ModelConfig, build_model
from utils.quantize import (
    QuantizedTensor,
    affine_quantize,
    awq_quantize_model,
    dequantize,
    fake_quantize_model,
    kl_and_flip_rate,
    kl_to_reference,
    latency_ms,
    linear_weight_bytes,
    load_packed,
    outlier_effect,
    pack_bits,
    pack_int4,
    pack_model,
    packed_size_bytes,
    quant_params,
    quant_range,
    quantizable_linears,
    quantization_error,
    quantize,
    quantize_dequantize,
    quantize_groupwise,
    quantize_groupwise_int4,
    save_packed,
    top1_flip_rate,
    unpack_bits,
    unpack_int4,
    unpack_model,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, MLP 176, tied embeddings), random init."""
    config = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ scale and zero point

def test_known_asymmetric_parameters():
    x = torch.tensor([-1.0, 0.0, 0.6, 2.0])
    scale, zp = quant_params(x, bits=8)
    assert math.isclose(float(scale), 3.0 / 255, rel_tol=1e-6)
    assert int(zp) == 85  # round(1 / (3/255))
    q = quantize(x, scale, zp, 8)
    assert q.tolist() == [0, 85, 136, 255]
    assert dequantize(q, scale, zp)[1] == 0.0  # 0 is exact


def test_known_symmetric_parameters_follow_pytorch():
    x = torch.tensor([-2.0, 0.3, 1.0])
    scale, zp = quant_params(x, bits=8, symmetric=True)
    assert math.isclose(float(scale), 2.0 / 127.5, rel_tol=1e-6) and int(zp) == 0
    assert quant_range(8, True) == (-128, 127) and quant_range(4, False) == (0, 15)
    q = quantize(x, scale, zp, 8, symmetric=True)
    assert q.dtype == torch.int32 and int(q[2]) == 64  # 1.0 * 127.5 / 2 = 63.75
    assert int(q[0]) in (-128, -127)  # -127.5: a tie, up to float rounding of the scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, granularity):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 2 + 0.3
    kw = {"tensor": {}, "channel": {"axis": 0}, "group": {"group_size": 16}}[granularity]
    gs = kw.get("group_size")
    scale, zp = quant_params(x, bits, symmetric, **kw)
    q = quantize(x, scale, zp, bits, symmetric=symmetric, group_size=gs)
    qmin, qmax = quant_range(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    x_hat = dequantize(q, scale, zp, group_size=gs)
    step = scale if gs is None else scale.repeat_interleave(gs, dim=-1)
    assert bool(((x - x_hat).abs() <= step / 2 + 1e-6).all())


def test_per_channel_and_group_shapes():
    x = torch.randn(6, 32)
    assert quant_params(x, 8, axis=0)[0].shape == (6, 1)
    assert quant_params(x, 8, axis=1)[0].shape == (1, 32)
    assert quant_params(x, 8)[0].shape == ()
    assert quant_params(x, 4, group_size=8)[0].shape == (6, 4)


def test_finer_granularity_lowers_the_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g) * torch.logspace(-1, 1, 32).unsqueeze(1)
    sqnr = {name: quantization_error(w, quantize_dequantize(w, 4, **kw))["sqnr_db"]
            for name, kw in [("tensor", {}), ("channel", {"axis": 0}),
                             ("group", {"group_size": 32})]}
    assert sqnr["tensor"] < sqnr["channel"] < sqnr["group"]


def test_about_six_db_per_bit():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(4)) * 2 - 1
    s4 = quantization_error(x, quantize_dequantize(x, 4))["sqnr_db"]
    s8 = quantization_error(x, quantize_dequantize(x, 8))["sqnr_db"]
    assert 20 < s8 - s4 < 28  # 6.02 dB per bit, 4 bits


def test_all_zero_all_equal_and_clamping_edges():
    zeros = torch.zeros(7)
    for sym in (False, True):
        scale, zp = quant_params(zeros, 4, sym)
        assert float(scale) == 1.0
        q = quantize(zeros, scale, zp, 4, symmetric=sym)
        assert torch.equal(dequantize(q, scale, zp), zeros)
    for value in (0.7, -0.7):
        x = torch.full((5,), value)
        for sym in (False, True):
            scale, zp = quant_params(x, 4, sym)
            x_hat = dequantize(quantize(x, scale, zp, 4, symmetric=sym), scale, zp)
            assert float((x_hat - x).abs().max()) <= float(scale) / 2 + 1e-7
    # asymmetric: an exact .5 on the top code; rounds to 16 unless clamped
    x = torch.tensor([-1.375, 0.0, 2.375])
    q, scale, zp = affine_quantize(x, 4)
    assert int(zp) == 6 and q.tolist() == [0, 6, 15]
    # values outside the range of the given parameters clamp to its ends
    scale, zp = quant_params(torch.tensor([-1.0, 1.0]), 8)
    q = quantize(torch.tensor([-100.0, 100.0]), scale, zp, 8)
    assert q.tolist() == [0, 255]
    # never-negative data: asymmetric with zero point 0 still uses the codes up to 255
    x = torch.tensor([0.0, 0.5, 2.0])
    scale, zp = quant_params(x, 8)
    assert int(zp) == 0 and quantize(x, scale, zp, 8).tolist() == [0, 64, 255]
    scale, zp = quant_params(x, 8, symmetric=True)
    q = quantize(-x, scale, zp, 8, symmetric=True).tolist()
    assert q[:2] == [0, -32] and q[2] in (-128, -127)  # -2 * 127.5 / 2: a tie


def test_outlier_inflates_the_per_tensor_scale():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    eff = outlier_effect(x, outlier=60.0, bits=8)
    assert eff["scale_ratio"] > 10
    assert eff["sqnr_db_outlier"] < eff["sqnr_db_clean"] - 15
    assert eff["zero_code_share_outlier"] > eff["zero_code_share_clean"]


def test_quantization_error_fields():
    x = torch.tensor([1.0, -2.0, 3.0])
    err = quantization_error(x, x.clone())
    assert err["mse"] == 0 and err["max_abs"] == 0 and err["sqnr_db"] == math.inf
    err = quantization_error(x, x + torch.tensor([0.0, 0.5, 0.0]))
    assert math.isclose(err["max_abs"], 0.5) and math.isclose(err["mse"], 0.25 / 3)
    assert math.isclose(err["sqnr_db"], 10 * math.log10(14 / 0.25))


# ------------------------------------------------------------------ packing

def test_pack_int4_layout_and_round_trip():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F]]  # element 0 in the low nibble
    assert torch.equal(unpack_int4(packed), q)
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(6))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (3, 32), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == {2: 8, 3: 12, 4: 16, 8: 32}[bits]  # 32 codes
    assert torch.equal(unpack_bits(packed, bits), codes.to(torch.uint8))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group_size",
                         [(4, 64), (4, 32), (8, 64), (3, 16), (2, 16), (4, 128), (3, None)])
def test_quantize_groupwise_odd_sizes_pad_and_unpad(bits, group_size, symmetric):
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(7))  # 70: not a multiple
    qt = quantize_groupwise(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert isinstance(qt, QuantizedTensor) and qt.shape == (5, 70)
    assert qt.padded_cols % qt.group_size == 0 and qt.padded_cols >= 70
    assert qt.scales.shape == (5, qt.padded_cols // qt.group_size)
    if group_size is None or group_size > 70:  # one group per row, padded to whole bytes
        assert qt.group_size == qt.padded_cols == (72 if bits == 3 else 70)
    assert (qt.zeros is None) == symmetric
    w_hat = qt.dequantize()
    assert w_hat.shape == w.shape
    step = qt.scales.repeat_interleave(qt.group_size, dim=-1)[:, :70]
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-6).all())
    assert qt.data.numel() * 8 == 5 * qt.padded_cols * bits  # really `bits` bits per code


def test_groupwise_matches_tuple_form_and_per_channel():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    packed, scales, zeros = quantize_groupwise_int4(w, 32)
    qt = quantize_groupwise(w, 4, 32)
    assert torch.equal(packed, qt.data) and torch.equal(scales, qt.scales)
    # group_size=None: one group per row, the same numbers as axis=0
    per_row = quantize_groupwise(w, 8, None, symmetric=True).dequantize()
    assert torch.allclose(per_row, quantize_dequantize(w, 8, True, axis=0))


def test_int4_storage_is_about_a_quarter_of_bf16():
    w = torch.randn(64, 256)
    qt = quantize_groupwise(w, 4, 64)
    # 0.5 byte per weight + (4 + 1) bytes per group of 64 -> 4.625 bits per weight
    assert math.isclose(qt.bits_per_weight, 4 + 40 / 64)
    assert qt.nbytes < w.numel() * 2 / 3


# ------------------------------------------------------------------ clear errors

@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, True, "4"])
def test_unsupported_bits_name_the_value(bits):
    with pytest.raises(ValueError, match=r"bits=.*(2, 3, 4, 8)"):
        quant_params(torch.randn(4), bits=bits)


@pytest.mark.parametrize("group_size", [0, 7, -32, 1])
def test_bad_group_size_names_the_value(group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        quantize_groupwise(torch.randn(4, 32), 4, group_size)
    with pytest.raises(ValueError, match="group_size=12 with bits=3: use a multiple of 8"):
        quantize_groupwise(torch.randn(4, 32), 3, 12)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="multiple of group_size=16"):
        quant_params(torch.randn(2, 20), 4, group_size=16)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_groupwise(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        quant_params(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(TypeError, match="floating-point"):
        quant_params(torch.tensor([1, 2]), 8)
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([1, 16]))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quant_params(torch.randn(2, 2), 8, axis=2)
    with pytest.raises(ValueError, match="same shape"):
        kl_to_reference(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        top1_flip_rate(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="selects no position"):
        kl_to_reference(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(2))


# ------------------------------------------------------------------ measurements

def test_kl_and_flip_rate_known_values():
    ref = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    other = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    p = torch.softmax(ref.double(), -1)
    q = torch.softmax(other.double(), -1)
    per_pos = (p * (p.log() - q.log())).sum(-1)[0]
    assert math.isclose(kl_to_reference(ref, other), float(per_pos.mean()), rel_tol=1e-9)
    keep_first = torch.tensor([[True, False]])
    assert math.isclose(kl_to_reference(ref, other, keep_first), float(per_pos[0]), rel_tol=1e-9)
    assert top1_flip_rate(ref, other) == 0.5  # position 0: argmax ties go to index 0
    assert top1_flip_rate(ref, other, keep_first) == 0.0
    assert kl_and_flip_rate(ref, ref) == (0.0, 0.0)


# ------------------------------------------------------------------ whole models

def test_quantizable_linears_skips_the_tied_lm_head(tiny):
    names = quantizable_linears(tiny)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert "lm_head" in quantizable_linears(tiny, include_lm_head=True)


def test_fake_quantize_model_copies_and_degrades_gracefully(tiny, ids):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    ref = _logits(tiny, ids)
    kls = {}
    for bits in (8, 4, 3, 2):
        q = fake_quantize_model(tiny, bits=bits, group_size=32)
        kls[bits] = kl_to_reference(ref, _logits(q, ids))
        assert torch.equal(q.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert kls[8] < kls[4] < kls[3] < kls[2]
    assert kls[8] < 1e-4


def test_include_lm_head_unties_and_keeps_the_embedding(tiny, ids):
    q = fake_quantize_model(tiny, bits=4, group_size=32, include_lm_head=True)
    assert q.lm_head.weight is not q.model.embed_tokens.weight
    assert torch.equal(q.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert not torch.equal(q.lm_head.weight, tiny.lm_head.weight)
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # original untouched


def test_pack_model_equals_fake_quant_and_survives_safetensors(tiny, ids, tmp_path):
    packed = pack_model(tiny, bits=4, group_size=32)
    fake = fake_quantize_model(tiny, bits=4, group_size=32)
    restored = unpack_model(tiny, packed)
    assert torch.equal(_logits(restored, ids), _logits(fake, ids))

    path = save_packed(tmp_path / "tiny-int4.safetensors", packed, tiny)
    loaded, rest = load_packed(path)
    assert set(loaded) == set(packed)
    for key, qt in packed.items():
        assert torch.equal(loaded[key].data, qt.data) and loaded[key].shape == qt.shape
    assert "model.embed_tokens.weight" in rest and "model.norm.weight" in rest
    assert torch.equal(_logits(unpack_model(tiny, loaded), ids), _logits(fake, ids))
    # a fresh model of the same config + the file = the quantized model
    fresh = build_model(ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2), seed=123).eval()
    assert torch.equal(_logits(unpack_model(fresh, loaded, rest), ids), _logits(fake, ids))
    assert "lm_head.weight" not in rest  # tied: the embedding is stored once

    # real size: the file is the packed bytes + the float tensors + a small header
    floats = sum(t.numel() * t.element_size() for t in rest.values())
    on_disk = path.stat().st_size
    stored = packed_size_bytes(packed) + floats
    assert stored < on_disk < stored + 20_000
    fp32 = linear_weight_bytes(tiny)
    assert packed_size_bytes(packed) < fp32 / 5  # 4.6 bits vs 32 bits per weight
    assert linear_weight_bytes(packed) == packed_size_bytes(packed)


def test_load_packed_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a packed-weights file"):
        load_packed(tmp_path / "plain.safetensors")


def test_unpack_model_shape_mismatch_is_explained(tiny):
    packed = pack_model(tiny, 4, 32)
    key = next(iter(packed))
    packed[key] = quantize_groupwise(torch.randn(3, 32), 4, 32)
    with pytest.raises(ValueError, match="packed from another model"):
        unpack_model(tiny, packed)


def test_awq_scaling_beats_round_to_nearest_on_salient_channels():
    # one Linear whose inputs have a few large channels (the AWQ observation)
    g = torch.Generator().manual_seed(9)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 64, bias=False)

        def forward(self, input_ids):
            return self.proj(input_ids)

    model = Wrapper()
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
    channel_scale = torch.ones(128)
    channel_scale[:4] = 30.0
    x = torch.randn(256, 128, generator=g) * channel_scale
    awq, alphas = awq_quantize_model(model, x, bits=3, group_size=64)
    rtn = fake_quantize_model(model, bits=3, group_size=64)
    with torch.no_grad():
        ref = model(x)
        err_awq = float(((awq(x) - ref) ** 2).mean())
        err_rtn = float(((rtn(x) - ref) ** 2).mean())
    assert alphas["proj"] > 0
    assert err_awq < 0.8 * err_rtn


def test_awq_on_a_model_is_no_worse_per_layer(tiny, ids):
    awq, alphas = awq_quantize_model(tiny, ids, bits=4, group_size=32, n_grid=5)
    assert set(alphas) == set(quantizable_linears(tiny))
    assert all(0.0 <= a <= 1.0 for a in alphas.values())
    ref = _logits(tiny, ids)
    kl_awq = kl_to_reference(ref, _logits(awq, ids))
    kl_rtn = kl_to_reference(ref, _logits(fake_quantize_model(tiny, 4, 32), ids))
    assert math.isfinite(kl_awq) and kl_awq < 2 * kl_rtn + 1e-6


def test_latency_and_bytes(tiny, ids):
    ms = latency_ms(tiny, ids, repeats=2, warmup=1)
    assert 0 < ms < 10_000
    with pytest.raises(ValueError, match="repeats"):
        latency_ms(tiny, ids, repeats=0)
    n = sum(lin.weight.numel() for lin in quantizable_linears(tiny).values())
    assert linear_weight_bytes(tiny) == 4 * n
    assert linear_weight_bytes(tiny, include_lm_head=True) == 4 * (n + 96 * 64)
