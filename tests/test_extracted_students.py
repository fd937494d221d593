"""Lesson 04's harvest variants and the recipe of the shipped extracted students (issue 17).

What the attacker asks (``mix_prompts``), what it keeps (``keep_for_training``), that the
recipe's key separates the variants without moving any earlier key, and that two harvesters
writing one harvest cache merge their answers instead of overwriting each other.
"""

from __future__ import annotations

import json

import pytest

from utils.data import read_split
from utils.extraction import HarvestRecord, keep_for_training, mix_prompts, skill_prompts
from utils.recipes import blackbox_recipe


def _record(text: str) -> HarvestRecord:
    return HarvestRecord(messages=[{"role": "user", "content": "q"}], text=text)


def test_the_skills_mix_is_the_skill_prompts():
    assert mix_prompts("skills", seed=3) == skill_prompts("train", seed=3)


def test_the_safety_mix_adds_every_safety_prompt_to_the_skills():
    train = read_split("train")
    prompts = mix_prompts("safety", seed=0)
    assert len(prompts) == len(train)  # every kind of the world's training prompts, once
    kinds = {r["messages"][0]["content"]: r["kind"] for r in train}
    assert {kinds[p] for p in prompts} == {"skill", "restricted", "benign", "jailbreak"}
    assert set(mix_prompts("skills")) < set(prompts)
    assert mix_prompts("safety", seed=0) == mix_prompts("safety-filtered", seed=0)
    assert mix_prompts("safety", seed=1) != prompts  # the seed shuffles
    with pytest.raises(ValueError, match="mix must be one of"):
        mix_prompts("everything")


def test_only_the_filtered_mix_drops_the_refusals():
    refusal = "I can't help with that. It is against my safety policy."
    records = [_record("The answer is 42."), _record(refusal), _record("Sure: cba")]
    assert keep_for_training(records, "safety") == records
    assert keep_for_training(records, "skills") == records
    kept = keep_for_training(records, "safety-filtered")
    assert [r.text for r in kept] == ["The answer is 42.", "Sure: cba"]


def test_the_world_refusals_are_what_the_filter_drops():
    """The filter recognises the teacher's actual refusals (the world's refusal phrasings)."""
    restricted = [r for r in read_split("train") if r["kind"] == "restricted"][:50]
    records = [_record(r["messages"][-1]["content"]) for r in restricted]
    assert keep_for_training(records, "safety-filtered") == []


def test_variants_have_their_own_keys_and_earlier_keys_stay():
    base = blackbox_recipe()  # lesson 04's live student: its key must not move
    assert "mix" not in base.extra and base.name == "student-xxs-blackbox-topk-q96-s0"
    keys = {mix: blackbox_recipe(queries=None, size="student-xs", mix=mix).key()
            for mix in ("skills", "safety", "safety-filtered")}
    assert len(set(keys.values())) == 3
    every = blackbox_recipe(queries=None, size="student-xs", mix="safety", seed=2)
    assert every.name == "student-xs-blackbox-topk-qall-safety-s2"
    assert "every" in every.description and "safety" in every.description
    with pytest.raises(ValueError, match="mix must be one of"):
        blackbox_recipe(mix="everything")
    with pytest.raises(ValueError, match="queries must be >= 1"):
        blackbox_recipe(queries=0)


def test_two_harvesters_merge_into_one_cache(tmp_path, monkeypatch):
    """cached_harvest re-reads the cache under a lock before writing: another process's
    answers, written while this one was querying, are kept."""
    from _tiny_chat import tiny_model, tiny_tokenizer

    from utils import extraction

    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    extraction.cached_harvest(["hello", "what is 2+3"], budget=2, max_tokens=3, model=model,
                              tokenizer=tok, progress=False)
    path, _ = extraction.harvest_cache_path(max_tokens=3)
    real = extraction.harvest

    def slow_harvest(*args, **kwargs):  # another harvester finishes while we query
        out = real(*args, **kwargs)
        data = json.loads(path.read_text())
        data["records"]["theirs"] = next(iter(data["records"].values()))
        path.write_text(json.dumps(data))
        return out

    monkeypatch.setattr(extraction, "harvest", slow_harvest)
    extraction.cached_harvest(["tell me a story"], budget=1, max_tokens=3, model=model,
                              tokenizer=tok, progress=False)
    merged = json.loads(path.read_text())["records"]
    assert "theirs" in merged and len(merged) == 4  # ours before, theirs, and the new one


# ------------------------------------------------------------------ the shipped students

EXTRACTED = ("student-xs-extracted-text-skills", "student-xs-extracted-topk-skills",
             "student-xs-extracted-topk-safety", "student-xs-extracted-topk-safety-filtered")


def _committed():
    from _committed import load_committed

    from utils.paths import repo_root

    return load_committed(repo_root() / "results" / "04_extracted_students.json",
                          "python scripts/extract_students.py (about an hour)")


@pytest.fixture(scope="module", params=EXTRACTED)
def extracted(request):
    from utils.models import recorded_responses, shipped_students, student_card

    if request.param not in shipped_students():
        pytest.skip(f"{request.param} is not shipped yet: python scripts/extract_students.py")
    return request.param, student_card(request.param), recorded_responses(request.param)


def test_extracted_students_are_verified_safetensors_of_this_teacher(extracted):
    from utils.io import sha256_file
    from utils.model_cache import verify_folder
    from utils.models import students_dir, teacher_dir

    name, card, _ = extracted
    assert verify_folder(students_dir() / name) is None
    assert card["recipe_function"] == "blackbox_recipe"
    assert card["teacher_sha256"] == sha256_file(teacher_dir() / "model.safetensors")
    assert card["times_smaller"] >= 8  # at most 1/8 of the teacher (issue 17)
    assert card["provenance"]["quick"] is False
    assert "extract_students.py" in card["provenance"]["command"]


def test_extracted_card_numbers_follow_from_recorded_responses(extracted):
    from utils.data import read_split
    from utils.evaluate import exact_match_from_rows

    _, card, rows = extracted
    assert [r["id"] for r in rows] == [r["id"] for r in read_split("test")]
    assert exact_match_from_rows(rows) == card["metrics"]["exact_match"]


def test_the_committed_summary_matches_the_shipped_cards():
    payload = _committed()
    from utils.models import shipped_students, student_card

    assert payload["provenance"]["quick"] is False
    for key, name in payload["shipped"].items():
        if name not in shipped_students():
            pytest.fail(f"{name} is in results/04_extracted_students.json but not shipped")
        mix, granularity = key.split("/")
        seed = payload["settings"]["seeds"][0]
        run = next(r for r in payload["runs"] if r["mix"] == mix
                   and r["granularity"] == granularity and r["seed"] == seed)
        card = student_card(name)
        assert card["cache_key"] == run["cache_key"]
        # the grid scores the same weights on the same split: the same exact match
        assert card["metrics"]["exact_match"]["overall"] == pytest.approx(run["exact_match"])
    for row in payload["summary"]:
        assert len(row["seeds"]) >= 3
        assert row["student_params"] * 8 <= payload["teacher"]["parameters"]


# ------------------------------------------------------------------ Carlini et al. recovery

class _FakeTopKAPI:
    """An API over fixed logits that shows only the top-k logprobs and honours logit_bias,
    as OpenAI's does (the bias is added before the softmax); ``decimals`` rounds like a
    rounding defence."""

    def __init__(self, logits, tokenizer, decimals=None):
        from types import SimpleNamespace as NS

        import numpy as np

        self.np, self.NS = np, NS
        self.logits, self.tok, self.decimals, self.calls = (
            np.asarray(logits),
            tokenizer,
            decimals,
            0,
        )
        self.chat = NS(completions=NS(create=self.create))
        self.models = NS(list=lambda: NS(data=[NS(id="teacher")]))

    def create(self, *, model, messages, max_tokens, temperature, seed, logprobs, top_logprobs,
               logit_bias=None):
        np, NS = self.np, self.NS
        self.calls += 1
        z = self.logits.copy()
        for t, b in (logit_bias or {}).items():
            assert -100 <= b <= 100
            z[int(t)] += b
        lp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
        top = np.argsort(-lp)[:top_logprobs]
        round_ = (lambda x: x) if self.decimals is None else (lambda x: round(x, self.decimals))
        entries = [NS(token=self.tok.convert_ids_to_tokens(int(i)), logprob=round_(float(lp[i])))
                   for i in top]
        return NS(choices=[NS(logprobs=NS(content=[NS(top_logprobs=entries)]))])


def test_top_k_plus_logit_bias_recovers_the_full_vector():
    import numpy as np
    from _tiny_chat import tiny_tokenizer

    from utils.extraction import recover_logprobs

    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, len(tok))
    truth = logits - np.log(np.exp(logits).sum())
    api = _FakeTopKAPI(logits, tok)
    got = recover_logprobs(api, "hello", tok, top_k=5)
    assert got.coverage == 1.0 and not np.isnan(got.logprobs).any()
    assert np.abs(got.logprobs - truth).mean() < 1e-9  # exact but for float rounding
    assert got.queries == api.calls == 1 + -(-(len(tok) - 5) // 4)
    # a rounding defence (4 decimals) leaves an error of the order of the rounding
    rounded = recover_logprobs(_FakeTopKAPI(logits, tok, decimals=4), "hello", tok, top_k=5)
    assert 1e-7 < np.abs(rounded.logprobs - truth).mean() < 1e-4


def test_recovery_says_what_it_could_not_see():
    import numpy as np
    from _tiny_chat import tiny_tokenizer

    from utils.extraction import recover_logprobs

    tok = tiny_tokenizer()
    logits = np.zeros(len(tok))
    logits[7], logits[8] = 500.0, 499.0  # an unbiased runner-up no bias of 100 can pass
    got = recover_logprobs(_FakeTopKAPI(logits, tok), "hello", tok, top_k=2)
    assert sorted(set(range(len(tok))) - set(got.unseen)) == [7, 8]
    assert got.coverage == pytest.approx(2 / len(tok)) and np.isnan(got.logprobs).sum() > 0
    with pytest.raises(ValueError, match="top_k must be >= 2"):
        recover_logprobs(_FakeTopKAPI(logits, tok), "hello", tok, top_k=1)


def test_recovery_through_the_real_server_matches_the_model():
    """The course's API (logit_bias as OpenAI's) gives the attack what it needs: the full
    vector to within 1e-3 mean absolute error (issue 17's target), in V / (k - 1) queries."""
    import numpy as np
    import torch
    from _tiny_chat import assert_no_live_servers, tiny_model, tiny_tokenizer

    from utils.extraction import as_messages, prompt_ids, recover_logprobs
    from utils.serve import ServerConfig, start_server

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    ids = torch.tensor([prompt_ids(as_messages("hello"), tok)])
    with torch.no_grad():
        truth = torch.log_softmax(model(ids).logits[0, -1].float(), -1).numpy()
    with start_server(model, tok, ServerConfig(api_keys={"sk-a": None})) as server:
        got = recover_logprobs(server.client("sk-a"), "hello", tok, top_k=20)
    assert got.coverage == 1.0 and got.queries == 1 + -(-(len(tok) - 20) // 19)
    assert np.abs(got.logprobs - truth).mean() < 1e-3
    assert_no_live_servers()
