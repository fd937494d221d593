"""SFT helpers: labels on assistant tokens only, padding, deterministic training."""

from __future__ import annotations

import pytest
import torch

from utils.train import IGNORE_INDEX, PadCollator, mask_labels, tokenize_chat, train_lm


def test_mask_labels_hand_case():
    ids = [5, 6, 7, 8, 9]
    mask = [0, 0, 1, 1, 0]
    assert mask_labels(ids, mask) == [-100, -100, 7, 8, -100]
    t = mask_labels(
        torch.tensor([ids, ids]), torch.tensor([mask, [1, 1, 1, 1, 1]]), ignore_index=-1
    )
    assert t.tolist() == [[-1, -1, 7, 8, -1], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="match token for token"):
        mask_labels([1, 2], [1])


def test_collator_pads_right():
    batch = PadCollator(pad_token_id=0)([
        {"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1], "labels": [-100, 4, 5]},
        {"input_ids": [6], "attention_mask": [1], "labels": [6]},
    ])
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 4, 5], [6, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.fixture(scope="module")
def tok():
    from utils.tokenizer import load_tokenizer, tokenizer_dir

    if not (tokenizer_dir() / "tokenizer.json").exists():
        pytest.skip("data/tokenizer not built")
    return load_tokenizer()


def test_tokenize_chat_labels_only_the_answer(tok):
    msgs = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Answer: 4"},
    ]
    out = tokenize_chat({"messages": [msgs]}, tok)
    labels = [t for t in out["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(labels) == "Answer: 4<|end|>"
    assert len(out["input_ids"][0]) == len(out["attention_mask"][0]) == len(out["labels"][0])


def _tiny_run(tok, seed):
    from datasets import Dataset

    from utils.models import ModelConfig, build_model

    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                          {"role": "assistant", "content": f"Answer: {2 * a}"}]} for a in range(40)]
    ds = Dataset.from_list(rows)
    model = build_model(
        ModelConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        seed=seed,
    )
    res = train_lm(
        model,
        tok,
        ds,
        ds.select(range(8)),
        max_steps=6,
        batch_size=8,
        lr=1e-2,
        seed=seed,
        eval_steps=3,
        logging_steps=1,
        progress=False,
    )
    return res


def test_training_is_deterministic_and_learns(tok):
    torch.set_num_threads(1)
    a, b = _tiny_run(tok, 0), _tiny_run(tok, 0)
    assert a.train_losses == b.train_losses and len(a.train_losses) == 6
    assert a.eval_losses == b.eval_losses and len(a.eval_losses) == 2
    assert a.train_losses[-1][1] < a.train_losses[0][1]
    c = _tiny_run(tok, 1)
    assert c.train_losses != a.train_losses
    assert a.train_seconds > 0 and a.steps == 6
