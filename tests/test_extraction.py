"""Harvesting, sparse KD targets, fidelity and the SVD hidden-size attack (utils/extraction.py)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest
import torch
from _tiny_chat import CORPUS, tiny_model

from utils.evaluate import generate_responses
from utils.extraction import (
    HarvestRecord,
    averaging_curve,
    fidelity_dense,
    fidelity_from_targets,
    final_logits,
    greedy_exact_match,
    harvest,
    hidden_size_from_logits,
    logprob_matrix,
    power_law_fit,
    repeats_needed,
    sequence_kd_batch,
    sft_examples,
    soft_targets_from_records,
    sparse_kd_loss,
)
from utils.serve import Defences, ServerConfig, port_is_open, start_server

pytestmark = pytest.mark.usefixtures("no_server_left_behind")

KEY = "sk-student"


@contextmanager
def serving(model, tok, **config):
    config.setdefault("api_keys", {KEY: 1000})
    handle = start_server(model, tok, ServerConfig(**config))
    try:
        yield handle
    finally:
        handle.stop()
        assert not port_is_open(handle.host, handle.port)


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Distinct prompts: random word salads from the corpus."""
    rng = np.random.default_rng(seed)
    words = sorted({w for line in CORPUS for w in line.split()})
    return [" ".join(rng.choice(words, size=6)) for _ in range(n)]


# --------------------------------------------------------------------------------------
# harvest against the real API


def test_harvest_stops_at_budget(teacher, tok):
    with serving(teacher, tok) as h:
        recs = harvest(h.client(KEY), random_prompts(5), budget=3, top_logprobs=4, max_tokens=5)
        used = httpx.get(h.base_url + "/usage", headers={"Authorization": f"Bearer {KEY}"}
                         ).json()["used"]
    assert len(recs) == 3 and used == 3
    r = recs[0]
    assert isinstance(r, HarvestRecord) and r.prompt == random_prompts(5)[0]
    assert len(r.tokens) == len(r.logprobs) == len(r.top_logprobs) == r.completion_tokens
    assert all(len(t) == 4 for t in r.top_logprobs)
    assert r.to_dict()["text"] == r.text


def test_harvest_stops_cleanly_when_quota_is_spent(teacher, tok):
    with serving(teacher, tok, api_keys={KEY: 2}) as h:
        recs = harvest(h.client(KEY), random_prompts(5), budget=5, max_tokens=3)
    assert len(recs) == 2
    assert recs[0].tokens == []  # text only: no logprobs requested


def test_harvest_waits_out_rate_limits(teacher, tok):
    with serving(teacher, tok, rate_limit=20.0, rate_burst=1) as h:
        recs = harvest(h.client(KEY), random_prompts(4), budget=4, max_tokens=1)
    assert [r.prompt for r in recs] == random_prompts(4)


# --------------------------------------------------------------------------------------
# soft targets, sparse KD loss, fidelity


def test_soft_targets_align_with_the_teacher(teacher, tok):
    prompts = random_prompts(4, seed=1)
    with serving(teacher, tok) as h:
        recs = harvest(h.client(KEY), prompts, budget=4, top_logprobs=5, max_tokens=6,
                       temperature=1.0)
    st = soft_targets_from_records(recs, tok)
    assert st.topk_ids.shape[-1] == 5 and int(st.target_mask.sum()) == sum(
        len(r.tokens) for r in recs)
    with torch.no_grad():
        logits = teacher(input_ids=st.input_ids, attention_mask=st.attention_mask).logits
    lp = torch.log_softmax(logits, -1)
    got = torch.gather(lp, -1, st.topk_ids)[st.target_mask]
    assert torch.allclose(got, st.topk_logprobs[st.target_mask], atol=1e-4)
    fid = fidelity_from_targets(logits, st)
    assert fid["top1_agreement"] == 1.0
    assert fid["kl"] == pytest.approx(0.0, abs=1e-4) and fid["tv"] == pytest.approx(0.0, abs=1e-4)
    other = tiny_model(tok, seed=3)
    with torch.no_grad():
        fid2 = fidelity_from_targets(other(input_ids=st.input_ids).logits, st)
    assert fid2["kl"] > 1e-3 and fid2["tv"] > 1e-3
    # sequence-level KD data from the same records
    batch = sequence_kd_batch(recs, tok)
    for b, r in enumerate(recs):
        labels = batch["labels"][b]
        text = tok.decode(labels[labels != -100].tolist(), skip_special_tokens=True)
        assert text == r.text
    ex = sft_examples(recs)
    assert ex[0]["messages"][-1] == {"role": "assistant", "content": recs[0].text}


def _sparse(teacher_logits: torch.Tensor, k: int):
    lp = torch.log_softmax(teacher_logits, -1)
    top = torch.topk(lp, k)
    return top.indices, top.values


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
def test_sparse_kd_loss_zero_at_teacher_positive_elsewhere(tail):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 40, generator=g) * 2
    s = torch.randn(2, 5, 40, generator=g)
    ids, vals = _sparse(t, 40)  # k = V: both tails equal the full KL
    full_kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))
               ).sum(-1).mean()
    assert sparse_kd_loss(t, ids, vals, tail=tail).item() == pytest.approx(0.0, abs=1e-5)
    assert sparse_kd_loss(s, ids, vals, tail=tail).item() == pytest.approx(full_kl.item(),
                                                                          rel=1e-4)
    ids, vals = _sparse(t, 5)
    if tail == "bucket":
        # the coarsened KL is 0 at the teacher and a lower bound of the full KL
        assert sparse_kd_loss(t, ids, vals).item() == pytest.approx(0.0, abs=1e-5)
        assert 0 < sparse_kd_loss(s, ids, vals).item() <= full_kl.item()
    s = s.clone().requires_grad_(True)
    sparse_kd_loss(s, ids, vals, tail=tail).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_token_level_kd_from_harvest_improves_fidelity(teacher, tok):
    prompts = random_prompts(12, seed=2)
    with serving(teacher, tok) as h:
        recs = harvest(h.client(KEY), prompts, budget=12, top_logprobs=10, max_tokens=8,
                       temperature=1.0)
    st = soft_targets_from_records(recs, tok)
    # untied: a tied random model's top-1 is "repeat the current token", like the teacher's
    student = tiny_model(tok, hidden_size=32, tie=False, seed=7).train()
    before = fidelity_from_targets(student(input_ids=st.input_ids).logits.detach(), st)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(25):
        logits = student(input_ids=st.input_ids, attention_mask=st.attention_mask).logits
        loss = sparse_kd_loss(logits, st.topk_ids, st.topk_logprobs, st.target_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fidelity_from_targets(student.eval()(input_ids=st.input_ids).logits.detach(), st)
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["top1_agreement"] > max(before["top1_agreement"], 0.8), (before, after)


def test_fidelity_dense_and_exact_match(teacher, tok):
    t = torch.randn(3, 4, 20)
    same = fidelity_dense(t, t)
    assert same == {"top1_agreement": 1.0, "kl": pytest.approx(0, abs=1e-6),
                    "tv": pytest.approx(0, abs=1e-6)}
    other = fidelity_dense(t, torch.randn(3, 4, 20))
    assert other["kl"] > 0 and 0 < other["tv"] < 1
    texts = generate_responses(teacher, tok, ["hello", "what is the capital of france?"],
                             max_new_tokens=5)
    assert greedy_exact_match(texts, texts) == 1.0
    assert greedy_exact_match(texts, [texts[0], texts[1] + "x"]) == 0.5
    with pytest.raises(ValueError, match="equally long"):
        greedy_exact_match(texts, texts[:1])


# --------------------------------------------------------------------------------------
# Carlini et al. (2024): hidden size from the singular values


def _random_inputs(n: int, length: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 128, (n, length), generator=g).tolist()


@pytest.mark.parametrize("h, tie", [(32, True), (48, True), (32, False), (48, False)])
def test_hidden_size_exact_on_models_of_known_size(tok, h, tie):
    model = tiny_model(tok, hidden_size=h, num_heads=4, tie=tie, seed=h)
    inputs = _random_inputs(h + 20, seed=h)
    logits = final_logits(model, inputs)  # (n, V)
    est, s = hidden_size_from_logits(logits)
    assert est == h
    assert s[h - 1] / s[h] > 1e4  # the cliff: float32 round-off after the h-th value
    logprobs = torch.log_softmax(logits, -1)
    assert hidden_size_from_logits(logprobs)[0] == h  # centred logprobs: h
    # raw logprobs: each row minus its own logsumexp adds the all-ones direction -> h + 1
    assert hidden_size_from_logits(logprobs, center=False)[0] == h + 1
    # a LayerNorm without bias centres the hidden state: one direction fewer -> h - 1
    model.model.norm = torch.nn.LayerNorm(h, bias=False)
    assert hidden_size_from_logits(final_logits(model, inputs))[0] == h - 1


def test_hidden_size_needs_more_queries_than_h(tok):
    model = tiny_model(tok, hidden_size=32, num_heads=4, seed=1)
    est, s = hidden_size_from_logits(final_logits(model, _random_inputs(20)))
    assert len(s) == 20 and est != 32  # n < h: no cliff to find
    with pytest.raises(ValueError, match="NaN"):
        hidden_size_from_logits(np.full((3, 4), math.nan))


def _api_logprob_rows(h, n: int, top: int) -> list[HarvestRecord]:
    return harvest(h.client(KEY), random_prompts(n, seed=5), budget=n, top_logprobs=top,
                   max_tokens=1)


@pytest.mark.slow
def test_hidden_size_through_the_api_and_defences(teacher, tok):
    V, hidden, n = len(tok), 32, 40
    with serving(teacher, tok) as h:
        m, vocab = logprob_matrix(_api_logprob_rows(h, n, V))
    assert m.shape == (n, V) and len(vocab) == V
    assert hidden_size_from_logits(m)[0] == hidden
    # rounding to 3 decimals does NOT stop it (the cliff survives the rounding noise); for
    # this teacher, whose logprobs barely vary between prompts, 2 decimals does
    with serving(teacher, tok, defences=Defences(round_decimals=3)) as h:
        est, _ = hidden_size_from_logits(logprob_matrix(_api_logprob_rows(h, n, V))[0])
    assert est == hidden
    with serving(teacher, tok, defences=Defences(round_decimals=2)) as h:
        est, _ = hidden_size_from_logits(logprob_matrix(_api_logprob_rows(h, n, V))[0])
    assert est != hidden
    # noise on the logprobs fills the gap: the estimate is lost
    with serving(teacher, tok, defences=Defences(noise="gaussian", noise_scale=0.3)) as h:
        est, s = hidden_size_from_logits(logprob_matrix(_api_logprob_rows(h, n, V))[0])
    assert est != hidden and s[hidden - 1] / s[hidden] < 10
    # top-k truncation: no full vector to stack
    with serving(teacher, tok, defences=Defences(max_top_logprobs=20)) as h:
        with pytest.raises(openai.BadRequestError):
            _api_logprob_rows(h, 2, V)
        recs = _api_logprob_rows(h, n, 20)
    with pytest.raises(ValueError, match="truncates"):
        logprob_matrix(recs)
    est, _ = hidden_size_from_logits(logprob_matrix(recs, missing="floor")[0])
    assert est != hidden


# --------------------------------------------------------------------------------------
# averaging the noise defence away: the 1/sqrt(n) law (issue 17)


def test_averaging_noise_follows_the_inverse_square_root_law():
    rng = np.random.default_rng(0)
    sigma, truth = 0.3, rng.normal(-5.0, 1.0, size=400)
    readings = truth + rng.normal(0.0, sigma, size=(256, truth.size))
    ns = [1, 4, 16, 64, 256]
    curve = averaging_curve(readings, truth, ns)
    assert curve[1] == pytest.approx(sigma, rel=0.05)
    assert curve[256] == pytest.approx(sigma / 16, rel=0.1)
    slope, c = power_law_fit(list(curve), list(curve.values()))
    assert slope == pytest.approx(-0.5, abs=0.03) and c == pytest.approx(sigma, rel=0.1)
    # noise 0.1 to error 1e-3 needs (0.1 / 1e-3)^2 = 10,000 repeated readings
    assert repeats_needed(0.1, -0.5, 1e-3) == 10_000
    assert repeats_needed(0.1, -0.5, 0.2) == 1
    # noise that does not average away (a shared bias) is not a falling line
    biased = readings + 0.05
    flat = averaging_curve(biased, truth, ns)
    assert flat[256] > 0.9 * 0.05 and power_law_fit(list(flat), list(flat.values()))[0] > -0.4
    with pytest.raises(ValueError, match="falling"):
        repeats_needed(0.1, 0.0, 1e-3)
    with pytest.raises(ValueError, match="between 1 and"):
        averaging_curve(readings, truth, [0, 4])
    with pytest.raises(ValueError, match=r"\(R, d\)"):
        averaging_curve(readings[:, :3], truth, [1])
