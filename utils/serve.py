"""A real, OpenAI-compatible teacher API on 127.0.0.1 (lesson 04: distillation through an API).

The attacker of lesson 04 only sees what an API gives: text, and maybe the log-probabilities
of the top few tokens. This module serves a transformers causal LM behind the same HTTP
interface as OpenAI's chat completions (FastAPI + uvicorn), so the attacking code is the
official ``openai`` client and runs unchanged against vLLM, llama.cpp's server or Ollama::

    handle = start_server(model, tokenizer, ServerConfig(api_keys={"sk-student": 200}))
    client = openai.OpenAI(base_url=handle.base_url, api_key="sk-student")
    client.chat.completions.create(model=handle.model_name, messages=[...], logprobs=True,
                                   top_logprobs=5, max_tokens=16)
    handle.stop()

``min_tokens`` (vLLM's extension, sent with ``extra_body={"min_tokens": n}``) keeps the model
from stopping before n tokens: lesson 04 uses it for long answers to watermark.
``logit_bias`` (OpenAI's: token id as a string -> bias in [-100, 100], at most 300 entries)
is added to the logits before greedy choice or sampling, and the logprobs returned are those
of the biased distribution, as OpenAI's are: with top-k logprobs, the lever of Carlini et al.
(2024) to read logprobs outside the top-k.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/usage`` (this
server's own: budget used and left, requests seen including rejected ones). Every route,
unknown ones included, needs a valid key; there is no schema or docs page. Every answer to a
valid key carries the headers ``x-budget-limit``/``x-budget-remaining`` and ``x-ratelimit-*``.
Every error, an unexpected one too, uses OpenAI's body ``{"error": {"message", "type",
"param", "code"}}`` and status codes: 401 missing or wrong key, 400 malformed body or a
parameter out of range (``param`` names it), 400 ``context_length_exceeded`` when the prompt
plus ``max_tokens`` do not fit the model's context (checked before the model runs), 404
unknown model or URL, 413 body too large, 429 rate limit (``rate_limit_exceeded``, with
``retry-after-ms``) or budget spent (``insufficient_quota``, with ``x-should-retry: false`` so
the client does not retry), 500 ``server_error``.

Defences (:class:`Defences`), the knobs a provider has against extraction (Carlini et al.
2024, Sec. 8; Kirchenbauer et al. 2023): a cap on ``top_logprobs``, no logprobs at all,
rounding, Gaussian/Laplace noise on the returned logprobs, and a Kirchenbauer watermark on
the sampled text (transformers' ``WatermarkingConfig`` passed to ``generate``). The
defender's view: ``ServerConfig(request_log=True)`` keeps the last requests in memory (key
redacted, token counts, parameters, status), read with :meth:`ServerHandle.request_log`.

Returned logprobs are the model's own next-token distribution at temperature 1 (vLLM's
default "raw logprobs"), plus the request's ``logit_bias``: temperature, top-p, ``min_tokens``
and the watermark change which token is sampled, not the numbers reported. Token strings are
the tokenizer's vocabulary pieces (unique per id, so an attacker can map them back with
``convert_tokens_to_ids``), or ``"token_id:N"`` with ``token_format="id"`` (vLLM's
``--return-tokens-as-token-ids``).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import math
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

logger = logging.getLogger(__name__)

NoiseKind = Literal["gaussian", "laplace"]
TokenFormat = Literal["piece", "id"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's range for ``seed``
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI
MAX_MESSAGES = 2048  # messages per request: bounds the chat-template work
DEFAULT_CONTEXT_LENGTH = 2048  # for a model whose config has no max_position_embeddings
MAX_WATERMARK_BIAS = 100.0  # the largest watermark bias the server accepts (logit_bias's bound)


@dataclass(frozen=True)
class Defences:
    """Switchable defences against extraction. The default is an undefended API.

    - ``max_top_logprobs``: requests asking for more alternatives get a 400 (OpenAI caps at
      20). ``None`` allows the whole vocabulary, which is what Carlini et al.'s attack needs.
    - ``logprobs_enabled=False``: no logprobs at all (requests with ``logprobs`` get a 400).
    - ``round_decimals``: round every returned logprob to this many decimals.
    - ``noise`` / ``noise_scale``: add fresh Gaussian or Laplace noise (scale in nats) to
      every returned logprob (clipped at 0 so they stay log-probabilities).
    - ``watermark``: a ``transformers.WatermarkingConfig`` (or its ``to_dict()``) applied
      while choosing every token, greedy or sampled (Kirchenbauer et al. 2023): the green
      lists depend only on the previous token(s) and the hashing key, so the same request
      with the same seed gets the same watermarked answer. ``bias`` must be in
      (0, ``MAX_WATERMARK_BIAS``] and ``greenlist_ratio`` in (0, 1).

    The top-k alternatives are picked from the true logprobs; noise and rounding change
    the values returned, not which tokens are listed.
    """

    max_top_logprobs: int | None = None
    logprobs_enabled: bool = True
    round_decimals: int | None = None
    noise: NoiseKind | None = None
    noise_scale: float = 0.0
    watermark: Any | None = None  # transformers.WatermarkingConfig

    def __post_init__(self) -> None:
        if self.max_top_logprobs is not None and self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0 or None, got {self.max_top_logprobs}")
        if self.round_decimals is not None and self.round_decimals < 0:
            raise ValueError(f"round_decimals must be >= 0 or None, got {self.round_decimals}")
        if self.noise not in (None, "gaussian", "laplace"):
            raise ValueError(f"noise must be None, 'gaussian' or 'laplace', got {self.noise!r}")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")
        if self.noise is not None and self.noise_scale == 0:
            raise ValueError("noise is set but noise_scale is 0: give a scale in nats, e.g. 0.5")
        if self.watermark is not None:
            object.__setattr__(self, "watermark", _checked_watermark(self.watermark))


def _checked_watermark(watermark: Any) -> Any:
    """``watermark`` as a validated ``WatermarkingConfig``, or a ``ValueError`` naming the fix."""
    from transformers import WatermarkingConfig

    if isinstance(watermark, Mapping):
        unknown = set(watermark) - set(WatermarkingConfig().to_dict())
        if unknown:
            raise ValueError(f"watermark has unknown settings {sorted(unknown)}: use "
                             "WatermarkingConfig's greenlist_ratio, bias, hashing_key, "
                             "seeding_scheme, context_width")
        watermark = WatermarkingConfig(**watermark)
    if not isinstance(watermark, WatermarkingConfig):
        raise ValueError(f"watermark must be a transformers.WatermarkingConfig (or its dict), "
                         f"got {type(watermark).__name__}")
    bias, gamma = watermark.bias, watermark.greenlist_ratio
    if not (isinstance(bias, int | float) and math.isfinite(bias)
            and 0 < bias <= MAX_WATERMARK_BIAS):
        raise ValueError(f"watermark bias must be in (0, {MAX_WATERMARK_BIAS:g}] (a logit "
                         f"bias, as OpenAI's logit_bias range), got {bias!r}: e.g. 2 to 10")
    if not (isinstance(gamma, int | float) and 0 < gamma < 1):
        raise ValueError(f"watermark greenlist_ratio must be in (0, 1), got {gamma!r}: "
                         "e.g. 0.25")
    if watermark.seeding_scheme not in ("lefthash", "selfhash"):
        raise ValueError(f"watermark seeding_scheme must be 'lefthash' or 'selfhash', got "
                         f"{watermark.seeding_scheme!r}")
    if not (isinstance(watermark.context_width, int) and watermark.context_width >= 1):
        raise ValueError(f"watermark context_width must be an int >= 1, got "
                         f"{watermark.context_width!r}")
    return watermark


@dataclass(frozen=True)
class ServerConfig:
    """How the teacher API behaves.

    ``api_keys`` maps each client's key to its query budget (``None``: unlimited). Only
    successful chat completions are billed. ``rate_limit`` is requests per second per key
    (token bucket holding ``rate_burst`` requests), ``None`` for no limit.
    ``context_length`` bounds prompt plus completion tokens (``None``: the model's
    ``max_position_embeddings``); ``max_body_bytes`` bounds a request's body.
    ``request_log=True`` keeps the last ``request_log_size`` requests in memory for
    :meth:`ServerHandle.request_log` (the defender's view, lesson 04).

    ``max_batch_size > 1`` turns on server-side batching (as vLLM's continuous batching, in
    its simplest form): requests in flight at the same time with the same decoding settings
    (temperature, top-p, ``max_tokens``, ``min_tokens``) are answered by one left-padded
    ``generate`` call of up to ``max_batch_size`` rows; the batcher waits at most
    ``batch_wait_ms`` for more after the first. Each row keeps its own ``logit_bias``,
    logprobs and seed (a sampled row draws from its own generator seeded with the request's
    ``seed``), so an answer does not depend on which other requests shared its batch. The
    default, 1, answers one request at a time.
    """

    api_keys: Mapping[str, int | None] = field(default_factory=lambda: {"sk-student": 1000})
    model_name: str = "dd-teacher"
    rate_limit: float | None = None
    rate_burst: int = 5
    default_max_tokens: int = 64
    max_tokens_limit: int = 256
    token_format: TokenFormat = "piece"
    defences: Defences = field(default_factory=Defences)
    noise_seed: int = 0  # seeds the defence noise (not the sampling: that is the request's seed)
    context_length: int | None = None
    max_body_bytes: int = 1 << 20
    request_log: bool = False
    request_log_size: int = 10_000
    max_batch_size: int = 1
    batch_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if not self.api_keys:
            raise ValueError("api_keys is empty: give at least one key, e.g. {'sk-student': 100}")
        for key, budget in self.api_keys.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"API keys must be non-empty strings, got {key!r}")
            if budget is not None and budget < 0:
                raise ValueError(f"budget for key {key!r} must be >= 0 or None, got {budget}")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"rate_limit must be > 0 requests/s or None, got {self.rate_limit}")
        if self.rate_burst < 1:
            raise ValueError(f"rate_burst must be >= 1, got {self.rate_burst}")
        if self.token_format not in ("piece", "id"):
            raise ValueError(f"token_format must be 'piece' or 'id', got {self.token_format!r}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 tokens or None, got "
                             f"{self.context_length}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.request_log_size < 1:
            raise ValueError(f"request_log_size must be >= 1, got {self.request_log_size}")
        if not isinstance(self.max_batch_size, int) or not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max_batch_size must be an int from 1 (no batching) to 1024, got "
                             f"{self.max_batch_size!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000] ms, got {self.batch_wait_ms}")


# ----------------------------------------------------------------------------------------
# Request schema (a subset of OpenAI's chat completions)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


_Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]  # OpenAI's range


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` that this server understands."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension (extra_body)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, _Bias] | None = None
    n: int = 1
    stream: bool = False


class APIError(Exception):
    """An error answered with OpenAI's JSON body."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ----------------------------------------------------------------------------------------
# Accounting: budget and rate limit per key


class _Ledger:
    """Per-key budget and token-bucket rate limiter (thread-safe)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.used = {k: 0 for k in config.api_keys}
        self.tokens = {k: float(config.rate_burst) for k in config.api_keys}
        self.stamp = {k: time.monotonic() for k in config.api_keys}
        self.reserved = {k: 0 for k in config.api_keys}
        self.requests = {k: 0 for k in config.api_keys}  # every authenticated chat request

    def remaining(self, key: str) -> int | None:
        budget = self.config.api_keys[key]
        return None if budget is None else max(budget - self.used[key], 0)

    def headers(self, key: str) -> dict[str, str]:
        budget = self.config.api_keys[key]
        h = {"x-budget-used": str(self.used[key])}
        if budget is not None:
            h["x-budget-limit"] = str(budget)
            h["x-budget-remaining"] = str(self.remaining(key))
        if self.config.rate_limit is not None:
            h["x-ratelimit-limit-requests"] = str(self.config.rate_burst)
            h["x-ratelimit-remaining-requests"] = str(int(self.tokens[key]))
        return h

    def admit(self, key: str) -> None:
        """Reserve one query for ``key`` or raise the 429 the API would answer."""
        with self.lock:
            budget = self.config.api_keys[key]
            if budget is not None and self.used[key] + self.reserved[key] >= budget:
                raise APIError(
                    429, f"You exceeded your current quota of {budget} queries for this key.",
                    "insufficient_quota", "insufficient_quota",
                    headers={**self.headers(key), "x-should-retry": "false"})
            rate = self.config.rate_limit
            if rate is not None:
                now = time.monotonic()
                self.tokens[key] = min(float(self.config.rate_burst),
                                       self.tokens[key] + (now - self.stamp[key]) * rate)
                self.stamp[key] = now
                if self.tokens[key] < 1.0:
                    wait = (1.0 - self.tokens[key]) / rate
                    raise APIError(
                        429, f"Rate limit reached: {rate:g} requests per second per key. "
                             f"Please try again in {wait * 1000:.0f}ms.",
                        "requests", "rate_limit_exceeded",
                        headers={**self.headers(key), "retry-after-ms": f"{wait * 1000:.0f}",
                                 "retry-after": str(max(1, math.ceil(wait))),
                                 "x-ratelimit-reset-requests": f"{wait:.3f}s"})
                self.tokens[key] -= 1.0
            self.reserved[key] += 1

    def settle(self, key: str, billed: bool) -> None:
        with self.lock:
            self.reserved[key] -= 1
            if billed:
                self.used[key] += 1


# ----------------------------------------------------------------------------------------
# The defender's view: an in-memory, bounded request log

LOG_FIELDS = ("time", "key", "key_id", "method", "path", "status", "code", "latency_ms",
              "prompt_tokens", "completion_tokens", "max_tokens", "temperature", "seed",
              "logprobs", "top_logprobs", "logit_bias_size", "prompt_hash")


def redact_key(key: str) -> str:
    """A key as a provider's dashboard shows it: ``sk-...cker`` (never the secret itself)."""
    if len(key) >= 10:
        return f"{key[:3]}...{key[-4:]}"
    return f"{key[:3]}...{key[-2:]}" if len(key) > 6 else "***"


def key_id(key: str) -> str:
    """A short, stable id of a key (8 hex digits of its SHA-256) to group requests by key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class _RequestLog:
    """The last ``size`` requests, one flat dict each (thread-safe, oldest dropped first)."""

    def __init__(self, size: int) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.entries.append({f: entry.get(f) for f in LOG_FIELDS})

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(e) for e in self.entries]


# ----------------------------------------------------------------------------------------
# The model behind the API


class LogitBiasProcessor(LogitsProcessor):
    """OpenAI's ``logit_bias`` as a transformers logits processor (lesson 04).

    Adds ``bias`` (a ``(V,)`` vector) to the logits at every step. ``generate`` runs custom
    processors before temperature, top-p and the watermark, so greedy choice and sampling
    both see the bias. Out of place: ``output_logits=True`` keeps the raw logits.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        return scores + self.bias.to(device=scores.device, dtype=scores.dtype)  # (B, V)


class _SeededRowSampler(LogitsProcessor):
    """Draws each row's next token from its own ``torch.Generator`` (server-side batching).

    The last processor of a batched sampled ``generate`` run greedily: it samples row ``b``
    from ``softmax(scores[b])`` exactly as ``generate`` samples a batch of one after
    ``torch.manual_seed(seed_b)``, and returns scores whose argmax is the drawn token. So a
    request's seeded answer does not depend on the other rows of its batch.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(seed))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)  # (B, V), as generate's sampling step
        picked = torch.stack([
            torch.multinomial(probs[b:b + 1].cpu(), num_samples=1, generator=g)[0, 0]
            for b, g in enumerate(self.generators)])  # (B,)
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(scores.shape[0]), picked.to(scores.device)] = 0.0
        return out


class _Engine:
    """Runs ``generate`` for one request (or one batch) at a time and shapes the response."""

    def __init__(self, model, tokenizer, config: ServerConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lock = threading.Lock()
        self.noise_rng = np.random.default_rng(config.noise_seed)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        text_config = model.config.get_text_config() if hasattr(model, "config") else None
        self.text_vocab_size = int(getattr(text_config, "vocab_size", None) or self.vocab_size)
        if config.context_length is not None:
            self.context_length = int(config.context_length)
        else:
            positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            self.context_length = int(positions) if positions else DEFAULT_CONTEXT_LENGTH
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template: set tokenizer.chat_template "
                             "(a Jinja string) so the server can format messages")

    def token_string(self, token_id: int) -> str:
        if self.config.token_format == "id":
            return f"token_id:{token_id}"
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return piece if piece is not None else f"token_id:{token_id}"

    def _defend(self, values: np.ndarray) -> np.ndarray:
        d = self.config.defences
        out = values.astype(np.float64)
        if d.noise == "gaussian":
            out = out + self.noise_rng.normal(0.0, d.noise_scale, size=out.shape)
        elif d.noise == "laplace":
            out = out + self.noise_rng.laplace(0.0, d.noise_scale, size=out.shape)
        if d.noise is not None:
            out = np.minimum(out, 0.0)
        if d.round_decimals is not None:
            out = np.round(out, d.round_decimals)
        return out

    def encode(self, req: ChatCompletionRequest) -> torch.Tensor:
        """The prompt's token ids, ``(1, T)``: the chat template applied to the messages."""
        tok = self.tokenizer
        messages = [m.model_dump() for m in req.messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def completion_tokens(self, req: ChatCompletionRequest, prompt_len: int) -> int:
        """``max_new_tokens`` for this request, or the 400 ``context_length_exceeded``."""
        ctx = self.context_length
        requested = req.max_completion_tokens or req.max_tokens
        # as OpenAI: without max_tokens only the prompt (and min_tokens) must fit
        need = requested if requested is not None else max(1, req.min_tokens or 0)
        if prompt_len + need <= ctx:
            return requested if requested is not None else min(
                self.config.default_max_tokens, ctx - prompt_len)
        head = f"This model's maximum context length is {ctx} tokens. However, "
        if requested is None and prompt_len >= ctx:
            message = (f"{head}your messages resulted in {prompt_len} tokens. Please reduce the "
                       "length of the messages.")
        else:
            message = (f"{head}you requested {prompt_len + need} tokens ({prompt_len} in the "
                       f"messages, {need} in the completion). Please reduce the length of the "
                       "messages or completion.")
        raise APIError(400, message, "invalid_request_error", "context_length_exceeded",
                       "messages")

    def bias_vector(self, logit_bias: Mapping[str, float] | None) -> torch.Tensor | None:
        """The request's ``logit_bias`` as a dense ``(V,)`` vector (``None`` when empty)."""
        if not logit_bias:
            return None
        bias = torch.zeros(self.vocab_size, dtype=torch.float32)
        for token, value in logit_bias.items():
            bias[int(token)] = float(value)
        return bias

    def complete(self, req: ChatCompletionRequest, input_ids: torch.Tensor | None = None,
                 max_new: int | None = None) -> dict:
        """One request: a batch of one through :meth:`complete_many` (one generation path)."""
        if input_ids is None:
            input_ids = self.encode(req)
        if max_new is None:
            max_new = self.completion_tokens(req, input_ids.shape[1])
        return self.complete_many([(req, input_ids, max_new)])[0]

    def batch_key(self, req: ChatCompletionRequest, max_new: int) -> tuple:
        """Requests with equal keys can share one batched ``generate`` call."""
        sampled = req.temperature > 0
        return (sampled, req.temperature if sampled else 0.0, req.top_p if sampled else 1.0,
                int(max_new), int(req.min_tokens or 0))

    def complete_many(self, jobs: list[tuple[ChatCompletionRequest, torch.Tensor, int]],
                      ) -> list[dict]:
        """Answer requests of one :meth:`batch_key` with one left-padded ``generate`` call.

        ``jobs`` are ``(request, input_ids (1, T), max_new)``. Each row has its own
        ``logit_bias`` and, when sampled, its own generator seeded with its request's seed
        (:class:`_SeededRowSampler`): the answer is the one the request gets alone.
        """
        tok = self.tokenizer
        first, _, max_new = jobs[0]
        key = self.batch_key(first, max_new)
        if any(self.batch_key(r, m) != key for r, _, m in jobs):
            raise ValueError("complete_many: the requests of one batch must share a batch_key")
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        lens = [int(ids.shape[1]) for _, ids, _ in jobs]
        width = max(lens)
        x = torch.full((len(jobs), width), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(x)
        for row, (_, ids, _) in enumerate(jobs):
            x[row, width - lens[row]:] = ids[0]
            mask[row, width - lens[row]:] = 1
        biases = [self.bias_vector(r.logit_bias) for r, _, _ in jobs]
        processors = LogitsProcessorList()
        if any(b is not None for b in biases):
            zero = torch.zeros(self.vocab_size, dtype=torch.float32)
            stacked = torch.stack([zero if b is None else b for b in biases])  # (B, V)
            processors.append(LogitBiasProcessor(stacked))
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, return_dict_in_generate=True, output_logits=True,
            pad_token_id=pad, eos_token_id=eos,
            do_sample=False, temperature=None, top_p=None, top_k=None)
        if first.min_tokens:
            kwargs["min_new_tokens"] = first.min_tokens
        watermark = self.config.defences.watermark
        if first.temperature > 0:
            # generate's own sampling order, then one draw per row from the row's generator
            if first.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(first.temperature))
            if first.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=first.top_p, min_tokens_to_keep=1))
            if watermark is not None:
                processors.append(watermark.construct_processor(self.text_vocab_size, device))
            processors.append(_SeededRowSampler(
                [r.seed if r.seed is not None else secrets.randbits(63) for r, _, _ in jobs]))
        elif watermark is not None:
            kwargs["watermarking_config"] = watermark
        if processors:
            kwargs["logits_processor"] = processors
        with self.lock, torch.no_grad():
            out = self.model.generate(input_ids=x.to(device), attention_mask=mask.to(device),
                                      **kwargs)
        return [self._body(req, lens[row], out.sequences[row, width:].tolist(),
                           [step[row] for step in out.logits], biases[row])
                for row, (req, _, _) in enumerate(jobs)]

    def _body(self, req: ChatCompletionRequest, prompt_len: int, new_ids: list[int],
              step_logits: list[torch.Tensor], bias: torch.Tensor | None) -> dict:
        """The OpenAI chat completion for one answer: ``new_ids`` (cut at the end token)
        and the raw logits of each generated position (``(V,)`` each)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        finish = "length"
        if eos is not None and eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
            finish = "stop"
        content = tok.decode(new_ids, skip_special_tokens=True)
        logprobs = None
        if req.logprobs:
            k = req.top_logprobs or 0
            entries = []
            for i, tid in enumerate(new_ids):
                # the raw logits (before any processor): add the bias by hand
                logits = step_logits[i].float()  # (V,)
                if bias is not None:
                    logits = logits + bias.to(logits.device)
                lp = torch.log_softmax(logits, dim=-1)  # (V,)
                top = torch.topk(lp, k).indices.tolist() if k > 0 else []
                ids = [tid, *top]
                vals = self._defend(lp[ids].cpu().numpy())
                entries.append({
                    "token": self.token_string(tid), "logprob": float(vals[0]),
                    "bytes": list(self.token_string(tid).encode("utf-8")),
                    "top_logprobs": [
                        {"token": self.token_string(t), "logprob": float(v),
                         "bytes": list(self.token_string(t).encode("utf-8"))}
                        for t, v in zip(top, vals[1:], strict=True)],
                })
            logprobs = {"content": entries, "refusal": None}
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "system_fingerprint": "dd-local",
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content,
                                     "refusal": None}}],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(new_ids),
                      "total_tokens": prompt_len + len(new_ids)},
        }


class _Batcher:
    """Server-side batching: one thread answers the requests in flight, a batch at a time.

    A request waits in a queue with its :meth:`_Engine.batch_key`; the thread takes the
    oldest, adds every waiting request of the same key (up to ``max_batch_size``, waiting at
    most ``batch_wait_ms`` for more) and answers them with :meth:`_Engine.complete_many`.
    Requests of another key wait for a later batch, oldest first.
    """

    def __init__(self, engine: _Engine, config: ServerConfig, name: str) -> None:
        self.engine, self.max_size = engine, config.max_batch_size
        self.wait = config.batch_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.stats = {"batches": 0, "requests": 0, "largest": 0}
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, req: ChatCompletionRequest, input_ids: torch.Tensor,
               max_new: int) -> Future:
        future: Future = Future()
        self.queue.put((self.engine.batch_key(req, max_new), (req, input_ids, max_new), future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.stats)

    def _run(self) -> None:
        backlog: deque = deque()
        closing = False
        while not closing:
            first = backlog.popleft() if backlog else self.queue.get()
            if first is None:
                break
            batch, keep = [first], deque()
            for job in backlog:  # waiting requests of the same key join, oldest first
                (batch if job[0] == first[0] and len(batch) < self.max_size else keep).append(job)
            backlog = keep
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_size:
                try:
                    job = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                (batch if job[0] == first[0] else backlog).append(job)
            self._answer(batch)
        for job in backlog:  # pragma: no cover - only when stopped with requests waiting
            _settle(job[2], error=RuntimeError("the server stopped"))

    def _answer(self, batch: list) -> None:
        with self.lock:
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["largest"] = max(self.stats["largest"], len(batch))
        try:
            bodies = self.engine.complete_many([job for _, job, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            for _, _, future in batch:
                _settle(future, error=exc)
            return
        for (_, _, future), body in zip(batch, bodies, strict=True):
            _settle(future, result=body)


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless its request was cancelled (the client went away)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # pragma: no cover - cancelled meanwhile
        pass


# ----------------------------------------------------------------------------------------
# The gateway in front of every route: key, body size, request log, JSON errors


def _authenticate(scope: Mapping[str, Any], config: ServerConfig) -> str:
    """The request's API key, or the 401 OpenAI answers."""
    header = ""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            header = value.decode("latin-1")
            break
    if not header:
        raise APIError(401, "You didn't provide an API key. Send it in the Authorization "
                            "header as 'Bearer YOUR_KEY'.", "invalid_request_error",
                       "missing_api_key")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or key not in config.api_keys:
        shown = (key[:3] + "..." + key[-2:]) if len(key) > 6 else "***"
        raise APIError(401, f"Incorrect API key provided: {shown}.",
                       "invalid_request_error", "invalid_api_key")
    return key


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"Request body too large: {size} bytes. This server accepts at most "
                         f"{limit} bytes.", "invalid_request_error", "request_too_large")


class _Gateway:
    """ASGI middleware before routing: every route needs a key, bodies are bounded, every
    failure (an unexpected exception too) is OpenAI's JSON error, and requests are logged."""

    def __init__(self, app, *, config: ServerConfig, log: _RequestLog | None) -> None:
        self.app, self.config, self.log = app, config, log

    def _bounded(self, scope: Mapping[str, Any], receive):
        limit = self.config.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise APIError(400, "Invalid Content-Length header.",
                                   "invalid_request_error", "invalid_request") from None
                if declared > limit:
                    raise _too_large(declared, limit)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body without Content-Length
                    raise _too_large(seen, limit)
            return message

        return bounded_receive

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, wall = time.monotonic(), time.time()
        note: dict[str, Any] = {}  # the route adds token counts and parameters
        state = scope.setdefault("state", {})
        state["log"] = note
        status = 0
        key: str | None = None
        logged = False

        def record() -> None:
            nonlocal logged
            if self.log is not None and not logged:
                logged = True
                self.log.add({**note, "time": wall, "method": scope.get("method"),
                              "path": scope.get("path"), "status": status or 500,
                              "latency_ms": round((time.monotonic() - start) * 1000, 2),
                              "key": None if key is None else redact_key(key),
                              "key_id": None if key is None else key_id(key)})

        async def watched_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                record()  # before the client can read the answer and then the log
            await send(message)

        try:
            key = _authenticate(scope, self.config)
            state["key"] = key
            await self.app(scope, self._bounded(scope, receive), watched_send)
        except APIError as err:
            if status:  # pragma: no cover - the answer has started: nothing to fix
                raise
            note["code"] = err.code
            await _error_response(err)(scope, receive, watched_send)
        except Exception as exc:  # noqa: BLE001 - every failure gets a JSON answer
            if status:  # pragma: no cover
                raise
            logger.error("teacher API: unexpected error on %s %s", scope.get("method"),
                         scope.get("path"), exc_info=exc)
            note["code"] = "server_error"
            err = APIError(500, "The server had an error while processing your request "
                                f"({type(exc).__name__}). Sorry about that!", "server_error")
            await _error_response(err)(scope, receive, watched_send)
        finally:
            record()  # no answer was sent (the client went away): log it anyway


# ----------------------------------------------------------------------------------------
# The FastAPI app


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    return f"Invalid value for '{param}': {err.get('msg')}", param


def create_app(model, tokenizer, config: ServerConfig | None = None, *,
               batcher_name: str = "dd-teacher-api-batcher"):
    """The FastAPI application serving ``model`` (use :func:`start_server` to run it).

    With ``config.max_batch_size > 1`` it starts the batching thread (``batcher_name``);
    ``app.state.batcher.close()`` stops it (:meth:`ServerHandle.stop` does).
    """
    config = config or ServerConfig()
    engine = _Engine(model, tokenizer, config)
    batcher = _Batcher(engine, config, batcher_name) if config.max_batch_size > 1 else None
    ledger = _Ledger(config)
    log = _RequestLog(config.request_log_size) if config.request_log else None
    # no /docs, /redoc or /openapi.json: a provider does not publish its schema unauthenticated
    app = FastAPI(title="Distill & Deploy teacher API", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ledger = ledger
    app.state.batcher = batcher
    app.state.request_log = log
    app.state.context_length = engine.context_length
    app.add_middleware(_Gateway, config=config, log=log)
    bad = "invalid_request_error"

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access "
                                f"to it. This server serves `{config.model_name}`.",
                           bad, "model_not_found", "model")

    def validate(req: ChatCompletionRequest) -> None:
        d = config.defences
        if req.n != 1:
            raise APIError(400, f"Only n=1 is supported (got n={req.n}): send one request per "
                                "completion.", bad, "invalid_value", "n")
        if req.stream:
            raise APIError(400, "stream=true is not supported by this server.", bad,
                           "invalid_value", "stream")
        max_new = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        if max_new > config.max_tokens_limit:
            which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{which} is too large: {max_new}. This model supports at "
                                f"most {config.max_tokens_limit} completion tokens.", bad,
                           "invalid_value", which)
        if req.min_tokens is not None and req.min_tokens > max_new:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must be at most max_tokens "
                                f"({max_new}).", bad, "invalid_value", "min_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "logprobs must be set to true if top_logprobs is used.", bad,
                           "invalid_value", "top_logprobs")
        if req.logprobs and not d.logprobs_enabled:
            raise APIError(400, "logprobs are not available from this API.", bad,
                           "logprobs_disabled", "logprobs")
        if req.top_logprobs:
            cap = engine.vocab_size if d.max_top_logprobs is None else min(
                d.max_top_logprobs, engine.vocab_size)
            if req.top_logprobs > cap:
                raise APIError(400, f"top_logprobs must be at most {cap}, got "
                                    f"{req.top_logprobs}.", bad, "invalid_value", "top_logprobs")
        if req.logit_bias:
            if len(req.logit_bias) > MAX_LOGIT_BIAS:
                raise APIError(400, f"logit_bias has {len(req.logit_bias)} entries: at most "
                                    f"{MAX_LOGIT_BIAS} are allowed.", bad, "invalid_value",
                               "logit_bias")
            for token in req.logit_bias:
                # canonical non-negative integers only ("7", not "07", "+7" or "7.0")
                ok = (0 < len(token) <= 12 and token.isascii() and token.isdigit()
                      and str(int(token)) == token)
                if not ok or int(token) >= engine.vocab_size:
                    raise APIError(400, f"Invalid key in 'logit_bias': {token[:20]!r}. Keys are "
                                        f"token ids from 0 to {engine.vocab_size - 1}, written "
                                        "as strings, e.g. '42'.", bad, "invalid_value",
                                   "logit_bias")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.log["code"] = exc.code
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"Invalid URL ({where})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({where})"
        else:  # pragma: no cover - no route raises other HTTP errors
            message = f"{exc.detail} ({where})"
        return _error_response(APIError(exc.status_code, message, bad))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        key = request.state.key  # authenticated by the gateway
        note = request.state.log
        with ledger.lock:
            ledger.requests[key] += 1
        raw = await request.body()  # bounded by the gateway (413)
        try:
            data = json.loads(raw)
        except Exception:  # noqa: BLE001 - any undecodable body is the client's error
            raise APIError(400, "We could not parse the JSON body of your request.",
                           bad, "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", bad, "invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, bad, "invalid_value", param) from None
        note.update(max_tokens=req.max_completion_tokens or req.max_tokens,
                    temperature=req.temperature, seed=req.seed, logprobs=req.logprobs,
                    top_logprobs=req.top_logprobs, logit_bias_size=len(req.logit_bias or {}))
        check_model(req.model)
        validate(req)
        # tokenize off the event loop, then check the context length before the model runs
        input_ids = await run_in_threadpool(engine.encode, req)  # (1, T)
        prompt_len = int(input_ids.shape[1])
        note.update(prompt_tokens=prompt_len, prompt_hash=hashlib.sha256(
            input_ids.numpy().tobytes()).hexdigest()[:8])
        max_new = engine.completion_tokens(req, prompt_len)
        ledger.admit(key)
        billed = False
        try:
            if batcher is not None:
                body = await asyncio.wrap_future(batcher.submit(req, input_ids, max_new))
            else:
                body = await run_in_threadpool(engine.complete, req, input_ids, max_new)
            billed = True
        finally:
            ledger.settle(key, billed)
        note["completion_tokens"] = body["usage"]["completion_tokens"]
        return JSONResponse(body, headers=ledger.headers(key))

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        key = request.state.key
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0,
             "owned_by": "distill-and-deploy"}]}, headers=ledger.headers(key))

    @app.get("/v1/usage")
    async def usage(request: Request) -> JSONResponse:
        key = request.state.key
        return JSONResponse({"object": "usage", "budget": config.api_keys[key],
                             "used": ledger.used[key], "remaining": ledger.remaining(key),
                             "requests": ledger.requests[key], "rate_limit": config.rate_limit},
                            headers=ledger.headers(key))

    return app


# ----------------------------------------------------------------------------------------
# Running it in the background


# Strong references: a server whose handle was dropped must still be stopped at exit.
_LIVE: set[ServerHandle] = set()


@dataclass
class ServerHandle:
    """A running server: ``base_url`` for the ``openai`` client, ``stop()`` to end it."""

    host: str
    port: int
    config: ServerConfig
    _server: Any
    _thread: threading.Thread
    _socket: socket.socket
    _app: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def context_length(self) -> int:
        """Most prompt plus completion tokens a request may use."""
        return self._app.state.context_length

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def request_log(self) -> list[dict[str, Any]]:
        """The logged requests, oldest first: one flat dict each (``pd.DataFrame``-ready).

        Fields: ``time`` (Unix seconds), ``key`` (redacted) and ``key_id`` (a short hash),
        ``method``, ``path``, ``status``, ``code`` (the error code, if any), ``latency_ms``,
        and for chat completions ``prompt_tokens``, ``completion_tokens``, ``max_tokens``,
        ``temperature``, ``seed``, ``logprobs``, ``top_logprobs``, ``logit_bias_size`` and
        ``prompt_hash`` (the same prompt sent twice has the same hash). Readable after stop().
        """
        log = getattr(self._app.state, "request_log", None) if self._app is not None else None
        if log is None:
            raise RuntimeError("the request log is off: start the server with "
                               "ServerConfig(..., request_log=True)")
        return log.snapshot()

    def batch_stats(self) -> dict[str, int] | None:
        """Server-side batching so far: ``batches``, ``requests`` and the ``largest`` batch
        (``None`` when batching is off, ``max_batch_size=1``)."""
        batcher = getattr(self._app.state, "batcher", None) if self._app is not None else None
        return None if batcher is None else batcher.snapshot()

    def client(self, api_key: str | None = None, **kwargs: Any):
        """An ``openai.OpenAI`` client for this server (the first key by default)."""
        import openai

        key = api_key if api_key is not None else next(iter(self.config.api_keys))
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key=key, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and free the port (safe to call twice)."""
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a stuck request
                self._server.force_exit = True
                self._thread.join(timeout)
        batcher = getattr(self._app.state, "batcher", None) if self._app is not None else None
        if batcher is not None:  # after the server: requests in flight are answered first
            batcher.close(timeout)
        try:
            self._socket.close()
        except OSError:  # pragma: no cover
            pass
        _LIVE.discard(self)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __hash__(self) -> int:
        return id(self)


def _stop_all() -> None:
    for handle in list(_LIVE):
        handle.stop()


atexit.register(_stop_all)


def start_server(model, tokenizer, config: ServerConfig | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> ServerHandle:
    """Serve ``model`` in a background thread on ``host`` (loopback only) and a free port.

    Returns once the server accepts connections. Stop it with ``handle.stop()``, a ``with``
    block, or let the interpreter's exit stop it (atexit).
    """
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"host {host!r}: this teaching server listens on loopback only "
                         "(127.0.0.1); put a real gateway in front of a model you expose")
    config = config or ServerConfig()
    app = create_app(model, tokenizer, config)
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except BaseException:
        sock.close()
        if app.state.batcher is not None:
            app.state.batcher.close()
        raise
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"dd-teacher-api:{bound_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            if app.state.batcher is not None:
                app.state.batcher.close()
            raise RuntimeError(f"the API server did not start within {timeout:.0f}s on port "
                               f"{bound_port}")
        time.sleep(0.01)
    handle = ServerHandle(host, bound_port, config, server, thread, sock, app)
    _LIVE.add(handle)
    return handle


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port`` (used by the tests)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
