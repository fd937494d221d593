"""A tiny chat tokenizer and model for the lesson-04 tests (serve, extraction, watermark).

Built in memory in a fraction of a second: a character-level-ish BPE (Metaspace, so text
decodes back exactly) trained on a few sentences, wrapped in ``PreTrainedTokenizerFast``
with a small Jinja chat template, and Llama models from ``utils.models.build_model``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from utils.models import ModelConfig, build_model

CORPUS = [
    "the teacher answers every question with a short clear sentence",
    "a small student learns to copy the teacher from its answers",
    "distillation through an api costs one query per answer",
    "watermarks hide a green list signal in the sampled words",
    "what is the capital of france? paris is the capital of france.",
    "how many legs does a spider have? a spider has eight legs.",
    "name a primary colour. red, blue and yellow are primary colours.",
    "why is the sky blue? sunlight scatters off the air, blue the most.",
    "user: hello! assistant: hello, how can i help you today?",
    "0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' - the end",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"]


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of exactly ``vocab_size`` tokens with a chat template."""
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   eos_token="<|end|>", unk_token="<|unk|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(tokenizer, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
               tie: bool = True, seed: int = 0):
    """A Llama model sized for ``tokenizer`` (vocab = len(tokenizer)), in eval mode."""
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                      num_heads=num_heads, tie_word_embeddings=tie,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return build_model(cfg, seed=seed).eval()


def assert_no_live_servers() -> None:
    """No teacher API thread is left running (used at the end of the server tests)."""
    import threading

    from utils import serve

    alive = [t.name for t in threading.enumerate() if t.name.startswith("dd-teacher-api")]
    assert not alive, f"servers left running: {alive}"
    assert not serve._LIVE, f"handles not stopped: {serve._LIVE}"
