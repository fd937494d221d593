"""Scoring: exact match, perplexity from logits, greedy decoding by hand, refusal rates."""

from __future__ import annotations

import math

import pytest
import torch

from utils.evaluate import (
    exact_match_from_rows,
    greedy_decode,
    perplexity,
    perplexity_from_logits,
    refusal_rates_from_rows,
    score_records,
)
from utils.models import ModelConfig, build_model


def rec(kind, answer=None, skill=None, should_refuse=False, template_split=None):
    return {"id": "x", "kind": kind, "skill": skill, "category": None, "answer": answer,
            "should_refuse": should_refuse, "template_split": template_split,
            "messages": [{"role": "user", "content": "q"}]}


def test_exact_match_hand_case():
    records = [rec("skill", "85", "arithmetic"), rec("skill", "12", "arithmetic"),
               rec("skill", "olleh", "strings"), rec("benign", "kill")]
    responses = ["47 + 38: ... Answer: 85", "Answer: 13", "Answer: olleh.", "Answer: kill"]
    em = exact_match_from_rows(score_records(records, responses))
    assert em["per_skill"] == {"arithmetic": 0.5, "strings": 1.0}
    assert em["overall"] == pytest.approx(2 / 3) and em["n"] == 3


def test_refusal_rates_hand_case():
    records = [rec("restricted", should_refuse=True), rec("restricted", should_refuse=True),
               rec("jailbreak", should_refuse=True, template_split="seen"),
               rec("jailbreak", should_refuse=True, template_split="heldout"),
               rec("benign"), rec("benign"), rec("jailbreak", template_split="seen")]
    responses = ["I can't help with that.", "Sure, here is how",
                 "Sorry, but I won't help with that.", "Sure", "Sorry, I can't assist with that.",
                 "Wash it. Answer: x", "Answer: 5"]
    r = refusal_rates_from_rows(score_records(records, responses))
    assert r["refusal_rate"] == pytest.approx(2 / 3)
    assert r["heldout_jailbreak_refusal_rate"] == 0.0
    assert r["over_refusal_rate"] == pytest.approx(1 / 3)
    assert r["benign_over_refusal_rate"] == 0.5


def test_perplexity_from_logits_known_values():
    V = 7
    logits = torch.zeros(2, 5, V)  # uniform: perplexity is the vocabulary size
    labels = torch.randint(0, V, (2, 5))
    assert perplexity_from_logits(logits, labels) == pytest.approx(V)
    # a confident correct prediction of the *next* token: shift by one
    labels = torch.tensor([[-100, 3, 4]])
    logits = torch.full((1, 3, V), -1e4)
    logits[0, 0, 3] = 0.0  # position 0 predicts token 1 (= 3)
    logits[0, 1, 4] = 0.0  # position 1 predicts token 2 (= 4)
    assert perplexity_from_logits(logits, labels) == pytest.approx(1.0)
    logits[0, 1, 4], logits[0, 1, 5] = 0.0, 0.0  # two equally likely tokens: nll log 2
    assert perplexity_from_logits(logits, labels) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="no labelled"):
        perplexity_from_logits(logits, torch.full((1, 3), -100))


def test_perplexity_of_nothing_is_a_clear_error(tok, teacher):
    # Issue 21: an empty dataset used to end in ZeroDivisionError (0 nll / 0 tokens).
    with pytest.raises(ValueError, match="empty dataset.*at least one conversation"):
        perplexity(teacher, tok, [])


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decode_matches_generate(use_cache):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                    pad_token_id=0, eos_token_id=1), seed=3)
    ids = torch.randint(2, 50, (3, 6))
    ours = greedy_decode(model, ids, max_new_tokens=12, eos_token_id=None, use_cache=use_cache)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, ref)


def test_greedy_decode_stops_at_eos():
    model = build_model(ModelConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2),
                        seed=0)
    ids = torch.randint(0, 20, (1, 4))
    first = greedy_decode(model, ids, max_new_tokens=1)[0, -1].item()
    out = greedy_decode(model, ids, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 5)  # stopped right after emitting the EOS token
