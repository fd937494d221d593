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

from utils.evaluate import generate_responses
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
    assert choice.message.content == generate_responses(model, tok, [prompt], max_new_tokens=6)[0]
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
    ({"seed": 2**70}, "seed"),  # OpenAI's seed is an int64
    ({"seed": -(2**63) - 1}, "seed"),
    ({"n": 0}, "n"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),  # keys are token ids
    ({"logit_bias": {"07": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    ({"logit_bias": {"128": 1}}, "logit_bias"),  # the tiny vocabulary is 0..127
    ({"logit_bias": {"5": 100.5}}, "logit_bias.5"),
    ({"logit_bias": {"5": -101}}, "logit_bias.5"),
    ({"logit_bias": {"5": "up"}}, "logit_bias.5"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),  # OpenAI: at most 300
    ({"logit_bias": [1, 2]}, "logit_bias"),
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


# --------------------------------------------------------------------------------------
# Issue 21: the API server as a real service


def test_seed_accepts_the_int64_range_and_the_client_sees_a_400(server):
    for seed in (2**63 - 1, -(2**63), 0):
        assert post(server, body(server, seed=seed)).status_code == 200
    with pytest.raises(openai.BadRequestError) as exc:
        server.client(KEY).chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": "x"}], seed=2**70)
    assert exc.value.param == "seed" and exc.value.status_code == 400
    # NaN is valid in Python's JSON but not a bias
    raw = b'{"model": "dd-teacher", "messages": [{"role": "user", "content": "x"}], ' \
          b'"logit_bias": {"5": NaN}}'
    assert assert_openai_error(post(server, None, raw=raw), 400)["param"] == "logit_bias.5"


def _raw_logits(model, tok, prompt):
    from utils.extraction import prompt_ids

    x = torch.tensor([prompt_ids([{"role": "user", "content": prompt}], tok)])
    with torch.no_grad():
        return model(input_ids=x).logits[0, -1]  # (V,)


def test_generate_keeps_raw_logits_and_samples_from_the_biased_ones(model, tok):
    # the fact the server relies on: output_logits are the logits before any processor,
    # output_scores after (so the server adds the bias to output_logits itself)
    from transformers import LogitsProcessorList

    from utils.extraction import prompt_ids
    from utils.serve import LogitBiasProcessor

    raw = _raw_logits(model, tok, "hello")
    bias = torch.zeros_like(raw)
    target = int(torch.argsort(raw, descending=True)[30])
    bias[target] = 50.0
    x = torch.tensor([prompt_ids([{"role": "user", "content": "hello"}], tok)])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1,
                         do_sample=False, return_dict_in_generate=True, output_logits=True,
                         output_scores=True, pad_token_id=tok.pad_token_id,
                         logits_processor=LogitsProcessorList([LogitBiasProcessor(bias)]))
    assert torch.allclose(out.logits[0][0], raw, atol=1e-5)
    assert torch.allclose(out.scores[0][0], raw + bias, atol=1e-5)
    assert out.sequences[0, -1].item() == target


def test_logit_bias_steers_greedy_and_sampling(server, tok):
    target = tok.convert_tokens_to_ids("▁blue")
    assert target != tok.unk_token_id
    for temperature in (0.0, 1.0):
        r = post(server, body(server, max_tokens=3, temperature=temperature, seed=1,
                              logit_bias={str(target): 100}))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "blue blue blue"
    # -100 bans the greedy token
    plain = post(server, body(server, max_tokens=1, temperature=0, logprobs=True)).json()
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    banned = post(server, body(server, max_tokens=1, temperature=0, logprobs=True,
                               logit_bias={str(tok.convert_tokens_to_ids(first)): -100})).json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != first
    # an empty map changes nothing
    same = post(server, body(server, max_tokens=1, temperature=0, logprobs=True, logit_bias={}))
    assert same.json()["choices"][0]["logprobs"] == plain["choices"][0]["logprobs"]


def test_logit_bias_reveals_logprobs_outside_the_top_k(server, model, tok):
    # Carlini et al. (2024): with top-5 logprobs and a bias B on a token t outside the top-5,
    # t enters the top-5 with its biased logprob, and lp(t) - lp(top-1) - B = z_t - z_top1
    raw = _raw_logits(model, tok, "hello")
    order = torch.argsort(raw, descending=True).tolist()
    top1, t = order[0], order[40]
    B = float(raw[top1] - raw[t]) + 1.0  # just enough to put t first
    r = post(server, body(server, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5,
                          logit_bias={str(t): B}))
    assert r.status_code == 200, r.text
    entry = r.json()["choices"][0]["logprobs"]["content"][0]
    tops = {tok.convert_tokens_to_ids(x["token"]): x["logprob"] for x in entry["top_logprobs"]}
    assert tok.convert_tokens_to_ids(entry["token"]) == t  # greedy follows the bias
    biased = raw.clone()
    biased[t] += B
    lp = torch.log_softmax(biased, -1)
    assert list(tops) == torch.topk(lp, 5).indices.tolist()
    assert list(tops.values()) == pytest.approx(torch.topk(lp, 5).values.tolist(), abs=1e-5)
    assert entry["logprob"] == pytest.approx(float(lp[t]), abs=1e-5)
    assert tops[t] - tops[top1] - B == pytest.approx(float(raw[t] - raw[top1]), abs=1e-4)


def test_unexpected_errors_are_json_500_and_the_server_keeps_serving(tok, caplog):
    broken = tiny_model(tok, seed=1)

    def boom(*args, **kwargs):
        raise RuntimeError("the GPU caught fire")

    broken.generate = boom
    with serving(broken, tok, api_keys={KEY: 5}, request_log=True) as h:
        with caplog.at_level("ERROR", logger="utils.serve"):
            r = post(h, body(h))
        err = assert_openai_error(r, 500)
        assert err["type"] == "server_error" and "fire" not in err["message"]
        assert "the GPU caught fire" in caplog.text  # the operator sees the traceback
        with pytest.raises(openai.InternalServerError):
            h.client(KEY).chat.completions.create(
                model=h.model_name, messages=[{"role": "user", "content": "x"}])
        usage = httpx.get(h.base_url + "/usage", headers={"Authorization": f"Bearer {KEY}"})
        assert usage.status_code == 200 and usage.json()["used"] == 0  # failures are not billed
        assert [e["status"] for e in h.request_log()][:2] == [500, 500]
        assert h.request_log()[0]["code"] == "server_error"


def test_every_route_needs_the_key_and_unknown_routes_are_openai_404s(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    root = f"http://127.0.0.1:{server.port}"
    for path in ("/openapi.json", "/docs", "/redoc", "/v1/nothing", "/", "/v1/usage"):
        assert_openai_error(httpx.get(root + path), 401, "missing_api_key")
        assert_openai_error(httpx.get(root + path, headers={"Authorization": "Bearer x"}), 401,
                            "invalid_api_key")
    for path in ("/openapi.json", "/docs", "/redoc", "/v1/nothing"):
        err = assert_openai_error(httpx.get(root + path, headers=auth), 404)
        assert err["type"] == "invalid_request_error" and path in err["message"]
    assert_openai_error(httpx.get(server.base_url + "/chat/completions", headers=auth), 405)
    with pytest.raises(openai.NotFoundError):
        server.client(KEY).completions.create(model=server.model_name, prompt="x")


def test_request_body_is_bounded(model, tok):
    with serving(model, tok, max_body_bytes=4096) as h:
        big = body(h, messages=[{"role": "user", "content": "x" * 5000}])
        assert_openai_error(post(h, big), 413, "request_too_large")

        def chunks():  # no Content-Length: the server counts as it reads
            for _ in range(5):
                yield b"x" * 1000

        r = httpx.post(h.base_url + "/chat/completions", content=chunks(),
                       headers={"Authorization": f"Bearer {KEY}"})
        assert_openai_error(r, 413, "request_too_large")
        assert post(h, body(h)).status_code == 200


def test_context_length_is_checked_before_the_model_runs(model, tok):
    from utils.extraction import prompt_ids

    assert model.config.max_position_embeddings == 256
    with serving(model, tok, api_keys={KEY: 3}) as h:
        assert h.context_length == 256  # the model's max_position_embeddings by default
        n_prompt = post(h, body(h, max_tokens=1)).json()["usage"]["prompt_tokens"]
        fits = body(h, max_tokens=256 - n_prompt)
        over = body(h, max_tokens=257 - n_prompt)
        err = assert_openai_error(post(h, over), 400, "context_length_exceeded")
        assert err["param"] == "messages" and err["type"] == "invalid_request_error"
        assert err["message"].startswith(
            f"This model's maximum context length is 256 tokens. However, you requested 257 "
            f"tokens ({n_prompt} in the messages, {257 - n_prompt} in the completion).")
        assert post(h, fits).status_code == 200
        # a 33k-token prompt is rejected after tokenizing, without running the model
        long = body(h, messages=[{"role": "user", "content": "the teacher answers " * 8300}],
                    max_tokens=None)
        t0 = time.monotonic()
        err = assert_openai_error(post(h, long), 400, "context_length_exceeded")
        assert time.monotonic() - t0 < 3.0
        n_long = int(err["message"].split("resulted in ")[1].split(" ")[0])
        assert n_long > 33_000 and "Please reduce the length of the messages." in err["message"]
        # without max_tokens, a prompt near the limit gets the rest of the context
        near = body(h, messages=[{"role": "user", "content": "the end " * 60}], max_tokens=None)
        n_near = prompt_ids(near["messages"], tok)
        assert 256 - 64 < len(n_near) < 256 - 8  # less room than default_max_tokens (64)
        err = assert_openai_error(post(h, {**near, "min_tokens": 60}), 400,
                                  "context_length_exceeded")
        assert f"({len(n_near)} in the messages, 60 in the completion)" in err["message"]
        r = post(h, {**near, "seed": 0, "extra": "ignored"})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 256
        quota = httpx.get(h.base_url + "/usage", headers={"Authorization": f"Bearer {KEY}"})
        assert quota.json()["used"] == 3  # 400s are not billed
    with serving(model, tok, context_length=16) as h:
        assert h.context_length == 16
        assert_openai_error(post(h, body(h, max_tokens=16)), 400, "context_length_exceeded")


def test_request_log_is_the_defenders_view(model, tok):
    with serving(model, tok) as h:
        with pytest.raises(RuntimeError, match="request_log=True"):
            h.request_log()  # off by default
    keys = {"sk-honest-alice": None, "sk-extract-eve": 4}
    with serving(model, tok, api_keys=keys, request_log=True, request_log_size=8) as h:
        alice, eve = h.client("sk-honest-alice"), h.client("sk-extract-eve")
        alice.chat.completions.create(model=h.model_name, max_tokens=3,
                                      messages=[{"role": "user", "content": "hello"}])
        for t in range(3):  # the same prompt, a logit_bias sweep, full top-k
            eve.chat.completions.create(model=h.model_name, max_tokens=1, logprobs=True,
                                        top_logprobs=20, logit_bias={str(t): 100}, seed=t,
                                        messages=[{"role": "user", "content": "hi"}])
        post(h, body(h, n=2), key="sk-extract-eve")
        post(h, body(h), key="sk-wrong")
        log = h.request_log()
        assert len(log) == 6 and all(set(e) == set(log[0]) for e in log)
        assert [e["status"] for e in log] == [200, 200, 200, 200, 400, 401]
        first = log[0]
        assert first["key"] == "sk-...lice" and first["path"] == "/v1/chat/completions"
        assert first["prompt_tokens"] > 0 and 0 < first["completion_tokens"] <= 3
        sweep = log[1:4]
        assert {e["key"] for e in sweep} == {"sk-...-eve"}
        assert [e["logit_bias_size"] for e in sweep] == [1, 1, 1]
        assert {e["top_logprobs"] for e in sweep} == {20} and all(e["logprobs"] for e in sweep)
        assert len({e["prompt_hash"] for e in sweep}) == 1  # the same prompt, again and again
        assert sweep[0]["key_id"] != first["key_id"]
        assert log[4]["code"] == "invalid_value" and log[5]["key"] is None
        assert not any("sk-extract-eve" in str(v) for e in log for v in e.values())
        for _ in range(5):
            alice.models.list()
        log = h.request_log()
        assert len(log) == 8 and log[-1]["path"] == "/v1/models"  # bounded: oldest dropped
    assert len(h.request_log()) == 8  # still readable after stop()


def test_new_config_errors():
    for bad in (dict(context_length=1), dict(max_body_bytes=10), dict(request_log_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad)


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

