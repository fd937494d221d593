"""The shipped teacher's weights and its card cannot drift apart.

Re-scores a deterministic subset of the test split (every 8th record, to keep this test under
a minute or two on a 2-core CPU) with the shipped weights and checks each response equals the
one recorded at build time; then recomputes the card's headline numbers from all recorded
responses. Skips with a message when the teacher has not been built (``make teacher``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from utils.models import recorded_responses, teacher_card
from utils.paths import data_dir

# DD_TEACHER_DIR points the test at another build (e.g. the from-scratch student baseline)
TEACHER = Path(os.environ.get("DD_TEACHER_DIR", data_dir() / "models" / "teacher"))
STRIDE = 8

pytestmark = pytest.mark.skipif(
    not (TEACHER / "model_card.json").exists(),
    reason="teacher not built yet: run `make teacher` (python scripts/build_teacher.py)",
)


@pytest.fixture(scope="module")
def card():
    return teacher_card(TEACHER)


@pytest.fixture(scope="module")
def rows():
    return recorded_responses(TEACHER)


def test_files_present(card):
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "model_card.md",
        "test_responses.jsonl",
    ):
        assert (TEACHER / name).exists(), name
    assert not list(TEACHER.glob("*.bin")), "weights must be safetensors only"
    assert card["metrics"]["split"] == "test"


def test_recorded_rows_cover_the_test_split(rows):
    from utils.data import read_split

    test = read_split("test")
    assert [r["id"] for r in rows] == [r["id"] for r in test]
    assert [r["answer"] for r in rows] == [r["answer"] for r in test]


def test_card_numbers_follow_from_recorded_responses(card, rows):
    from utils.data import extract_answer, is_refusal
    from utils.evaluate import exact_match_from_rows, refusal_rates_from_rows

    for r in rows:  # re-score each stored response with today's scoring code
        assert r["refused"] == is_refusal(r["response"])
        assert r["correct"] == (
            r["answer"] is not None and extract_answer(r["response"]) == r["answer"]
        )
    em, safety = exact_match_from_rows(rows), refusal_rates_from_rows(rows)
    assert em == card["metrics"]["exact_match"]
    for key, value in safety.items():
        stored = card["metrics"]["safety"][key]
        assert stored == value or (
            isinstance(value, float) and math.isnan(value) and stored is None
        ), key


@pytest.mark.slow
def test_shipped_weights_reproduce_recorded_responses(rows):
    import torch
    from transformers import AutoModelForCausalLM

    from utils.data import read_split
    from utils.evaluate import generate_responses
    from utils.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER))
    tok = load_tokenizer(TEACHER)
    test = read_split("test")[::STRIDE]
    recorded = rows[::STRIDE]
    got = generate_responses(
        model, tok, [r["messages"] for r in test], batch_size=64, max_new_tokens=96
    )
    mismatched = [
        (r["id"], r["response"], g)
        for r, g in zip(recorded, got, strict=True)
        if r["response"] != g
    ]
    assert len(mismatched) <= 0.01 * len(recorded), f"weights and card disagree: {mismatched[:3]}"


@pytest.mark.slow
def test_shipped_perplexity_matches_card(card):
    import torch
    from transformers import AutoModelForCausalLM

    from utils.data import read_split
    from utils.evaluate import perplexity
    from utils.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER))
    ppl = perplexity(model, load_tokenizer(TEACHER), read_split("test"))
    assert ppl == pytest.approx(card["metrics"]["perplexity"], rel=1e-3)
