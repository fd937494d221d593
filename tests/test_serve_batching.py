"""Server-side batching and the server's watermark option (utils/serve.py, lesson 04, issue 17).

The attacker of lesson 04 harvests the teacher through its real API with many requests in
flight; the server answers them in batches. Batching must not change any answer (greedy,
seeded sampling, ``logit_bias``, logprobs, the watermark), must keep requests with other
decoding settings apart, and must fail per request, not per server. The watermark option is
checked for what a provider needs: on/off, seeded (same request, same watermarked answer),
detectable, and bounded (a bad setting is a clear ``ValueError``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _tiny_chat import tiny_model
from transformers import WatermarkingConfig

from utils.serve import MAX_WATERMARK_BIAS, Defences, ServerConfig, start_server
from utils.watermark import score_tokens

pytestmark = pytest.mark.usefixtures("no_server_left_behind")

PROMPTS = ["hello", "what is the capital of france?", "name a primary colour.",
           "why is the sky blue? tell me", "a", "how many legs does a spider have?",
           "the teacher answers", "distillation through an api"]
WM = WatermarkingConfig(bias=4.0, greenlist_ratio=0.25)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=0)


def ask_all(handle, requests: list[dict], threads: int = 8) -> list[dict]:
    """Send every request body at once from ``threads`` threads; the JSON answers in order."""
    local = threading.local()

    def send(body: dict) -> dict:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30.0)
        r = local.client.post(handle.base_url + "/chat/completions",
                              json={"model": handle.model_name, **body},
                              headers={"Authorization": "Bearer sk-a"})
        return {"status": r.status_code, **r.json()}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, requests))


def requests_mix() -> list[dict]:
    """Greedy and sampled requests with seeds, logit_bias and logprobs, several settings."""
    out = []
    for i, p in enumerate(PROMPTS * 2):
        body = {"messages": [{"role": "user", "content": p}], "max_tokens": 10 + (i % 2) * 6,
                "temperature": (0.0, 1.0, 0.7)[i % 3], "seed": i, "logprobs": True,
                "top_logprobs": 3}
        if i % 4 == 0:
            body["logit_bias"] = {"7": 3.0, "9": -2.0}
        if i % 5 == 0:
            body["top_p"] = 0.9
        out.append(body)
    return out


def answers(results: list[dict]) -> list[tuple[str, list[float]]]:
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200]
    return [(r["choices"][0]["message"]["content"],
             [e["logprob"] for e in r["choices"][0]["logprobs"]["content"]]) for r in results]


@pytest.mark.parametrize("watermark", [None, WM], ids=["clean", "watermarked"])
def test_batching_changes_no_answer(model, tok, watermark):
    """The same requests, in flight together, answered by a batching server and by the
    one-at-a-time server: the same texts (greedy and seeded sampling) and logprobs."""
    reqs = requests_mix()
    got = {}
    for size in (1, 8):
        config = ServerConfig(api_keys={"sk-a": None}, defences=Defences(watermark=watermark),
                              max_batch_size=size, batch_wait_ms=20)
        with start_server(model, tok, config) as h:
            got[size] = answers(ask_all(h, reqs))
            stats = h.batch_stats()
        if size == 1:
            assert stats is None  # the default: no batcher
        else:
            assert stats["requests"] == len(reqs)
            assert stats["batches"] < len(reqs), stats  # some requests did share a batch
            assert 1 < stats["largest"] <= size
    for (text1, lp1), (text8, lp8) in zip(got[1], got[8], strict=True):
        assert text1 == text8
        assert lp1 == pytest.approx(lp8, abs=1e-4)
    assert len({t for t, _ in got[8]}) > 4  # not one repeated answer


def test_batch_groups_keep_decoding_settings_apart(model, tok):
    """Rows of one batch share temperature, top-p, max_tokens and min_tokens; a request with
    other settings waits for its own batch and still gets its own answer."""
    from utils.serve import ChatCompletionRequest, _Engine

    engine = _Engine(model, tok, ServerConfig())
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    same = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "yo"}], "temperature": 0,
         "seed": 5, "top_p": 0.5})  # greedy ignores seed and top_p
    other = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1})
    assert engine.batch_key(req, 8) == engine.batch_key(same, 8)
    assert engine.batch_key(req, 8) != engine.batch_key(req, 9)
    assert engine.batch_key(req, 8) != engine.batch_key(other, 8)
    ids = engine.encode(req)
    with pytest.raises(ValueError, match="batch_key"):
        engine.complete_many([(req, ids, 8), (other, ids, 8)])
    # min_tokens holds the end token back in its own group
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
            "temperature": 0}
    with start_server(model, tok, ServerConfig(api_keys={"sk-a": None}, max_batch_size=4,
                                               batch_wait_ms=20)) as h:
        plain, held = ask_all(h, [body, {**body, "min_tokens": 12}], threads=2)
    assert held["usage"]["completion_tokens"] == 12
    assert plain["usage"]["completion_tokens"] <= 12


def test_a_failing_batch_fails_its_requests_and_the_server_keeps_serving(model, tok):
    config = ServerConfig(api_keys={"sk-a": None}, max_batch_size=4, batch_wait_ms=20)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "temperature": 0}
    with start_server(model, tok, config) as h:
        batcher = h._app.state.batcher
        real = batcher.engine.complete_many
        calls = []

        def broken(jobs):
            calls.append(len(jobs))
            if len(calls) == 1:
                raise RuntimeError("out of memory, say")
            return real(jobs)

        batcher.engine.complete_many = broken
        first = ask_all(h, [body, body], threads=2)
        assert {r["status"] for r in first} <= {200, 500}
        assert any(r["status"] == 500 and r["error"]["type"] == "server_error" for r in first)
        again = ask_all(h, [body], threads=1)
        assert again[0]["status"] == 200 and again[0]["object"] == "chat.completion"
        usage = httpx.get(h.base_url + "/usage", headers={"Authorization": "Bearer sk-a"})
        failed = sum(r["status"] == 500 for r in first)
        assert usage.json()["used"] == 3 - failed  # a failed request is not billed


def test_batching_config_errors():
    for bad, match in ((dict(max_batch_size=0), "max_batch_size"),
                       (dict(max_batch_size=4096), "max_batch_size"),
                       (dict(max_batch_size=2.0), "max_batch_size"),
                       (dict(batch_wait_ms=-1), "batch_wait_ms")):
        with pytest.raises(ValueError, match=match):
            ServerConfig(**bad)


def test_cached_harvest_with_concurrency_gives_the_same_answers(model, tok, tmp_path,
                                                                 monkeypatch):
    """Concurrent clients and a batching server harvest exactly what one client does."""
    from utils import extraction

    prompts = PROMPTS
    got = {}
    for concurrency in (1, 4):
        monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / f"c{concurrency}"))
        got[concurrency] = extraction.cached_harvest(
            prompts, budget=len(prompts), max_tokens=8, top_logprobs=2,
            defences=Defences(watermark=WM), model=model, tokenizer=tok, progress=False,
            concurrency=concurrency)
    assert [r.messages for r in got[4]] == [r.messages for r in got[1]]
    assert [r.text for r in got[4]] == [r.text for r in got[1]]
    with pytest.raises(ValueError, match="concurrency"):
        extraction.cached_harvest(prompts, budget=1, concurrency=0, model=model, tokenizer=tok)


# --------------------------------------------------------------------------------------
# The server's watermark option: on/off, seeded, detectable, bounded


def _generated_ids(handle, temperature: float, seeds=(0, 1, 2, 3)) -> list[list[int]]:
    reqs = [{"messages": [{"role": "user", "content": p}], "max_tokens": 40,
             "temperature": temperature, "seed": s, "logprobs": True}
            for p in PROMPTS[:4] for s in (seeds if temperature > 0 else seeds[:1])]
    out = ask_all(handle, reqs)
    assert all(r["status"] == 200 for r in out)
    return [[int(e["token"].split(":")[1]) for e in r["choices"][0]["logprobs"]["content"]]
            for r in out]


@pytest.mark.parametrize("batch", [1, 8])
def test_watermark_on_off_seeded_and_detected(model, tok, batch):
    V = len(tok)
    runs = {}
    for label, wm in (("on", WM), ("on again", WM), ("off", None)):
        config = ServerConfig(api_keys={"sk-a": None}, token_format="id",
                              defences=Defences(watermark=wm), max_batch_size=batch)
        with start_server(model, tok, config) as h:
            runs[label] = _generated_ids(h, 1.0)
    assert runs["on"] == runs["on again"]  # seeded: the same requests, the same answers
    assert runs["on"] != runs["off"]  # the watermark changed what was sampled
    z_on = score_tokens([t for s in runs["on"] for t in s], V, WM).z_score
    z_off = score_tokens([t for s in runs["off"] for t in s], V, WM).z_score
    assert z_on > 6 > 3 > z_off, (z_on, z_off)


def test_watermark_setting_is_bounded_and_explained():
    assert Defences(watermark=WM).watermark is WM
    from_dict = Defences(watermark={"bias": 8.0, "greenlist_ratio": 0.5}).watermark
    assert isinstance(from_dict, WatermarkingConfig) and from_dict.bias == 8.0
    assert Defences(watermark=WatermarkingConfig(bias=MAX_WATERMARK_BIAS)).watermark.bias == 100
    bad = [(WatermarkingConfig(bias=0.0), "bias must be in"),
           (WatermarkingConfig(bias=-2.0), "bias must be in"),
           (WatermarkingConfig(bias=MAX_WATERMARK_BIAS + 1), "bias must be in"),
           (WatermarkingConfig(bias=float("nan")), "bias must be in"),
           ({"bias": 2.0, "greenlist_ratio": 1.0}, "greenlist_ratio"),
           ({"bias": 2.0, "greenlist_ratio": 0.0}, "greenlist_ratio"),
           ({"bias": 2.0, "colour": "green"}, "unknown settings"),
           ({"bias": 2.0, "seeding_scheme": "righthash"}, "seeding_scheme"),
           (2.0, "WatermarkingConfig")]
    for watermark, match in bad:
        with pytest.raises(ValueError, match=match):
            Defences(watermark=watermark)
