"""Lesson 05's measurements of *why*: scale overhead, file vs Linear-weight bytes, weight
statistics, one-layer-at-a-time sensitivity and top-1 margins (utils.quantize)."""

from __future__ import annotations

import pytest
import torch

from utils.models import ModelConfig, build_model
from utils.quantize import (
    layer_sensitivity,
    pack_model,
    quantizable_linears,
    safetensors_breakdown,
    save_packed,
    scale_bits_per_weight,
    top1_margins,
    weight_statistics,
)

CONFIG = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, seed=0).eval()


def test_scale_bits_per_weight_is_scale_bits_over_group():
    assert scale_bits_per_weight(32, 32) == 1.0
    assert scale_bits_per_weight(16, 32) == 0.5
    assert scale_bits_per_weight(32, 32) - scale_bits_per_weight(16, 32) == 0.5  # not 0.25
    assert scale_bits_per_weight(32, 32, zero_point_bits=8) == 1.25
    assert 4 + scale_bits_per_weight(16, 32) == 4.5  # llama.cpp's Q4_0
    with pytest.raises(ValueError):
        scale_bits_per_weight(16, 0)


def test_breakdown_sums_to_the_file_and_separates_what_stays_float(model, tmp_path):
    fp32 = tmp_path / "fp32.safetensors"
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").rename(fp32)
    q4 = save_packed(tmp_path / "q4.safetensors", pack_model(model, 4, 32), model)
    parts = {k: safetensors_breakdown(p) for k, p in (("fp32", fp32), ("q4", q4))}
    for name, path in (("fp32", fp32), ("q4", q4)):
        assert sum(parts[name].values()) == path.stat().st_size
        assert parts[name]["header"] > 0 and parts[name]["other tensors"] == 0
    linears = sum(lin.weight.numel() for lin in quantizable_linears(model).values())
    assert parts["fp32"]["linear weights"] == 4 * linears
    assert parts["fp32"]["embedding"] == parts["q4"]["embedding"] == 4 * 96 * 64  # stays fp32
    assert parts["q4"]["norms"] == parts["fp32"]["norms"] == 4 * 64 * (2 * 2 + 1)
    # the Linear weights shrink more than the file, because the embedding does not shrink
    linear_x = parts["fp32"]["linear weights"] / parts["q4"]["linear weights"]
    file_x = fp32.stat().st_size / q4.stat().st_size
    assert linear_x > 5 and file_x < linear_x


def test_weight_statistics_see_heavy_tails(model):
    rows = weight_statistics(model, bits=4, group_size=32)
    assert len(rows) == 14 and {"kurtosis", "outlier_share", "sqnr_db"} <= set(rows[0])
    gaussian = rows[0]  # random init is Gaussian: excess kurtosis near 0, few beyond 4 sd
    assert abs(gaussian["kurtosis"]) < 0.5 and gaussian["outlier_share"] < 0.002
    heavy = build_model(CONFIG, seed=0).eval()
    with torch.no_grad():  # Student-t-like tails: a few weights 20x the typical size
        w = heavy.model.layers[0].self_attn.q_proj.weight
        w[:, ::16] *= 20
    tailed = weight_statistics(heavy, bits=4, group_size=32)[0]
    assert tailed["kurtosis"] > 5 and tailed["outlier_share"] > gaussian["outlier_share"]
    assert tailed["sqnr_db"] < gaussian["sqnr_db"] - 2  # coarser codes for every other weight
    assert tailed["group_max_over_std"] > gaussian["group_max_over_std"]


def test_layer_sensitivity_restores_the_model_and_ranks_layers(model):
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def logits_fn(m):
        logits = m(input_ids=ids).logits.float()
        return [(logits, ids, torch.ones_like(ids, dtype=torch.bool))]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits_fn(model)
    rows = layer_sensitivity(model, logits_fn, ref, bits=2, group_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored
    assert len(rows) == 14 and all(r["kl_to_fp32"] > 0 for r in rows)
    fine = layer_sensitivity(model, logits_fn, ref, bits=8, group_size=32)
    assert sum(r["kl_to_fp32"] for r in fine) < sum(r["kl_to_fp32"] for r in rows) / 100


def test_top1_margins_are_gaps_between_the_two_best_logits():
    logits = torch.tensor([[[3.0, 1.0, 0.5], [0.0, 0.2, 0.1]]])  # (1, 2, 3)
    mask = torch.tensor([[True, False]])
    gaps = top1_margins([(logits, None, mask)])
    assert gaps.tolist() == [2.0]
    both = top1_margins([(logits, None, torch.ones(1, 2, dtype=torch.bool))])
    assert both == pytest.approx(torch.tensor([2.0, 0.1]))
