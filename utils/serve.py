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

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/usage`` (this
server's own: budget used and left, requests
seen including rejected ones). Every answer to a valid key carries the headers
``x-budget-limit``/``x-budget-remaining`` and ``x-ratelimit-*``. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` and status codes: 401 missing or wrong
key, 400 malformed body or a parameter out of range, 404 unknown model (as OpenAI and vLLM
do), 429 rate limit (``rate_limit_exceeded``, with ``retry-after-ms``) or budget spent
(``insufficient_quota``, with ``x-should-retry: false`` so the client does not retry).

Defences (:class:`Defences`), the knobs a provider has against extraction (Carlini et al.
2024, Sec. 8; Kirchenbauer et al. 2023): a cap on ``top_logprobs``, no logprobs at all,
rounding, Gaussian/Laplace noise on the returned logprobs, and a Kirchenbauer watermark on
the sampled text (transformers' ``WatermarkingConfig`` passed to ``generate``).

Returned logprobs are the model's own next-token distribution at temperature 1 (vLLM's
default "raw logprobs"): temperature, top-p and the watermark change which token is sampled,
not the numbers reported. Token strings are the tokenizer's vocabulary pieces (unique per
id, so an attacker can map them back with ``convert_tokens_to_ids``), or ``"token_id:N"``
with ``token_format="id"`` (vLLM's ``--return-tokens-as-token-ids``).
"""

from __future__ import annotations

import atexit
import math
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

NoiseKind = Literal["gaussian", "laplace"]
TokenFormat = Literal["piece", "id"]


@dataclass(frozen=True)
class Defences:
    """Switchable defences against extraction. The default is an undefended API.

    - ``max_top_logprobs``: requests asking for more alternatives get a 400 (OpenAI caps at
      20). ``None`` allows the whole vocabulary, which is what Carlini et al.'s attack needs.
    - ``logprobs_enabled=False``: no logprobs at all (requests with ``logprobs`` get a 400).
    - ``round_decimals``: round every returned logprob to this many decimals.
    - ``noise`` / ``noise_scale``: add fresh Gaussian or Laplace noise (scale in nats) to
      every returned logprob (clipped at 0 so they stay log-probabilities).
    - ``watermark``: a ``transformers.WatermarkingConfig`` applied while sampling.

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


@dataclass(frozen=True)
class ServerConfig:
    """How the teacher API behaves.

    ``api_keys`` maps each client's key to its query budget (``None``: unlimited). Only
    successful chat completions are billed. ``rate_limit`` is requests per second per key
    (token bucket holding ``rate_burst`` requests), ``None`` for no limit.
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


# ----------------------------------------------------------------------------------------
# Request schema (a subset of OpenAI's chat completions)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` that this server understands."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension (extra_body)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
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
# The model behind the API


class _Engine:
    """Runs ``generate`` for one request at a time and shapes the OpenAI response."""

    def __init__(self, model, tokenizer, config: ServerConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lock = threading.Lock()
        self.noise_rng = np.random.default_rng(config.noise_seed)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
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

    def complete(self, req: ChatCompletionRequest) -> dict:
        tok = self.tokenizer
        messages = [m.model_dump() for m in req.messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        max_new = req.max_completion_tokens or req.max_tokens or self.config.default_max_tokens
        eos = tok.eos_token_id
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, return_dict_in_generate=True, output_logits=True,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            eos_token_id=eos)
        if req.min_tokens:
            kwargs["min_new_tokens"] = req.min_tokens  # the end token is masked until then
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.config.defences.watermark is not None:
            kwargs["watermarking_config"] = self.config.defences.watermark
        device = next(self.model.parameters()).device
        with self.lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(req.seed if req.seed is not None else secrets.randbits(63))
            out = self.model.generate(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device), **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new_ids = out.sequences[0, prompt_len:].tolist()
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
                lp = torch.log_softmax(out.logits[i][0].float(), dim=-1)  # (V,)
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


# ----------------------------------------------------------------------------------------
# The FastAPI app


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    return f"Invalid value for '{param}': {err.get('msg')}", param


def create_app(model, tokenizer, config: ServerConfig | None = None):
    """The FastAPI application serving ``model`` (use :func:`start_server` to run it)."""
    config = config or ServerConfig()
    engine = _Engine(model, tokenizer, config)
    ledger = _Ledger(config)
    app = FastAPI(title="Distill & Deploy teacher API", docs_url=None, redoc_url=None)
    app.state.ledger = ledger

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def authenticate(request: Request) -> str:
        header = request.headers.get("authorization", "")
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

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access "
                                f"to it. This server serves `{config.model_name}`.",
                           "invalid_request_error", "model_not_found", "model")

    def validate(req: ChatCompletionRequest) -> None:
        d = config.defences
        bad = "invalid_request_error"
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", bad, "invalid_value", "n")
        if req.stream:
            raise APIError(400, "stream=true is not supported by this server.", bad,
                           "invalid_value", "stream")
        max_new = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        if max_new > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is too large: {max_new}. This model supports at "
                                f"most {config.max_tokens_limit} completion tokens.", bad,
                           "invalid_value", "max_tokens")
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

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        key = authenticate(request)
        with ledger.lock:
            ledger.requests[key] += 1
        try:
            data = await request.json()
        except Exception:  # noqa: BLE001 - any undecodable body is the client's error
            raise APIError(400, "We could not parse the JSON body of your request.",
                           "invalid_request_error", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.",
                           "invalid_request_error", "invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, "invalid_request_error", "invalid_value",
                           param) from None
        check_model(req.model)
        validate(req)
        ledger.admit(key)
        billed = False
        try:
            body = await run_in_threadpool(engine.complete, req)
            billed = True
        finally:
            ledger.settle(key, billed)
        return JSONResponse(body, headers=ledger.headers(key))

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        key = authenticate(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0,
             "owned_by": "distill-and-deploy"}]}, headers=ledger.headers(key))

    @app.get("/v1/usage")
    async def usage(request: Request) -> JSONResponse:
        key = authenticate(request)
        return JSONResponse({"object": "usage", "budget": config.api_keys[key],
                             "used": ledger.used[key], "remaining": ledger.remaining(key),
                             "requests": ledger.requests[key], "rate_limit": config.rate_limit}, headers=ledger.headers(key))

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

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

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
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
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
            raise RuntimeError(f"the API server did not start within {timeout:.0f}s on port "
                               f"{bound_port}")
        time.sleep(0.01)
    handle = ServerHandle(host, bound_port, config, server, thread, sock)
    _LIVE.add(handle)
    return handle


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port`` (used by the tests)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
