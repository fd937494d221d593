"""The course's model family: one config dataclass -> a transformers causal LM.

Teacher and students are configs of ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, the
architectures of real distilled open-weight models (lesson 02). No copied model classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

Architecture = Literal["llama", "qwen2"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides a model's shape. Introduced in lesson 02."""

    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # None: about 8/3 * hidden_size, as in Llama
    max_position_embeddings: int = 256
    architecture: Architecture = "llama"
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}: pick sizes so that head_dim is an integer")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}")
        if self.architecture not in ("llama", "qwen2"):
            raise ValueError(f"architecture must be 'llama' or 'qwen2', got {self.architecture!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def hf_config(self) -> PretrainedConfig:
        """The transformers config for this shape."""
        intermediate = self.intermediate_size or _round_up(8 * self.hidden_size // 3, 16)
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.architecture == "llama":
            return LlamaConfig(**common)
        return Qwen2Config(**common)


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


def build_model(config: ModelConfig, *, seed: int | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM of the given shape (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    hf = config.hf_config()
    cls = LlamaForCausalLM if config.architecture == "llama" else Qwen2ForCausalLM
    return cls(hf)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
