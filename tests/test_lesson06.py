"""Lesson 06's additions to utils.deploy: streaming decode, multi-prompt parity, the cached
ExecuTorch program, the pytorch-int8 byte count, and the saved results' schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.deploy import (
    _state_dict_bytes,
    export_onnx,
    load_onnx_session,
    ort_generate,
    ort_generate_stream,
    ort_logits,
    parity_report,
    quantize_onnx_int8,
    reference_generations,
)
from utils.models import ModelConfig, build_model
from utils.paths import repo_root
from utils.quantize import quantize_dynamic_int8

VOCAB = 512
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def model():
    """A tiny Llama trained briefly on x[t+1] = (5 x[t] + 3) mod V: confident greedy choices."""
    torch.set_num_threads(2)
    model = build_model(CONFIG, seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
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
def sessions(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("lesson06")
    kv = export_onnx(model, d / "kv.onnx")
    int8 = quantize_onnx_int8(kv, d / "kv_int8.onnx")
    return {"fp32": load_onnx_session(kv), "int8": load_onnx_session(int8)}


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (1, n), generator=gen).numpy() for n in (4, 7, 9)]


def test_stream_yields_the_tokens_of_ort_generate(sessions, prompts):
    for ids in prompts:
        want = ort_generate(sessions["fp32"], ids, 12)[0, ids.shape[1]:].tolist()
        got = list(ort_generate_stream(sessions["fp32"], ids, 12))
        assert got == want
    # with an end token: the stream stops right after yielding it, like ort_generate
    ids = prompts[0]
    free = ort_generate(sessions["fp32"], ids, 12)[0, ids.shape[1]:].tolist()
    eos = free[3]
    got = list(ort_generate_stream(sessions["fp32"], ids, 12, eos))
    assert got == free[: free.index(eos) + 1]
    assert got == ort_generate(sessions["fp32"], ids, 12, eos)[0, ids.shape[1]:].tolist()


def test_stream_is_lazy(sessions, prompts):
    calls = []
    session = sessions["fp32"]

    class Counting:
        def get_inputs(self):
            return session.get_inputs()

        def get_outputs(self):
            return session.get_outputs()

        def run(self, names, feed):
            calls.append(feed["input_ids"].shape)
            return session.run(names, feed)

    stream = ort_generate_stream(Counting(), prompts[1], 5)
    assert calls == []  # nothing computed until asked
    next(stream)
    assert calls == [(1, 7)]  # the prefill gives the first token
    next(stream)
    assert calls == [(1, 7), (1, 1)]  # then one token per call, with the cache


def test_stream_rejects_batches_and_plain_graphs(sessions, model, tmp_path):
    with pytest.raises(ValueError, match="batch 1"):
        next(ort_generate_stream(sessions["fp32"], np.ones((2, 3), dtype=np.int64), 2))
    plain = load_onnx_session(export_onnx(model, tmp_path / "plain.onnx", with_cache=False))
    with pytest.raises(ValueError, match="with_cache=True"):
        next(ort_generate_stream(plain, [[1, 2, 3]], 2))


def test_parity_report_fp32_exact_int8_close(model, sessions, prompts):
    refs = reference_generations(model, prompts, 10)
    assert [r["tokens"].shape for r in refs] == [(1, 10)] * 3

    def ort(name):
        s = sessions[name]
        return (lambda ids: ort_logits(s, ids)), (lambda ids, n, e: ort_generate(s, ids, n, e))

    fp32 = parity_report(refs, *ort("fp32"), 10)
    assert fp32["max_abs_logit_diff"] < 1e-4
    assert fp32["greedy_agreement"] == 1.0 and fp32["exact_share"] == 1.0
    int8 = parity_report(refs, *ort("int8"), 10)
    print(int8)
    assert 0 < int8["max_abs_logit_diff"] < 5 and int8["greedy_agreement"] >= 0.8


def test_parity_report_counts_misses_and_early_stops(model, prompts):
    refs = reference_generations(model, prompts[:2], 6)

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids)).logits.numpy() + 0.5

    def stops_early(ids, n, eos):  # the first 3 tokens right, then stops: 3 of 6 positions
        return np.concatenate([ids, refs[[r["input_ids"].shape[1] for r in refs].index(
            ids.shape[1])]["tokens"][:, :3]], axis=1)

    report = parity_report(refs, logits, stops_early, 6)
    assert report["max_abs_logit_diff"] == pytest.approx(0.5, abs=1e-5)
    assert report["greedy_agreement"] == pytest.approx(0.5)
    assert report["exact_share"] == 0.0
    with pytest.raises(ValueError, match="reference_generations"):
        parity_report([], logits, stops_early, 6)


def test_reference_generations_stop_at_eos(model, prompts):
    free = reference_generations(model, prompts[:1], 8)[0]["tokens"][0].tolist()
    eos = free[2]
    stopped = reference_generations(model, prompts[:1], 8, eos)[0]["tokens"][0].tolist()
    assert stopped == free[: free.index(eos) + 1]


def test_pytorch_int8_bytes_count_the_tied_embedding_once(model):
    q = quantize_dynamic_int8(model)
    emb = model.get_input_embeddings().weight.numel() * 4
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    got = _state_dict_bytes(q.state_dict())
    # fp32 embedding once (tied lm_head not counted again) + int8 Linear weights + small extras
    assert emb + linears <= got < emb + linears + 10_000, (got, emb, linears)
    # fp32: every parameter once (model.parameters() already lists a tied weight once)
    assert _state_dict_bytes(model.state_dict()) == sum(p.numel() * 4 for p in model.parameters())


def test_saved_results_schema():
    path = repo_root() / "results" / "06_on_device_deployment.json"
    if not path.is_file():
        pytest.skip("results/06_on_device_deployment.json not generated yet (run the lesson)")
    data = json.loads(path.read_text())
    assert data["bandwidth_bound_tokens_per_s"] > 0
    names = [r["name"] for r in data["runtimes"]]
    assert {"PyTorch eager fp32", "PyTorch int8", "ONNX Runtime fp32", "ONNX Runtime int8"} <= set(
        names
    )
    for row in data["runtimes"]:
        assert {"name", "bytes", "time_to_first_token_ms", "tokens_per_s_1thread", "peak_rss_mb",
                "max_abs_logit_diff", "greedy_agreement"} <= set(row)
        assert row["bytes"] > 0 and row["tokens_per_s_1thread"] > 0 and row["peak_rss_mb"] > 0
        assert 0 <= row["greedy_agreement"] <= 1
    fp32 = next(r for r in data["runtimes"] if r["name"] == "ONNX Runtime fp32")
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["greedy_agreement"] == 1.0


def test_fingerprint_ignores_run_time_settings_not_weights(model):
    import copy

    from utils.deploy import _model_fingerprint

    before = _model_fingerprint(model)
    other = copy.deepcopy(model)
    other.config.use_cache = not other.config.use_cache  # generate and the exporters flip these
    assert _model_fingerprint(other) == before
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    assert _model_fingerprint(other) != before
