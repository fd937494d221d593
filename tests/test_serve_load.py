"""A bounded load test of the teacher API on 127.0.0.1 (utils/serve.py, lesson 04).

A few client threads send a fixed number of requests at once; every answer must be a
well-formed chat completion or an OpenAI error, budgets and rate limits must hold under
concurrency, and a huge prompt from one key must not hold up the others. Each test has a hard
deadline and stops by itself (the whole file takes a few seconds).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import pytest
from openai.types.chat import ChatCompletion

from utils.serve import ServerConfig, key_id, port_is_open, start_server

pytestmark = pytest.mark.usefixtures("no_server_left_behind")

THREADS = 4
DEADLINE = 15.0  # seconds per test, hard: the pool is abandoned and the test fails after it
LONG_PROMPT = "the teacher answers " * 8300  # about 33k tokens of the tiny tokenizer


def run_load(handle, jobs: list[tuple[str, dict]], threads: int = THREADS) -> list[dict]:
    """Send ``(key, body)`` jobs from ``threads`` threads; one result dict per job, in order."""
    local = threading.local()

    def send(job: tuple[str, dict]) -> dict:
        key, payload = job
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=10.0)
        t0 = time.monotonic()
        r = local.client.post(handle.base_url + "/chat/completions", json=payload,
                              headers={"Authorization": f"Bearer {key}"})
        return {"key": key, "status": r.status_code, "json": r.json(), "start": t0,
                "seconds": time.monotonic() - t0, "body": payload}

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="load-client")
    try:
        futures = [pool.submit(send, job) for job in jobs]
        _, late = wait(futures, timeout=DEADLINE)
        assert not late, f"{len(late)} of {len(jobs)} requests missed the {DEADLINE:g}s deadline"
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def chat(handle, i: int, **extra) -> dict:
    body = {"model": handle.model_name, "max_tokens": 4, "temperature": 1.0, "seed": i,
            "logprobs": True, "top_logprobs": 3,
            "messages": [{"role": "user", "content": f"question number {i}?"}]}
    return {**body, **extra}


def check_answer(res: dict) -> None:
    """A 200 is a valid chat completion whose logprobs match its tokens."""
    completion = ChatCompletion.model_validate(res["json"])  # the official client's schema
    choice = completion.choices[0]
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.completion_tokens <= res["body"]["max_tokens"]
    entries = choice.logprobs.content
    assert len(entries) == usage.completion_tokens
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and max(tops) <= 0


def check_error(res: dict, status: int, codes: set[str]) -> None:
    assert res["status"] == status, res
    err = res["json"]["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] in codes, err


def usage_of(handle, key: str) -> dict:
    return httpx.get(handle.base_url + "/usage", headers={"Authorization": f"Bearer {key}"},
                     timeout=10.0).json()


@pytest.fixture
def serving(teacher, tok):
    handles = []

    def start(**config):
        handles.append(start_server(teacher, tok, ServerConfig(**config)))
        return handles[-1]

    yield start
    for h in handles:
        h.stop()
        assert not port_is_open(h.host, h.port)


def test_budgets_hold_under_concurrency(serving):
    # 32 requests at once, 4 threads: a key with 10 queries gets exactly 10 answers
    h = serving(api_keys={"sk-quota": 10, "sk-free": None}, request_log=True)
    jobs = [("sk-quota", chat(h, i)) for i in range(20)] + \
           [("sk-free", chat(h, i)) for i in range(12)]
    jobs = jobs[::2] + jobs[1::2]  # interleave the keys
    results = run_load(h, jobs)
    by_key = {k: [r for r in results if r["key"] == k] for k in ("sk-quota", "sk-free")}
    quota_ok = [r for r in by_key["sk-quota"] if r["status"] == 200]
    assert len(quota_ok) == 10
    for r in by_key["sk-quota"]:
        if r["status"] != 200:
            check_error(r, 429, {"insufficient_quota"})
    assert all(r["status"] == 200 for r in by_key["sk-free"])
    for r in results:
        if r["status"] == 200:
            check_answer(r)
    assert usage_of(h, "sk-quota") == {"object": "usage", "budget": 10, "used": 10,
                                       "remaining": 0, "requests": 20, "rate_limit": None}
    assert usage_of(h, "sk-free")["used"] == 12
    log = h.request_log()
    assert Counter(e["status"] for e in log if e["path"] == "/v1/chat/completions") == \
        Counter(r["status"] for r in results)


def test_rate_limits_hold_under_concurrency(serving):
    # 2 keys x 16 requests, as fast as 4 threads can send them, against 2 requests/s/key
    rate, burst = 2.0, 3
    h = serving(api_keys={"sk-a": None, "sk-b": None}, rate_limit=rate, rate_burst=burst)
    jobs = [(k, chat(h, i)) for i in range(16) for k in ("sk-a", "sk-b")]
    results = run_load(h, jobs)
    for key in ("sk-a", "sk-b"):
        mine = [r for r in results if r["key"] == key]
        ok = [r for r in mine if r["status"] == 200]
        for r in mine:
            if r["status"] == 200:
                check_answer(r)
            else:
                check_error(r, 429, {"rate_limit_exceeded"})
        span = max(r["start"] + r["seconds"] for r in mine) - min(r["start"] for r in mine)
        # a token bucket never answers more than its burst plus what refilled meanwhile
        assert burst <= len(ok) <= burst + rate * span + 1, (key, len(ok), span)
        assert len(ok) < len(mine)  # the limit did bite
        assert usage_of(h, key)["used"] == len(ok)


def test_a_huge_prompt_does_not_hold_up_other_keys(serving):
    # one key sends 33k-token prompts (far past the 256-token context) while two honest
    # keys chat: the context check answers the long ones before the model runs
    h = serving(api_keys={"sk-long": None, "sk-a": None, "sk-b": None}, request_log=True)
    long = [("sk-long", chat(h, i, messages=[{"role": "user", "content": LONG_PROMPT}]))
            for i in range(4)]
    honest = [(k, chat(h, i)) for i in range(10) for k in ("sk-a", "sk-b")]
    jobs = [job for i in range(4) for job in (long[i], *honest[5 * i:5 * i + 5])]
    t0 = time.monotonic()
    results = run_load(h, jobs, threads=3)
    wall = time.monotonic() - t0
    for r in results:
        if r["key"] == "sk-long":
            check_error(r, 400, {"context_length_exceeded"})
            assert r["seconds"] < 3.0, r["seconds"]
        else:
            assert r["status"] == 200, r
            check_answer(r)
            assert r["seconds"] < 3.0, r["seconds"]
    assert wall < 10.0
    assert usage_of(h, "sk-long")["used"] == 0
    long_log = [e for e in h.request_log()
                if e["key_id"] == key_id("sk-long") and e["path"] == "/v1/chat/completions"]
    assert len(long_log) == 4
    assert all(e["prompt_tokens"] > 33_000 and e["completion_tokens"] is None
               for e in long_log)
