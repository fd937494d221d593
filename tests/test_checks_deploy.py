"""Mutation tests for lesson 06's checks: each known-wrong answer must be rejected."""

from __future__ import annotations

import numpy as np
import pytest

from utils.checks.deploy import (
    RUNTIME_MAX_FILE_SHARE,
    RUNTIME_MAX_FLIPS,
    RUNTIME_MIN_SPEEDUP,
    FakeDecoderSession,
    check_bandwidth_bound,
    check_choose_variant,
    check_decode_with_cache,
    check_runtime_choice,
    reference_choose_variant,
    reference_decode_speed_bound,
    runtime_experiment,
)
from utils.deploy import empty_past, ort_generate, ort_generate_full

# ---------------------------------------------------------------- decode_with_cache mutations


def _loop(session, input_ids, max_new_tokens, eos_token_id=None, *, feed_back=None,
          positions=None, pick=None, mask_grows=True, stop_before_eos=False,
          only_new=False, full_feed=False):
    """A cached greedy loop with hooks to plant one classic mistake at a time."""
    ids = np.asarray(input_ids, dtype=np.int64)
    batch, prompt_len = ids.shape
    names = [o.name for o in session.get_outputs()]
    past = empty_past(session, batch)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(prompt_len), ids.shape).copy()
    seq, feed = ids, ids
    for _ in range(max_new_tokens):
        out = session.run(None, {"input_ids": feed, "attention_mask": mask,
                                 "position_ids": pos, **past})
        logits = out[0]
        nxt = (pick or (lambda lg: lg[:, -1].argmax(-1)))(logits).astype(np.int64)
        if stop_before_eos and eos_token_id is not None and (nxt == eos_token_id).all():
            break
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if eos_token_id is not None and not stop_before_eos and (nxt == eos_token_id).all():
            break
        presents = {n: out[names.index(n)] for n in names if n.startswith("present.")}
        past = (feed_back or (lambda p, old: {k.replace("present.", "past_key_values."): v
                                               for k, v in p.items()}))(presents, past)
        past_len = next(iter(past.values())).shape[2]
        feed = seq if full_feed else nxt[:, None]
        if full_feed:
            mask = np.ones((batch, past_len + seq.shape[1]), dtype=np.int64)
            pos = np.broadcast_to(np.arange(seq.shape[1]), seq.shape).copy()
        else:
            mask = (np.ones((batch, past_len + 1), dtype=np.int64) if mask_grows
                    else np.ones((batch, 1), dtype=np.int64))
            pos = (positions or (lambda n: np.full((batch, 1), n, dtype=np.int64)))(past_len)
    return seq[:, prompt_len:] if only_new else seq


def _swap_layers(presents, old):
    out = {}
    for k, v in presents.items():
        layer = int(k.split(".")[1])
        other = 1 - layer
        out[k.replace(f"present.{layer}", f"past_key_values.{other}")] = v
    return out


def _swap_key_value(presents, old):
    out = {}
    for k, v in presents.items():
        k2 = k.replace("key", "TMP").replace("value", "key").replace("TMP", "value")
        out[k2.replace("present.", "past_key_values.")] = v
    return out


DECODE_MUTANTS = {
    "cache not advanced": lambda s, i, n, e=None: _loop(s, i, n, e, feed_back=lambda p, old: old),
    "cache reset to empty": lambda s, i, n, e=None: _loop(
        s, i, n, e, feed_back=lambda p, old: {k: v[:, :, :0] for k, v in old.items()}),
    "positions restart at 0": lambda s, i, n, e=None: _loop(
        s, i, n, e, positions=lambda past_len: np.zeros((i.shape[0], 1), np.int64)),
    "positions off by one": lambda s, i, n, e=None: _loop(
        s, i, n, e, positions=lambda past_len: np.full((i.shape[0], 1), past_len + 1, np.int64)),
    "argmax of the first position": lambda s, i, n, e=None: _loop(
        s, i, n, e, pick=lambda lg: lg[:, 0].argmax(-1)),
    "argmax over the wrong axis": lambda s, i, n, e=None: _loop(
        s, i, n, e, pick=lambda lg: lg[:, -1].argmax(0)[: lg.shape[0]]),
    "attention mask not grown": lambda s, i, n, e=None: _loop(s, i, n, e, mask_grows=False),
    "layers swapped": lambda s, i, n, e=None: _loop(s, i, n, e, feed_back=_swap_layers),
    "key and value swapped": lambda s, i, n, e=None: _loop(s, i, n, e, feed_back=_swap_key_value),
    "whole sequence fed with the cache": lambda s, i, n, e=None: _loop(s, i, n, e, full_feed=True),
    "no cache (full recompute)": lambda s, i, n, e=None: ort_generate_full(s, i, n, e),
    "eos ignored": lambda s, i, n, e=None: ort_generate(s, i, n),
    "stops before eos": lambda s, i, n, e=None: _loop(s, i, n, e, stop_before_eos=True),
    "returns only new tokens": lambda s, i, n, e=None: _loop(s, i, n, e, only_new=True),
    "one token short": lambda s, i, n, e=None: ort_generate(s, i, n - 1, e),
    "int32 ids": lambda s, i, n, e=None: ort_generate(
        _Int32Session(s), i, n, e),
}


class _Int32Session:
    """Feeds int32 token ids, as a loop built on np.array(list) on some platforms would."""

    def __init__(self, session):
        self.s = session

    def get_inputs(self):
        return self.s.get_inputs()

    def get_outputs(self):
        return self.s.get_outputs()

    def run(self, names, feed):
        feed = dict(feed, input_ids=np.asarray(feed["input_ids"], dtype=np.int32))
        return self.s.run(names, feed)


def test_decode_check_accepts_reference():
    result = check_decode_with_cache(ort_generate)
    assert result.passed, result.message


def test_decode_check_accepts_plain_loop_without_mistakes():
    result = check_decode_with_cache(lambda s, i, n, e=None: _loop(s, i, n, e))
    assert result.passed, result.message


@pytest.mark.parametrize("mistake", sorted(DECODE_MUTANTS))
def test_decode_check_rejects(mistake):
    result = check_decode_with_cache(DECODE_MUTANTS[mistake])
    assert not result.passed, f"check accepted a loop with: {mistake}"
    assert result.status in ("failed", "error")


def test_decode_check_hints_name_the_mistake():
    msg = check_decode_with_cache(DECODE_MUTANTS["cache not advanced"]).message
    assert "cache" in msg and "advanced" in msg
    msg = check_decode_with_cache(DECODE_MUTANTS["positions restart at 0"]).message
    assert "position_ids" in msg
    msg = check_decode_with_cache(DECODE_MUTANTS["no cache (full recompute)"]).message
    assert "recomputes" in msg


def test_decode_check_not_done_and_crash():
    def todo(session, input_ids, max_new_tokens, eos_token_id=None):
        raise NotImplementedError("Exercise 6.1: decode_with_cache")

    assert check_decode_with_cache(todo).status == "not_done"
    assert check_decode_with_cache(lambda s, i, n, e=None: 1 / 0).status == "error"


def test_fake_session_matches_its_ground_truth_and_validates():
    s = FakeDecoderSession()
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    out = ort_generate(s, ids, 4)
    full = ort_generate_full(FakeDecoderSession(), ids, 4)
    assert np.array_equal(out, full)
    seq = [5, 6, 7]
    for _ in range(4):
        seq.append(FakeDecoderSession.next_token(seq))
    assert out[0].tolist() == seq
    with pytest.raises(ValueError, match="int64"):
        s.run(None, {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids),
                     "position_ids": np.arange(3)[None], **empty_past(s, 1)})
    with pytest.raises(ValueError, match="missing inputs"):
        s.run(None, {"input_ids": ids})


# ---------------------------------------------------------------- decode_speed_bound mutations

BOUND_MUTANTS = {
    "bits as bytes": lambda bw, n, bits, kv=0: bw * 1e9 / (n * bits + kv),
    "bytes times 8": lambda bw, n, bits, kv=0: bw * 1e9 / (n * bits / 64 + kv),
    "GiB instead of GB": lambda bw, n, bits, kv=0: bw * 2**30 / (n * bits / 8 + kv),
    "forgot 1e9": lambda bw, n, bits, kv=0: bw / (n * bits / 8 + kv),
    "seconds per token": lambda bw, n, bits, kv=0: (n * bits / 8 + kv) / (bw * 1e9),
    "ignores kv cache": lambda bw, n, bits, kv=0: bw * 1e9 / (n * bits / 8),
    "kv cache counted in bits": lambda bw, n, bits, kv=0: bw * 1e9 / ((n + kv) * bits / 8),
    "params not bytes": lambda bw, n, bits, kv=0: bw * 1e9 / (n + kv),
    "returns a string": lambda bw, n, bits, kv=0: f"{bw * 1e9 / (n * bits / 8 + kv):.1f}",
}


def test_bound_check_accepts_reference():
    result = check_bandwidth_bound(reference_decode_speed_bound)
    assert result.passed, result.message


@pytest.mark.parametrize("mistake", sorted(BOUND_MUTANTS))
def test_bound_check_rejects(mistake):
    result = check_bandwidth_bound(BOUND_MUTANTS[mistake])
    assert not result.passed, f"check accepted: {mistake}"


def test_bound_check_hint_names_bits_vs_bytes():
    assert "bits are not bytes" in check_bandwidth_bound(BOUND_MUTANTS["bits as bytes"]).message
    assert "KV cache" in check_bandwidth_bound(BOUND_MUTANTS["ignores kv cache"]).message


# ---------------------------------------------------------------- choose_variant mutations


def _fits(v, b, m, t, strict=False):
    if strict:
        return v["bytes"] < b and v["peak_rss_mb"] < m and v["tokens_per_s"] > t
    return v["bytes"] <= b and v["peak_rss_mb"] <= m and v["tokens_per_s"] >= t


def _best(cands, key=lambda v: v["quality"]):
    return max(cands, key=key) if cands else None


CHOOSE_MUTANTS = {
    "ignores memory budget": lambda vs, b, m, t: _best(
        [v for v in vs if v["bytes"] <= b and v["tokens_per_s"] >= t]),
    "ignores size budget": lambda vs, b, m, t: _best(
        [v for v in vs if v["peak_rss_mb"] <= m and v["tokens_per_s"] >= t]),
    "ignores speed budget": lambda vs, b, m, t: _best(
        [v for v in vs if v["bytes"] <= b and v["peak_rss_mb"] <= m]),
    "picks the fastest": lambda vs, b, m, t: _best(
        [v for v in vs if _fits(v, b, m, t)], key=lambda v: v["tokens_per_s"]),
    "picks the smallest": lambda vs, b, m, t: _best(
        [v for v in vs if _fits(v, b, m, t)], key=lambda v: -v["bytes"]),
    "picks the worst quality": lambda vs, b, m, t: _best(
        [v for v in vs if _fits(v, b, m, t)], key=lambda v: -v["quality"]),
    "first that fits": lambda vs, b, m, t: next((v for v in vs if _fits(v, b, m, t)), None),
    "strict limits": lambda vs, b, m, t: _best([v for v in vs if _fits(v, b, m, t, True)]),
    "raises when none fits": lambda vs, b, m, t: max(
        [v for v in vs if _fits(v, b, m, t)], key=lambda v: v["quality"]),
    "returns the name": lambda vs, b, m, t: (lambda v: v and v["name"])(
        reference_choose_variant(vs, b, m, t)),
    "sorts in place": lambda vs, b, m, t: (vs.sort(key=lambda v: -v["quality"]),
                                          next((v for v in vs if _fits(v, b, m, t)), None))[1],
    "best overall, ignoring budgets": lambda vs, b, m, t: _best(vs),
}


def test_choose_check_accepts_reference():
    result = check_choose_variant(reference_choose_variant)
    assert result.passed, result.message


@pytest.mark.parametrize("mistake", sorted(CHOOSE_MUTANTS))
def test_choose_check_rejects(mistake):
    result = check_choose_variant(CHOOSE_MUTANTS[mistake])
    assert not result.passed, f"check accepted: {mistake}"


def test_choose_check_hint_names_the_budget():
    msg = check_choose_variant(CHOOSE_MUTANTS["ignores memory budget"]).message
    assert "memory" in msg
    msg = check_choose_variant(CHOOSE_MUTANTS["picks the fastest"]).message
    assert "highest quality" in msg


# --------------------------------------------------------------------------------------
# Exercise 6.4 (open experiment): runtime, precision and threads for a device budget
# The shipped distilled student, exported here as in section 2, and the lesson's prompts: the
# check times and compares real runtimes, so these tests re-measure the bars.

REFERENCE_RUNTIME = {"runtime": "onnxruntime", "precision": "int8", "threads": 1}  # solution's


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    from utils.data import read_split
    from utils.deploy import export_onnx
    from utils.models import load_model

    model, tok = load_model("student-xs-forward-kl", verbose=False)
    model.eval()
    onnx_fp32 = export_onnx(model, tmp_path_factory.mktemp("ex64") / "model_kv.onnx")
    records = [r for r in read_split("test") if r["kind"] == "skill"]
    texts = [r["messages"][0]["content"] for r in records[::len(records) // 12][:12]]
    prompts = [np.asarray([tok.apply_chat_template([{"role": "user", "content": t}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]],
                          dtype=np.int64) for t in texts]  # the lesson's 12 prompts
    return model, onnx_fp32, prompts, model.generation_config.eos_token_id


def _runtime(**kw):
    choice = {**REFERENCE_RUNTIME, **kw}
    return lambda: choice


def test_runtime_check_accepts_the_reference_with_a_margin(deployed):
    result = check_runtime_choice(_runtime(), *deployed)
    assert result.passed, result
    r = runtime_experiment(*deployed, **REFERENCE_RUNTIME)
    assert r["bytes"] <= 0.8 * RUNTIME_MAX_FILE_SHARE * r["fp32_bytes"], r
    assert r["speedup"] >= 1.25 * RUNTIME_MIN_SPEEDUP, r
    assert r["flipped_tokens"] <= RUNTIME_MAX_FLIPS and r["compared_tokens"] >= 12, r


@pytest.mark.parametrize("kw, words", [
    ({"runtime": "pytorch", "precision": "fp32"}, "too big, too slow"),   # the naive default
    ({"runtime": "pytorch", "precision": "int8"}, "too slow"),            # small, not fast
    ({"runtime": "onnxruntime", "precision": "fp32"}, "too big"),         # fast, not small
    ({"runtime": "onnxruntime", "precision": "int4"}, "too many flips"),   # small, fast, flips
    ({"runtime": "pytorch", "precision": "int4"}, "does not run here"),
])
def test_runtime_check_rejects_bad_choices(deployed, kw, words):
    result = check_runtime_choice(_runtime(**kw), *deployed)
    assert result.status == "failed", result
    assert words in result.message, result.message


@pytest.mark.parametrize("choice, words", [
    ({"runtime": "tensorrt", "precision": "int8", "threads": 1}, "not allowed"),
    ({"runtime": "onnxruntime", "precision": "int8", "threads": 4}, "not allowed"),
    ({"runtime": "onnxruntime", "precision": "int8", "threads": "1"}, "not allowed"),
    ({"runtime": "onnxruntime", "precision": "int8"}, "missing 'threads'"),
    ({"tokens_per_s": 9000, "flipped_tokens": 0}, "settings"),      # a fake result
    (9000.0, "settings"),                                          # a fake number
])
def test_runtime_check_rejects_wrong_types_and_fake_results(choice, words):
    result = check_runtime_choice(lambda: choice, None, None, [], None)  # never reached
    assert result.status == "failed", result
    assert words in result.message, result.message


def test_runtime_check_not_done_and_errors():
    def not_done():
        raise NotImplementedError("Exercise 6.4: choose_runtime")

    result = check_runtime_choice(not_done, None, None, [], None)
    assert result.status == "not_done" and "carries on" in result.message
    assert check_runtime_choice(lambda: 1 / 0, None, None, [], None).status == "error"
    assert check_runtime_choice("onnxruntime", None, None, [], None).status == "error"
