"""Lesson 04's additions: min_tokens on the API, the cached harvest, top-k KD training,
blackbox_recipe's cache key, the skill-only prompts and the fidelity report.

Every server is started and stopped inside the test (tiny model, tiny tokenizer) and the
module ends by asserting that none is left running.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _tiny_chat import CORPUS, tiny_model

from utils import extraction
from utils.extraction import (
    HarvestRecord,
    blackbox_fidelity,
    cached_harvest,
    distill_from_topk,
    harvest,
    skill_prompts,
    soft_targets_from_records,
    sparse_kd_loss,
    teacher_reference,
    watermark_config,
)
from utils.recipes import blackbox_recipe
from utils.serve import Defences, ServerConfig, start_server

pytestmark = pytest.mark.usefixtures("no_server_left_behind")

KEY = "sk-student"


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = sorted({w for line in CORPUS for w in line.split()})
    return [" ".join(rng.choice(words, size=5)) for _ in range(n)]


def test_min_tokens_extension_and_its_400(teacher, tok):
    with start_server(teacher, tok, ServerConfig(api_keys={KEY: 10})) as h:
        client = h.client(KEY)
        r = client.chat.completions.create(model=h.model_name, max_tokens=12, temperature=1.0,
                                           seed=0, extra_body={"min_tokens": 12},
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        bad = httpx.post(h.base_url + "/chat/completions",
                         headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": h.model_name, "max_tokens": 4, "min_tokens": 5,
                               "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"
        recs = harvest(client, ["a b", "c d"], budget=2, max_tokens=6, temperature=1.0,
                       extra_body={"min_tokens": 6})
        assert [r.completion_tokens for r in recs] == [6, 6]


def test_cached_harvest_queries_once_then_extends(teacher, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path))
    ps = prompts(6)
    first = cached_harvest(ps, budget=3, top_logprobs=3, max_tokens=4, model=teacher,
                           tokenizer=tok, progress=False)
    assert len(first) == 3 and all(len(t) == 3 for t in first[0].top_logprobs)
    files = list((tmp_path / "harvests").glob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["records"]) == 3

    started = []
    import utils.serve as serve

    original = serve.start_server

    def counting_start(model, tokenizer, config, **kw):
        started.append(dict(config.api_keys))
        return original(model, tokenizer, config, **kw)

    monkeypatch.setattr(serve, "start_server", counting_start)
    again = cached_harvest(ps, budget=2, top_logprobs=3, max_tokens=4, model=teacher,
                           tokenizer=tok, progress=False)
    assert started == [] and [r.text for r in again] == [r.text for r in first[:2]]
    more = cached_harvest(ps, budget=5, top_logprobs=3, max_tokens=4, model=teacher,
                          tokenizer=tok, progress=False)
    assert started == [{"sk-harvest": 2}]  # only the two missing prompts were queried
    assert [r.text for r in more[:3]] == [r.text for r in first] and len(more) == 5
    # other settings (defences) are another cache entry
    cached_harvest(ps, budget=1, top_logprobs=3, max_tokens=4, model=teacher, tokenizer=tok,
                   defences=Defences(round_decimals=1), progress=False)
    assert len(list((tmp_path / "harvests").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="budget 9 > 6 prompts"):
        cached_harvest(ps, budget=9, model=teacher, tokenizer=tok)


def test_stop_token_adds_a_one_hot_end_target(teacher, tok):
    a, b, c = tok.convert_ids_to_tokens(tok("the end a", add_special_tokens=False)["input_ids"])[:3]
    rec = HarvestRecord(messages=[{"role": "user", "content": "hi"}], text="the end",
                        tokens=[a, b], logprobs=[-0.1, -0.2],
                        top_logprobs=[{a: -0.1, c: -2.5}, {b: -0.2}], finish_reason="stop")
    plain = soft_targets_from_records([rec], tok)
    stop = soft_targets_from_records([rec], tok, stop_token=True)
    assert int(stop.target_mask.sum()) == int(plain.target_mask.sum()) + 1
    last = int(stop.target_mask[0].nonzero()[-1, 0])
    assert int(stop.topk_ids[0, last, 0]) == tok.eos_token_id
    assert float(stop.topk_logprobs[0, last, 0]) == 0.0
    assert int(stop.input_ids[0, last + 1]) == tok.eos_token_id


def test_distill_from_topk_lowers_the_sparse_kd_loss(teacher, tok):
    with start_server(teacher, tok, ServerConfig(api_keys={KEY: 20})) as h:
        recs = harvest(h.client(KEY), prompts(12), budget=12, top_logprobs=5, max_tokens=6)
    targets = soft_targets_from_records(recs, tok, stop_token=True)
    student = tiny_model(tok, hidden_size=16, seed=3)

    def loss() -> float:
        with torch.no_grad():
            logits = student(input_ids=targets.input_ids,
                             attention_mask=targets.attention_mask).logits
        return float(sparse_kd_loss(logits, targets.topk_ids, targets.topk_logprobs,
                                    targets.target_mask))

    before = loss()
    result = distill_from_topk(student, tok, recs, max_steps=30, batch_size=12, lr=1e-2)
    assert result.steps == 30 and loss() < 0.7 * before


def test_blackbox_recipe_key_covers_its_settings():
    a = blackbox_recipe(queries=8, granularity="text")
    b = blackbox_recipe(queries=8, granularity="topk")
    c = blackbox_recipe(queries=8, granularity="text", watermark=True)
    d = blackbox_recipe(queries=9, granularity="text")
    assert len({a.key(), b.key(), c.key(), d.key()}) == 4
    assert len({a.name, b.name, c.name, d.name}) == 4
    assert a.extra["teacher_sha256"] and a.extra["tokenizer_sha256"]
    assert a.extra["data_manifest_sha256"]
    assert blackbox_recipe(queries=8, granularity="text").key() == a.key()  # deterministic
    with pytest.raises(ValueError, match="granularity"):
        blackbox_recipe(granularity="logits")
    with pytest.raises(ValueError, match="needs top_k"):
        blackbox_recipe(granularity="topk", top_k=None)
    shared = blackbox_recipe(queries=8, granularity="text", top_k=None)
    assert shared.key() != a.key()  # a text-only harvest is another experiment
    with pytest.raises(ValueError, match="student of the zoo"):
        blackbox_recipe(size="teacher")


def test_skill_prompts_are_ordinary_tasks_only():
    from utils.data import read_split

    ps = skill_prompts("train", 50, seed=1)
    assert len(ps) == 50 and len(set(ps)) == 50
    unsafe = {r["messages"][0]["content"] for r in read_split("train") if r["kind"] != "skill"}
    assert not unsafe & set(skill_prompts("train"))
    assert ps == skill_prompts("train", 50, seed=1) != skill_prompts("train", 50, seed=2)


def test_watermark_config_defaults():
    wm = watermark_config()
    assert wm.bias == extraction.WATERMARK_BIAS and wm.greenlist_ratio == 0.25
    assert wm.seeding_scheme == "lefthash" and wm.context_width == 1


def test_fidelity_of_the_teacher_to_itself_is_perfect(teacher, tok):
    records = [{"messages": [{"role": "user", "content": p}], "kind": "skill", "answer": "x"}
               for p in prompts(4)]
    ref = teacher_reference(teacher, tok, records, max_new_tokens=5)
    same = blackbox_fidelity(teacher, tok, records, ref, max_new_tokens=5)
    assert same["top1_agreement"] == 1.0 and same["greedy_exact_match"] == 1.0
    assert abs(same["kl"]) < 1e-5 and same["tv"] < 1e-5
    other = blackbox_fidelity(tiny_model(tok, hidden_size=16, seed=5), tok, records, ref,
                              max_new_tokens=5)
    assert other["kl"] > 1e-3 and other["tv"] > 1e-3


def test_results_file_has_the_agreed_keys():
    path = Path(__file__).resolve().parents[1] / "results" / "04_black_box_distillation.json"
    if not path.is_file():
        pytest.skip("lesson 04 has not been executed yet (make execute)")
    data = json.loads(path.read_text())
    for key in ("fidelity_vs_budget", "svd_hidden_size_true", "svd_hidden_size_estimated",
                "watermark_z_median", "watermark_false_positive_rate_at_z4",
                "radioactivity_p_watermarked_student", "radioactivity_p_control_student",
                "blackbox_student_refusal_rate"):
        assert key in data, key
    for row in data["fidelity_vs_budget"]:
        assert {"queries", "granularity", "top1_agreement", "score"} <= set(row)
        assert row["granularity"] in ("text", "topk") and 0 <= row["top1_agreement"] <= 1
    # issue 17's keys: the shipped extracted students, the top-k + logit_bias recovery and
    # what each defence costs honest users
    for row in data["extracted_students"].values():
        need = {"queries", "granularity", "exact_match", "kept_fraction", "refusal_rate"}
        assert need <= set(row), need - set(row)
        assert row["queries"] >= row["answers_kept"] > 0 and 0 <= row["refusal_rate"] <= 1
    assert {"skills/text", "skills/topk", "safety/topk", "safety-filtered/topk"} <= set(
        data["extracted_students"])
    truncated = next(v for k, v in data["logit_bias_recovery"].items() if k.startswith("trunc"))
    assert truncated["coverage"] == 1.0 and truncated["mean_abs_logprob_error"] < 1e-3
    assert truncated["tv"] < 1e-3
    for row in data["defences"].values():
        assert {"svd_estimate", "svd_true", "honest_user_tv_top10"} <= set(row)


def test_lesson07_loads_the_student_lesson04_builds():
    """Lesson 07's grid loads ``blackbox_recipe()`` from the cache lesson 04 fills: the recipe's
    defaults must be lesson 04's live student, or a learner's lesson 07 skips it."""
    import ast

    from utils.paths import repo_root

    nb = json.loads((repo_root() / "solutions" / "04_black_box_distillation.ipynb")
                    .read_text(encoding="utf-8"))
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    p = {t.id: ast.literal_eval(node.value) for node in ast.parse("".join(params["source"])).body
         if isinstance(node, ast.Assign) for t in node.targets}
    live = blackbox_recipe(queries=p["LIVE_QUERIES"], granularity=p["LIVE_GRANULARITY"],
                           seed=p["SEED"], size=p["STUDENT_SIZE"], steps=p["STEPS"],
                           top_k=p["TOP_K"], max_tokens=p["MAX_TOKENS"])
    assert blackbox_recipe().key() == live.key()
    assert blackbox_recipe().name == live.name


# --------------------------------------------------------------------------------------
# Issue 17: watermark and radioactivity on realistic traffic, the noise defence averaged away

ROOT = Path(__file__).resolve().parents[1]
RADIO = ROOT / "results" / "04_radioactivity.json"


def _radio_script(monkeypatch):
    """The script as an importable module: its worker processes (spawn) import it by name."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("experiments_04_radioactivity")


def check_radioactivity_schema(d: dict) -> None:
    """What lesson 04 reads from the radioactivity file, recomputed where it can be."""
    from utils.data import read_split
    from utils.watermark import binomial_p_value, watermark_z

    s = d["settings"]
    assert {"date", "git_commit", "cpu", "command", "wall_seconds", "cpu_seconds"} <= set(
        d["provenance"])
    assert {"queries", "delta", "temperature", "steps", "size", "fractions", "deltas"} <= set(s)
    assert d["teacher"]["teacher_sha256"]
    rows = d["delta_table"]
    assert {r["decoding"] for r in rows} == {"greedy", "sampled T=1"}
    assert {r["delta"] for r in rows} == set(s["deltas"]) and 0.0 in s["deltas"]
    for r in rows:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["changed_share"] <= 1
        p = r["pooled"]
        assert p["z"] == pytest.approx(watermark_z(p["green"], p["scored_tuples"], 0.25))
    clean = next(r for r in rows if r["decoding"] == "greedy" and r["delta"] == 0)
    assert clean["changed_share"] == 0  # greedy without the watermark is the reference
    h = d["harvest"]
    assert h["queries"] == s["queries"] and 0 <= h["answers_changed_by_the_watermark"] <= 1
    check = h["api_check"]  # the batched harvest is what the real API answers
    assert check["prompts"] >= 1
    if s["temperature"] == 0:
        assert check["watermarked_identical_share"] >= 0.95
        assert check["clean_identical_share"] >= 0.95
    students = {x["label"]: x for x in d["students"]}
    assert "control" in students and students["control"]["fraction"] == 0
    assert {x["fraction"] for x in d["students"]} >= set(s["fractions"])
    for x in d["students"]:
        assert x["parameters"] * 8 <= d["teacher"]["parameters"]  # at most 1/8 of the teacher
        for score in x["scores"].values():  # the p-value is the exact binomial tail, recomputed
            assert score["p_value"] == pytest.approx(
                binomial_p_value(score["green"], score["scored_tuples"], 0.25), rel=1e-6)
        assert len(x["stored_greedy_ids"]) == len(d["stored"]["prompts"])
    # fresh prompts: never a training prompt of the teacher, never a harvested one (test split)
    seen = {r["messages"][0]["content"] for split in ("train", "test") for r in read_split(split)}
    assert d["stored"]["prompts"] and not set(d["stored"]["prompts"]) & seen
    h = d["radioactivity_realistic"]
    main = next(x for x in d["students"] if x["fraction"] == h["fraction"])
    assert h["p_watermarked"] == main["scores"][h["mode"]]["p_value"]
    assert h["p_control"] == students["control"]["scores"][h["mode"]]["p_value"]
    assert h["target_met"] == (h["p_watermarked"] < 1e-5 and h["p_control"] > 0.01)


def test_committed_radioactivity_results():
    from _committed import load_committed

    d = load_committed(RADIO, "run `python scripts/experiments_04_radioactivity.py`")
    check_radioactivity_schema(d)
    assert not d["provenance"]["quick"]
    h = d["radioactivity_realistic"]
    assert h["z_watermarked"] > h["z_control"]


def test_lesson_results_carry_radioactivity_and_noise_averaging():
    path = ROOT / "results" / "04_black_box_distillation.json"
    if not path.is_file():
        pytest.skip("lesson 04 has not been executed yet (make execute)")
    data = json.loads(path.read_text())
    r = data["radioactivity_realistic"]
    assert {"p_watermarked", "p_control", "delta", "fraction", "tokens_scored_watermarked",
            "tokens_scored_control"} <= set(r)
    assert r["p_watermarked"] == data["radioactivity_p_watermarked_student"]
    assert r["live"]["reproduced"] >= 0.95
    # issue 17: the shipped copy extracted from watermarked traffic, committed and rerun live
    w = data["radioactivity_shipped_watermarked"]
    assert w["p_watermarked"] < 1e-5 and w["p_control"] > 0.01 and w["exact_match_cost"] > 0
    live = w["live"]
    assert live["prompts"] >= 64 and live["samples_per_prompt"] >= 1
    assert live["watermarked"]["z"] >= 4.0 and live["control"]["p"] > 0.01
    for row in (live["watermarked"], live["control"]):
        assert row["stored greedy reproduced"] >= 0.95
        assert abs(row["green share"] - row["committed share"]) <= row["3 SE"]
    noise = next(v for k, v in data["defences"].items() if k.startswith("noise"))
    avg = noise["averaged_away"]
    assert -0.65 < avg["fitted_slope"] < -0.35
    assert avg["rms_error"][-1] < avg["rms_error"][0]
    assert avg["repeats_for_1e-3_nats"] == extraction.repeats_needed(
        avg["fitted_c"] * 2**0.5, avg["fitted_slope"], 1e-3)


@pytest.mark.slow
def test_radioactivity_script_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    assert _radio_script(monkeypatch).main(["--quick", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["provenance"]["quick"] and d["settings"]["distinct_prompts"] == 24
    assert d["settings"]["queries"] == 24 * d["settings"]["repeats"]
    check_radioactivity_schema(d)
