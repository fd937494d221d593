"""The OpenAI-compatible teacher API (utils/serve.py, lesson 04).

Every server started here is stopped in a ``finally`` and its port is checked closed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from _tiny_chat import tiny_model
from transformers import WatermarkingConfig

from utils.extraction import greedy_responses
from utils.serve import Defences, ServerConfig, port_is_open, start_server
from utils.watermark import score_tokens

pytestmark = pytest.mark.usefixtures("no_server_left_behind")

KEY = "sk-student"


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=0)


@contextmanager
def serving(model, tok, **config):
    config.setdefault("api_keys", {KEY: 100})
    handle = start_server(model, tok, ServerConfig(**config))
    try:
        yield handle
    finally:
        handle.stop()
        assert not handle.running
        assert not port_is_open(handle.host, handle.port), "the server's port is still open"


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok) as handle:
        yield handle


def post(handle, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if raw is not None:
        return httpx.post(handle.base_url + "/chat/completions", content=raw,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(handle.base_url + "/chat/completions", json=body, headers=headers)


def body(handle, **kw):
    b = {"model": handle.model_name, "messages": [{"role": "user", "content": "hello"}],
         "max_tokens": 4}
    b.update(kw)
    return b


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------------------


def test_openai_client_end_to_end(server, model, tok):
    client = server.client(KEY)
    assert [m.id for m in client.models.list().data] == [server.model_name]
    prompt = "what is the capital of france?"
    r = client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": prompt}],
        max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    # greedy over HTTP = greedy in process; tokens map back to the vocabulary
    assert choice.message.content == greedy_responses(model, tok, [prompt], max_new_tokens=6)[0]
    ids = [tok.convert_tokens_to_ids(e.token) for e in entries]
    assert tok.decode(ids, skip_special_tokens=True) == choice.message.content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and max(tops) <= 0
        assert e.token == e.top_logprobs[0].token  # greedy picks the top-1
        assert e.logprob == pytest.approx(tops[0])
    # the numbers are the model's own log-softmax at the first generated position
    from utils.extraction import prompt_ids

    x = torch.tensor([prompt_ids([{"role": "user", "content": prompt}], tok)])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[0, -1], -1)
    top = torch.topk(lp, 5)
    assert [tok.convert_tokens_to_ids(t.token) for t in entries[0].top_logprobs] == \
        top.indices.tolist()
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
        top.values.tolist(), abs=1e-5)


def test_seed_makes_sampling_reproducible(server):
    client = server.client(KEY)
    kw = dict(model=server.model_name, messages=[{"role": "user", "content": "hi"}],
              max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = [client.chat.completions.create(seed=s, **kw).choices[0].message.content
         for s in (1, 2, 3)]
    assert a == b
    assert len({a, *c}) > 1


def test_auth_errors(server):
    err = assert_openai_error(post(server, body(server), key=None), 401, "missing_api_key")
    assert "API key" in err["message"]
    assert_openai_error(post(server, body(server), key="sk-wrong"), 401, "invalid_api_key")
    r = httpx.get(server.base_url + "/models")
    assert_openai_error(r, 401)
    with pytest.raises(openai.AuthenticationError) as exc:
        server.client("sk-wrong").models.list()
    assert exc.value.code == "invalid_api_key"


@pytest.mark.parametrize("payload, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"temperature": 5.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"stream": True}, "stream"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
    ({"logprobs": True, "top_logprobs": 10_000}, "top_logprobs"),  # more than the vocab
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
])
def test_malformed_requests_get_400(server, payload, param):
    err = assert_openai_error(post(server, body(server, **payload)), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_bad_json_unknown_model_and_missing_fields(server):
    assert_openai_error(post(server, None, raw=b'{"model": '), 400, "invalid_json")
    assert_openai_error(post(server, None, raw=b"[1, 2]"), 400, "invalid_json")
    err = assert_openai_error(post(server, {"messages": [{"role": "user", "content": "x"}]}), 400)
    assert err["param"] == "model"
    assert_openai_error(post(server, body(server, model="gpt-9")), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        server.client(KEY).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as exc:
        server.client(KEY).chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": "x"}],
            logprobs=True, top_logprobs=10_000)
    assert exc.value.param == "top_logprobs"


def test_budget_429_and_usage(model, tok):
    with serving(model, tok, api_keys={"sk-a": 3, "sk-b": None}) as h:
        client = h.client("sk-a")
        kw = dict(model=h.model_name, messages=[{"role": "user", "content": "x"}], max_tokens=1)
        remaining = []
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(**kw)
            remaining.append(int(raw.headers["x-budget-remaining"]))
        assert remaining == [2, 1, 0]
        # a rejected request is not billed: 400s do not spend the budget
        assert_openai_error(post(h, body(h, n=5), key="sk-a"), 400)
        r = post(h, body(h), key="sk-a")
        assert_openai_error(r, 429, "insufficient_quota")
        assert r.headers["x-should-retry"] == "false"
        with pytest.raises(openai.RateLimitError) as exc:
            h.client("sk-a", max_retries=2).chat.completions.create(**kw)
        assert exc.value.code == "insufficient_quota"
        usage = httpx.get(h.base_url + "/usage", headers={"Authorization": "Bearer sk-a"}).json()
        # 3 answered + 1 bad request + 1 raw 429 + 1 from the client: x-should-retry: false
        # stopped the client's own retries
        assert usage == {"object": "usage", "budget": 3, "used": 3, "remaining": 0,
                         "requests": 6, "rate_limit": None}
        # another key has its own (unlimited) budget
        for _ in range(4):
            h.client("sk-b").chat.completions.create(**kw)
        usage_b = httpx.get(h.base_url + "/usage",
                            headers={"Authorization": "Bearer sk-b"}).json()
        assert usage_b["used"] == 4 and usage_b["remaining"] is None


def test_rate_limit_429_then_recovers(model, tok):
    # 0.5 requests/s: the bucket refills slowly enough that a loaded machine cannot refill
    # it between two back-to-back requests
    with serving(model, tok, rate_limit=0.5, rate_burst=2) as h:
        codes = [post(h, body(h, max_tokens=1)).status_code for _ in range(2)]
        assert codes == [200, 200]
        r = post(h, body(h, max_tokens=1))
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert err["type"] == "requests"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        wait = float(r.headers["retry-after-ms"]) / 1000
        assert 0 < wait <= 2.0 + 1e-3
        time.sleep(wait + 0.05)
        assert post(h, body(h, max_tokens=1)).status_code == 200
        # the openai client honours retry-after-ms and succeeds by itself
        h.client(KEY, max_retries=5).chat.completions.create(
            model=h.model_name, messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_defence_top_k_cap_and_no_logprobs(model, tok):
    with serving(model, tok, defences=Defences(max_top_logprobs=5)) as h:
        ok = post(h, body(h, logprobs=True, top_logprobs=5))
        assert ok.status_code == 200
        assert len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5
        err = assert_openai_error(post(h, body(h, logprobs=True, top_logprobs=6)), 400)
        assert err["param"] == "top_logprobs" and "at most 5" in err["message"]
    with serving(model, tok, defences=Defences(logprobs_enabled=False)) as h:
        assert post(h, body(h)).status_code == 200  # text still flows
        assert_openai_error(post(h, body(h, logprobs=True)), 400, "logprobs_disabled")


def _first_top(h, seed=0):
    r = post(h, body(h, logprobs=True, top_logprobs=10, temperature=0, seed=seed))
    assert r.status_code == 200, r.text
    entry = r.json()["choices"][0]["logprobs"]["content"][0]
    return {t["token"]: t["logprob"] for t in entry["top_logprobs"]}


def test_defence_rounding_and_noise(model, tok):
    with serving(model, tok) as h:
        clean = _first_top(h)
    with serving(model, tok, defences=Defences(round_decimals=1)) as h:
        rounded = _first_top(h)
    assert rounded.keys() == clean.keys()
    for t, v in rounded.items():
        assert v == round(v, 1) and abs(v - clean[t]) <= 0.05 + 1e-9
    with serving(model, tok, defences=Defences(noise="gaussian", noise_scale=0.3)) as h:
        noisy1, noisy2 = _first_top(h), _first_top(h)
    with serving(model, tok, defences=Defences(noise="laplace", noise_scale=0.3)) as h:
        laplace = _first_top(h)
    for noisy in (noisy1, noisy2, laplace):
        assert noisy.keys() == clean.keys()  # the ranking is the true one, the values are not
        diffs = [noisy[t] - clean[t] for t in clean]
        assert max(abs(d) for d in diffs) > 0.05 and all(v <= 0 for v in noisy.values())
    assert noisy1 != noisy2  # fresh noise on every query


def test_defence_watermark_is_detectable(model, tok):
    wm = WatermarkingConfig(bias=4.0, greenlist_ratio=0.25)
    prompts = ["hello", "what is the capital of france?", "name a primary colour."]

    def generated_ids(h):
        out = []
        for i, p in enumerate(prompts):
            r = post(h, body(h, messages=[{"role": "user", "content": p}], max_tokens=40,
                             temperature=1.0, seed=i, logprobs=True))
            out.append([int(e["token"].split(":")[1])
                        for e in r.json()["choices"][0]["logprobs"]["content"]])
        return out

    with serving(model, tok, token_format="id", defences=Defences(watermark=wm)) as h:
        marked = generated_ids(h)
    with serving(model, tok, token_format="id") as h:
        clean = generated_ids(h)
    V = len(tok)
    z_marked = score_tokens([t for s in marked for t in s], V, wm).z_score
    z_clean = score_tokens([t for s in clean for t in s], V, wm).z_score
    assert z_marked > 6, z_marked
    assert z_clean < 3, z_clean


def test_stop_closes_port_and_context_manager(model, tok):
    h = start_server(model, tok, ServerConfig())
    try:
        assert port_is_open("127.0.0.1", h.port)
        assert h.base_url == f"http://127.0.0.1:{h.port}/v1"
    finally:
        h.stop()
    assert not port_is_open("127.0.0.1", h.port)
    h.stop()  # idempotent
    with start_server(model, tok, ServerConfig()) as h2:
        port = h2.port
        assert port_is_open("127.0.0.1", port)
    assert not port_is_open("127.0.0.1", port)


def test_config_errors(model, tok):
    with pytest.raises(ValueError, match="loopback"):
        start_server(model, tok, ServerConfig(), host="0.0.0.0")
    with pytest.raises(ValueError, match="api_keys"):
        ServerConfig(api_keys={})
    with pytest.raises(ValueError, match="noise_scale"):
        Defences(noise="gaussian")
    with pytest.raises(ValueError, match="noise"):
        Defences(noise="uniform", noise_scale=1.0)


def test_exit_hook_stops_every_live_server(model, tok):
    from utils.serve import _stop_all  # registered with atexit: runs when the kernel exits

    handles = [start_server(model, tok, ServerConfig()) for _ in range(2)]
    try:
        assert all(port_is_open("127.0.0.1", h.port) for h in handles)
        _stop_all()
        assert not any(port_is_open("127.0.0.1", h.port) for h in handles)
    finally:
        for h in handles:
            h.stop()
