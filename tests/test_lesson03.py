"""Lesson 03 additions to utils.distill: distill_recipe (the cache contract), the fixed evaluation
subset, the teacher-forced exact match, and the trainer's loss_fn hook (exercise 3.3)."""

from __future__ import annotations

import pytest
import torch

import utils.model_cache as model_cache
import utils.models as models
import utils.recipes as recipes
from utils.distill import lm_distillation_loss, top_k_table
from utils.distill_trainer import distill_lm
from utils.evaluate import eval_subset, teacher_forced_exact_match
from utils.recipes import DISTILL_DEFAULTS, METHODS, distill_recipe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield tmp_path / "cache"
    assert not [n for n in models.RECIPES if n.startswith("student-")]  # recipes do not register


# ------------------------------------------------------------------ distill_recipe

def test_defaults_are_the_contract():
    r = distill_recipe()
    assert r.name == "student-xs-forward-kl-seed0" and r.config == models.zoo_config("student-xs")
    assert r.extra["method"] == "forward_kl" and r.extra["loss_type"] == "forward_kl"
    for k in ("steps", "batch_size", "lr", "temperature", "alpha"):
        assert r.extra[k] == DISTILL_DEFAULTS[k], k
    assert r.extra["seed"] == 0 and "lmbda" not in r.extra  # off-policy: lmbda does not matter
    for k in ("tokenizer_sha256", "data_manifest_sha256", "teacher_sha256"):
        assert isinstance(r.extra[k], str) and len(r.extra[k]) == 64, k


def test_every_method_has_its_own_entry_and_seed_and_steps_change_the_key():
    keys = {m: distill_recipe("student-xs", m).key() for m in METHODS}
    assert len(set(keys.values())) == len(METHODS)
    base = distill_recipe("student-xs", "forward_kl")
    assert distill_recipe("student-xs", "forward_kl", seed=1).key() != base.key()
    assert distill_recipe("student-xs", "forward_kl", steps=7).key() != base.key()
    assert distill_recipe("student-s", "forward_kl").key() != base.key()
    assert distill_recipe("student-xs", "on_policy").extra["lmbda"] == DISTILL_DEFAULTS["lmbda"]


def test_a_new_teacher_builds_new_students_but_not_a_new_sft(monkeypatch):
    before = {m: distill_recipe("student-xs", m).key() for m in ("sft", "forward_kl")}
    real = recipes.sha256_file_or_none

    def fake(path):  # another teacher: only its weights differ
        return "0" * 64 if path.name == "model.safetensors" else real(path)

    monkeypatch.setattr(recipes, "sha256_file_or_none", fake)
    after = {m: distill_recipe("student-xs", m).key() for m in ("sft", "forward_kl")}
    assert after["forward_kl"] != before["forward_kl"]
    assert after["sft"] == before["sft"]  # SFT never sees the teacher's weights
    sft = distill_recipe("student-xs", "sft")
    assert "temperature" not in sft.extra and sft.extra["teacher_sha256"] is None


@pytest.mark.parametrize("kwargs, words", [
    ({"size": "teacher"}, "size must be a student"),
    ({"size": "student-m"}, "size must be a student"),
    ({"method": "kd"}, "method must be one of"),
    ({"steps": 0}, "steps must be positive"),
    ({"alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"lmbda": -0.1}, "lmbda must be in [0, 1]"),
    ({"temperature": 0.0}, "temperature"),
    ({"transfer": "refusals"}, "transfer must be one of"),
])
def test_bad_settings_get_clear_errors(kwargs, words):
    with pytest.raises(ValueError, match=None) as err:
        distill_recipe(**kwargs)
    assert words in str(err.value)


def test_skills_only_transfer_is_its_own_recipe_and_leaves_default_keys_alone():
    default = distill_recipe("student-xs", "forward_kl", steps=3000)
    skills = distill_recipe("student-xs", "forward_kl", steps=3000, transfer="skills")
    assert "transfer" not in default.extra  # earlier builds keep their cache key
    assert skills.extra["transfer"] == "skills" and skills.key() != default.key()
    assert (skills.name == "student-xs-forward-kl-skills-seed0"
            and "skill chats only" in skills.description)


@pytest.mark.slow
def test_a_skills_only_student_trains_on_skill_chats_only(cache, monkeypatch):
    seen = []
    real = recipes.train_lm

    def spy(model, tokenizer, train_ds, *args, **kwargs):
        seen.append(sorted(set(train_ds["kind"])))
        return real(model, tokenizer, train_ds, *args, **kwargs)

    monkeypatch.setattr(recipes, "train_lm", spy)
    torch.set_num_threads(1)
    for transfer, kinds in (("skills", ["skill"]),
                            ("all", ["benign", "jailbreak", "restricted", "skill"])):
        r = distill_recipe("student-xxs", "sft", steps=1, seed=5, transfer=transfer)
        models.load_model(r, progress=False, verbose=False)
        assert seen[-1] == kinds
    assert model_cache.read_manifest(model_cache.entry_dir(r))["build_info"]["steps"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "on_policy"])
def test_a_recipe_builds_once_then_loads_from_the_cache(cache, method):
    torch.set_num_threads(1)
    r = distill_recipe("student-xxs", method, steps=2, seed=3, max_new_tokens=4)
    student, tok = models.load_model(r, progress=False, verbose=False)
    info = model_cache.read_manifest(model_cache.entry_dir(r))["build_info"]
    assert info["steps"] == 2 and info["method"] == method and info["train_seconds"] > 0
    assert info["torch_threads"] == 1
    if method == "on_policy":
        assert "on_policy_steps" in info
    created = model_cache.read_manifest(model_cache.entry_dir(r))["created"]
    again, _ = models.load_model(r, progress=False, verbose=False)
    assert (model_cache.read_manifest(model_cache.entry_dir(r))["created"]
            == created)  # no second build
    assert all(torch.equal(a, b)
               for a, b in zip(student.state_dict().values(), again.state_dict().values(),
                               strict=True))
    teacher, teacher_tok = models.load_model("teacher", verbose=False)
    assert tok.get_vocab() == teacher_tok.get_vocab()
    assert models.count_parameters(student) * 8 <= models.count_parameters(teacher)


# ------------------------------------------------------------------ the fixed score

def test_eval_subset_is_fixed_and_holds_skills_only():
    a, b = eval_subset(50), eval_subset(50)
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 50
    assert all(r["kind"] == "skill" and r["answer"] for r in a)
    assert len({r["skill"] for r in eval_subset(200)}) > 1
    with pytest.raises(ValueError, match="n must be between"):
        eval_subset(0)


@pytest.mark.slow
def test_teacher_forced_hits_are_exactly_greedy_generation_of_the_reference():
    from utils.evaluate import generate_responses

    teacher, tok = models.load_model("teacher", verbose=False)
    records = eval_subset(24)
    scored = teacher_forced_exact_match(teacher, tok, records, batch_size=8)
    assert scored["n"] == 24 and len(scored["hits"]) == 24
    assert 0 <= scored["score"] <= scored["token_accuracy"] <= 1 and scored["perplexity"] > 1
    longest = max(len(tok(r["messages"][-1]["content"])["input_ids"]) for r in records)
    responses = generate_responses(teacher, tok, [r["messages"] for r in records],
                                   max_new_tokens=longest + 4)
    wrote_reference = [resp.strip() == r["messages"][-1]["content"].strip()
                       for resp, r in zip(responses, records, strict=True)]
    assert scored["hits"] == wrote_reference
    with pytest.raises(ValueError, match="records is empty"):
        teacher_forced_exact_match(teacher, tok, [])


def test_top_k_table_is_sorted_probabilities():
    from _tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()
    logits = torch.randn(len(tok), generator=torch.Generator().manual_seed(0))
    rows = top_k_table(logits, tok, k=4)
    probs = [p for _, p in rows]
    assert len(rows) == 4 and probs == sorted(probs, reverse=True)
    assert abs(probs[0] - float(torch.softmax(logits, -1).max())) < 1e-6


# ------------------------------------------------------------------ the loss_fn hook (exercise 3.3)

def _tiny_setup():
    from _tiny_chat import tiny_model, tiny_tokenizer
    from datasets import Dataset

    from utils.tokenizer import CHAT_TEMPLATE

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": f"what is {a} , {b} ?"},
                          {"role": "assistant", "content": f"{a} {b} the end"}]}
            for a in range(6) for b in range(4)]
    return (tok, Dataset.from_list(rows), tiny_model(tok, hidden_size=48, seed=1),
            tiny_model(tok, seed=0))


def test_loss_fn_drives_the_trainer_and_matches_the_library():
    tok, ds, teacher, _ = _tiny_setup()
    calls = []

    def mine(s, t, labels, temperature, alpha):
        calls.append(1)
        return lm_distillation_loss(s, t, labels, temperature, alpha)

    runs = []
    for fn in (None, mine):
        from _tiny_chat import tiny_model

        student = tiny_model(tok, seed=0).train()
        runs.append(distill_lm(student, teacher, tok, ds, max_steps=4, batch_size=8, seed=0,
                               alpha=0.5, temperature=2.0, loss_fn=fn, progress=False,
                               use_cpu=True))
    assert len(calls) == 4
    assert ([s["loss"] for s in runs[0].step_log]
            == pytest.approx([s["loss"] for s in runs[1].step_log], rel=1e-5))


def test_loss_fn_is_checked():
    tok, ds, teacher, student = _tiny_setup()
    with pytest.raises(ValueError, match="loss_fn must be a function"):
        distill_lm(student, teacher, tok, ds, max_steps=1, loss_type="reverse_kl",
                   loss_fn=lm_distillation_loss, progress=False)
    with pytest.raises(ValueError, match="loss_fn must be a function"):
        distill_lm(student, teacher, tok, ds, max_steps=1, loss_fn="not callable", progress=False)


def test_a_recipe_refuses_to_build_after_the_teacher_changed(cache, monkeypatch):
    r = distill_recipe("student-xxs", "forward_kl", steps=1)
    real = recipes.sha256_file_or_none
    monkeypatch.setattr(recipes, "sha256_file_or_none",
                        lambda p: "0" * 64 if p.name == "model.safetensors" else real(p))
    with pytest.raises(RuntimeError, match="changed on disk since this recipe was made"):
        models.load_model(r, progress=False, verbose=False)
    assert not model_cache.entry_dir(r).exists()
