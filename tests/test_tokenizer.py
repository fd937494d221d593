"""The world's tokenizer: round trip, single digits, chat template with assistant mask."""

from __future__ import annotations

import pytest

from utils.tokenizer import ASSISTANT, EOS, USER, load_tokenizer, tokenizer_dir, train_tokenizer

MSGS = [{"role": "user", "content": "What is 47 + 38?"},
        {"role": "assistant", "content": "47 + 38: ones 7 + 8 = 15. Answer: 85"}]


@pytest.fixture(scope="module")
def tok():
    if not (tokenizer_dir() / "tokenizer.json").exists():
        pytest.skip("data/tokenizer not built: run python -m utils.tokenizer build")
    return load_tokenizer()


def test_round_trip(tok):
    for text in ["Reverse the word talmor.", "How do I kill a Python process?", "  spaced  out ",
                 "1234567890", "h0w d0 1 br3w", "Ünïcode ✓"]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_digits_are_single_tokens(tok):
    pieces = [tok.decode([i]) for i in tok("x 12345 + 678")["input_ids"]]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345678")


def test_small_vocab_and_specials(tok):
    assert 512 <= len(tok) <= 1024
    assert tok.eos_token == EOS and tok.pad_token_id is not None
    for special in (USER, ASSISTANT, EOS):
        assert len(tok(special)["input_ids"]) == 1


def test_chat_template_and_assistant_mask(tok):
    enc = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(masked) == MSGS[1]["content"] + EOS  # the answer and its end token
    assert mask[0] == 0 and mask[-1] == 1 and ids[-1] == tok.eos_token_id
    text = tok.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True)
    assert text == f"{USER}What is 47 + 38?{EOS}{ASSISTANT}"


def test_chat_template_rejects_unknown_roles(tok):
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_train_tokenizer_small_corpus():
    t = train_tokenizer(["hello world 123", "hello there 45"] * 20, vocab_size=300)
    assert t.decode(t("hello 99")["input_ids"]) == "hello 99"
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], vocab_size=100)


def test_committed_tokenizer_is_trained_on_the_committed_training_split(tok):
    """A changed world needs a retrained tokenizer (``make data`` does both): BPE merges come
    from the training split, so a stale tokenizer would split the new texts differently."""
    import json

    from utils.tokenizer import build_world_tokenizer

    fresh = build_world_tokenizer()
    merges = [json.loads(t.backend_tokenizer.to_str())["model"]["merges"] for t in (fresh, tok)]
    assert fresh.get_vocab() == tok.get_vocab() and merges[0] == merges[1], \
        "run `python -m utils.tokenizer build` (or `make data`) and commit data/tokenizer/"
