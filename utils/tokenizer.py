"""The world's tokenizer: a small byte-level BPE with single-digit tokens (lesson 02).

Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant) trained with ``tokenizers``
on the world's training split. Digits are split one per token before BPE runs, so a number is
always spelled digit by digit and arithmetic is learnable (the LLaMA tokenizer does the
same). Saved as a ``transformers.PreTrainedTokenizerFast`` with a Jinja chat template, so
``apply_chat_template`` works as for real chat models, including
``return_assistant_tokens_mask=True`` (the template marks assistant turns with
``{% generation %}``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from utils.io import replace_dir
from utils.paths import data_dir

PAD, BOS, USER, ASSISTANT, EOS = "<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, USER, ASSISTANT, EOS)
VOCAB_SIZE = 768

# One user turn, one assistant turn, ... The assistant's text and its end token are what the
# model is trained on (the generation block); add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tokenizer_dir() -> Path:
    return data_dir() / "tokenizer"


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs the 256 "
                         f"bytes plus {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT], model_max_length=512,
        padding_side="right", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def world_texts(records: Iterable[dict]) -> list[str]:
    """The message texts of the world's records (what the tokenizer is trained on)."""
    return [m["content"] for r in records for m in r["messages"]]


def build_world_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The course tokenizer, trained on the committed training split."""
    from utils.data import read_split

    return train_tokenizer(world_texts(read_split("train")), vocab_size)


def load_tokenizer(path: str | Path | None = None):
    """Load a saved tokenizer (default ``data/tokenizer/``) as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path) if path else tokenizer_dir()
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer in {path}: run `python -m utils.tokenizer build`")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok, path: str | Path | None = None) -> Path:
    """Save into ``path`` atomically: a temporary sibling folder renamed into place."""
    import shutil
    import tempfile

    path = Path(path) if path else tokenizer_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        tok.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.tokenizer")
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    path = save_tokenizer(build_world_tokenizer())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
