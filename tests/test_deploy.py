"""utils.deploy: ONNX export, ONNX Runtime decoding, int8, bandwidth and benchmarks (lesson 06).

The model is exported once per module (the dynamo exporter takes seconds); it is a tiny
Llama trained for a few steps on a deterministic sequence so its greedy choices are clear
(a random-init model's logits are nearly uniform, so any rounding would flip its argmax).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checks.deploy import check_decode_with_cache
from utils.deploy import (
    bandwidth_bound_tokens_per_s,
    benchmark_runtime,
    export_onnx,
    greedy_agreement,
    kv_cache_bytes,
    load_onnx_session,
    max_abs_logit_diff,
    memory_bandwidth_gbps,
    onnx_op_counts,
    ort_generate,
    ort_generate_full,
    ort_logits,
    past_input_names,
    present_output_names,
    quantize_onnx_int8,
    reference_outputs,
    weight_bytes,
)
from utils.models import ModelConfig, build_model

VOCAB = 512
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=128)


def _train_briefly(model, steps: int = 25):
    """A few AdamW steps on x[t+1] = (5 x[t] + 3) mod V: confident, deterministic logits."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        seq = [torch.randint(0, VOCAB, (16, 1), generator=gen)]
        for _ in range(15):
            seq.append((seq[-1] * 5 + 3) % VOCAB)
        x = torch.cat(seq, 1)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return _train_briefly(build_model(CONFIG, seed=0))


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    kv = export_onnx(model, d / "model_kv.onnx", with_cache=True)
    plain = export_onnx(model, d / "model.onnx", with_cache=False)
    int8 = quantize_onnx_int8(kv, d / "model_kv_int8.onnx")
    return {"dir": d, "kv": kv, "plain": plain, "int8": int8}


@pytest.fixture(scope="module")
def sessions(files):
    return {k: load_onnx_session(files[k], threads=1) for k in ("kv", "plain", "int8")}


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _generate(model, ids, n, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n, **kw).numpy()


def test_export_writes_graphs_with_named_cache_io(files):
    assert sorted(p.name for p in files["dir"].iterdir()) == [
        "model.onnx", "model_kv.onnx", "model_kv_int8.onnx"]  # no temporary files left behind
    s = load_onnx_session(files["kv"])
    inputs = {i.name: i.shape for i in s.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past_input_names(2)]
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert [o.name for o in s.get_outputs()] == ["logits", *present_output_names(2)]
    plain = load_onnx_session(files["plain"])
    assert [i.name for i in plain.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in plain.get_outputs()] == ["logits"]


@pytest.mark.parametrize("shape", [(1, 5), (3, 11)])
def test_fp32_logits_match_pytorch(model, sessions, shape):
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for name in ("kv", "plain"):
        diff = max_abs_logit_diff(ort_logits(sessions[name], ids.numpy()), ref)
        assert diff < 1e-4, f"{name} graph differs from PyTorch by {diff:.2e}"


def test_cached_decode_matches_generate(model, sessions, prompts):
    want = _generate(model, prompts, 16, eos_token_id=None, pad_token_id=0)
    got = ort_generate(sessions["kv"], prompts, 16)
    assert np.array_equal(got, want)


def test_full_recompute_matches_generate(model, sessions, prompts):
    want = _generate(model, prompts, 10, eos_token_id=None, pad_token_id=0)
    assert np.array_equal(ort_generate_full(sessions["plain"], prompts, 10), want)
    assert np.array_equal(ort_generate_full(sessions["kv"], prompts, 10), want)


def test_cached_decode_stops_at_eos_like_generate(model, sessions, prompts):
    free = _generate(model, prompts, 12, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 7 + 3])  # row 0's fourth new token: row 0 stops, row 1 is padded after
    want = _generate(model, prompts, 12, eos_token_id=eos, pad_token_id=eos)
    got = ort_generate(sessions["kv"], prompts, 12, eos)
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(ort_generate_full(sessions["plain"], prompts, 12, eos), want)


def test_cached_decode_with_left_padding_matches_generate(model, sessions, prompts):
    ids, mask = prompts.clone(), torch.ones_like(prompts)
    ids[1, :3], mask[1, :3] = 0, 0
    want = _generate(model, ids, 10, attention_mask=mask, eos_token_id=None, pad_token_id=0)
    assert np.array_equal(ort_generate(sessions["kv"], ids, 10, attention_mask=mask), want)


def test_decode_check_accepts_reference_on_real_session(model, sessions):
    result = check_decode_with_cache(ort_generate, sessions["kv"], model)
    assert result.passed, result.message


def test_int8_is_smaller_and_agrees(model, files, sessions, prompts):
    fp32, int8 = os.path.getsize(files["kv"]), os.path.getsize(files["int8"])
    ratio = fp32 / int8
    ops = onnx_op_counts(files["int8"])
    assert ops["MatMulInteger"] == 7 * CONFIG.num_layers  # q k v o gate up down per layer
    assert ops["DynamicQuantizeLinear"] > 0
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    q = ort_logits(sessions["int8"], ids.numpy())
    top1 = greedy_agreement(q.argmax(-1), ref.argmax(-1))
    want = _generate(model, prompts, 16, eos_token_id=None, pad_token_id=0)[:, 7:]
    gen = greedy_agreement(ort_generate(sessions["int8"], prompts, 16)[:, 7:], want)
    print(f"int8: {fp32} -> {int8} bytes ({ratio:.2f}x), max |dlogit| "
          f"{max_abs_logit_diff(q, ref):.3g}, top-1 agreement {top1:.3f}, greedy {gen:.3f}")
    assert ratio > 2.5, f"int8 file only {ratio:.2f}x smaller"
    assert top1 >= 0.95 and gen >= 0.95, f"int8 agreement top-1 {top1:.3f}, greedy {gen:.3f}"


def test_missing_and_corrupt_files_give_clear_errors(files, tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx.*export_onnx"):
        load_onnx_session(missing)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(Path(files["kv"]).read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.onnx.*export again"):
        load_onnx_session(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    with pytest.raises(ValueError, match=r"garbage\.onnx.*corrupt"):
        load_onnx_session(garbage)
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        quantize_onnx_int8(missing, tmp_path / "out.onnx")
    with pytest.raises(FileNotFoundError, match="nope"):
        benchmark_runtime("x", "onnxruntime", missing, [[1, 2]])


def test_generate_rejects_plain_graph_and_bad_ids(sessions):
    with pytest.raises(ValueError, match="with_cache=True"):
        ort_generate(sessions["plain"], [[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="integer"):
        ort_generate(sessions["kv"], np.ones((1, 3), dtype=np.float32), 2)


def test_parity_helpers():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert greedy_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5  # early stop counts as misses
    assert max_abs_logit_diff(np.zeros((2, 3)), np.full((2, 3), 0.5)) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        max_abs_logit_diff(np.zeros(3), np.zeros(4))


def test_bandwidth_benchmark_is_sane():
    runs = [memory_bandwidth_gbps(size_mb=64, repeats=3) for _ in range(2)]
    print(f"memory bandwidth: {runs[0]:.1f}, {runs[1]:.1f} GB/s")
    assert all(math.isfinite(r) and r > 0.1 for r in runs), runs
    assert max(runs) / min(runs) < 10, f"two runs differ by more than 10x: {runs}"
    assert memory_bandwidth_gbps(size_mb=16, repeats=1, threads=2) > 0


def test_bandwidth_bound_arithmetic():
    # 1B params in fp16 = 2 GB read per token; at 50 GB/s that is at most 25 tokens/s.
    assert bandwidth_bound_tokens_per_s(50, weight_bytes(1e9, 16)) == pytest.approx(25)
    assert weight_bytes(8, 4) == 4
    assert kv_cache_bytes(2, 2, 16, 10) == 2 * 2 * 2 * 16 * 10 * 4
    with pytest.raises(ValueError):
        bandwidth_bound_tokens_per_s(0, 1)


def test_benchmark_onnxruntime_in_subprocess(model, files):
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    ref = reference_outputs(model, ids, 8)
    rows = [benchmark_runtime(name, "onnxruntime", files[key], ids, max_new_tokens=8,
                              reference=ref, repeats=1) for name, key in
            (("onnx fp32", "kv"), ("onnx int8", "int8"))]
    for row in rows:
        print(row)
        assert {"name", "bytes", "time_to_first_token_ms", "tokens_per_s_1thread",
                "tokens_per_s_all", "peak_rss_mb", "max_abs_logit_diff",
                "greedy_agreement"} <= set(row)
        assert row["tokens_per_s_1thread"] > 0 and row["tokens_per_s_all"] > 0
        assert 0 < row["time_to_first_token_ms"] < 10_000
        # ONNX Runtime's process holds no PyTorch: well under a torch process's ~300 MB.
        assert 10 < row["peak_rss_mb"] < 300
        # every timed run is kept (for a median) with the load average after it
        assert len(row["tokens_per_s_runs_1thread"]) == 1 == len(row["loadavg_1thread"])
        assert max(row["tokens_per_s_runs_1thread"]) == row["tokens_per_s_1thread"]
        assert len(row["loadavg_all"][0]) == 3 and min(row["loadavg_all"][0]) >= 0
    assert rows[0]["bytes"] == os.path.getsize(files["kv"])
    assert rows[0]["max_abs_logit_diff"] < 1e-4 and rows[0]["greedy_agreement"] == 1.0
    assert rows[1]["bytes"] < rows[0]["bytes"] / 2.5


@pytest.mark.slow
def test_benchmark_pytorch_int8_in_subprocess(model, tmp_path):
    # One PyTorch child (importing torch + transformers costs seconds); fp32 is the same
    # runner without quantize_dynamic.
    model.save_pretrained(tmp_path / "hf")
    fp32_bytes = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    ref = reference_outputs(model, ids, 8)
    int8 = benchmark_runtime("pytorch int8", "pytorch-int8", tmp_path / "hf", ids,
                             max_new_tokens=8, reference=ref, repeats=1)
    print(int8)
    assert int8["bytes"] < 0.7 * fp32_bytes  # the tied fp32 embedding is not quantized
    assert 0 < int8["max_abs_logit_diff"] < 5 and int8["greedy_agreement"] >= 0.75
    assert int8["tokens_per_s_1thread"] > 0 and int8["peak_rss_mb"] > 100  # PyTorch is big
