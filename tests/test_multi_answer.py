"""Lesson 03's any-letter skill (:mod:`utils.multi_answer`): the generator, the true distribution,
the exact scores on hand-made distributions, the batched scorer against one-by-one, the recipes'
arguments, and the committed grid (schema, paired tests recomputed from its runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from utils.multi_answer import (
    FRAMES,
    SKILL,
    alphabet,
    chat_record,
    distribution_scores,
    gold_records,
    letter_token_ids,
    next_letter_probs,
    sampled_records,
    true_distribution,
    words,
)
from utils.stats import paired_test

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "results" / "03_multi_answer.json"

# a made-up id per letter: the scorer only needs letter -> column
IDS = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
V = 30  # 26 letters and 4 other tokens


def _probs(*rows: dict) -> torch.Tensor:
    out = torch.zeros(len(rows), V)
    for i, row in enumerate(rows):
        for tok, p in row.items():
            out[i, IDS[tok] if isinstance(tok, str) else tok] = p
    return out


# --- the generator -----------------------------------------------------------------------------

def test_words_are_deterministic_disjoint_and_world_letters() -> None:
    train, test = words("train"), words("test")
    assert (len(train), len(test)) == (4000, 300)
    assert words("train") == train and words("test") == test
    assert not set(train) & set(test)
    letters = set(alphabet())
    assert all(4 <= len(w) <= 8 and set(w) <= letters for w in train + test)
    with pytest.raises(ValueError, match="split must be one of"):
        words("validation")


def test_true_distribution_counts_positions() -> None:
    assert true_distribution("noon") == {"n": 0.5, "o": 0.5}
    d = true_distribution("abcab")
    assert d == {"a": 0.4, "b": 0.4, "c": 0.2}
    assert math.isclose(sum(d.values()), 1.0)
    for bad in ("", "Ab", "a b", "x1"):
        with pytest.raises(ValueError, match="lower-case letters"):
            true_distribution(bad)


def test_gold_records_one_right_answer_per_word_drawn_by_seed() -> None:
    ws = words("train")[:200]
    recs = gold_records(ws, seed=3)
    assert [r["word"] for r in recs] == ws
    assert all(r["answer"] in r["word"] and r["skill"] == SKILL for r in recs)
    assert all(r["messages"][1]["content"] == f"Answer: {r['answer']}" for r in recs)
    assert all(" ".join(r["word"]) in r["messages"][0]["content"] for r in recs)
    assert gold_records(ws, seed=3) == recs
    assert gold_records(ws, seed=4) != recs  # another seed, other labels
    # every phrasing is used, and the labels follow the positions (not the distinct letters)
    assert {r["messages"][0]["content"].split(" ")[0] for r in recs} == {f.split(" ")[0]
                                                                         for f in FRAMES}


def test_sampled_records_need_one_answer_per_word() -> None:
    recs = sampled_records(["abc", "de"], ["a", "e"], seed=0, source="teacher-greedy")
    assert [r["answer"] for r in recs] == ["a", "e"]
    assert {r["label_source"] for r in recs} == {"teacher-greedy"}
    with pytest.raises(ValueError, match="one per word"):
        sampled_records(["abc", "de"], ["a"], seed=0, source="x")
    assert chat_record("ab", "b", frame=1)["messages"][0]["content"] == FRAMES[1].format(w="a b")


# --- the scores --------------------------------------------------------------------------------

def test_scores_of_the_truth_a_mode_seeker_and_a_wrong_answer() -> None:
    truth = _probs({"a": 0.5, "b": 0.5})          # "abba" exactly
    mode = _probs({"a": 1.0})                       # always the same right letter
    wrong = _probs({"z": 1.0})                      # a letter not in the word
    other = _probs({27: 1.0})                       # a token that is no letter at all
    half = _probs({"a": 0.5, 27: 0.5})              # half right, half garbage
    s = distribution_scores(torch.cat([truth, mode, wrong, other, half]), ["abba"] * 5, IDS)
    rows = s["per_word"]
    assert [round(r["tv"], 6) for r in rows] == [0.0, 0.5, 1.0, 1.0, 0.5]
    assert [round(r["validity"], 6) for r in rows] == [1.0, 1.0, 0.0, 0.0, 0.5]
    assert [r["coverage"] for r in rows] == [1.0, 0.5, 0.0, 0.0, 0.5]
    assert math.isclose(rows[0]["entropy"], math.log(2), rel_tol=1e-6)
    assert rows[1]["entropy"] < 1e-6
    assert all(math.isclose(r["truth_entropy"], math.log(2)) for r in rows)
    assert math.isclose(s["tv"], 3.0 / 5) and s["n"] == 5


def test_scores_reject_misshaped_input() -> None:
    with pytest.raises(ValueError, match="n_words, vocab"):
        distribution_scores(torch.zeros(2, V), ["ab"], IDS)


def test_world_tokenizer_writes_every_letter_as_one_token() -> None:
    from utils.models import teacher_dir
    from utils.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir())
    ids = letter_token_ids(tok)
    assert set(ids) == set(alphabet()) and len(set(ids.values())) == len(ids)
    for c, i in ids.items():
        assert tok.convert_ids_to_tokens(i).lstrip("Ġ") == c


def test_the_scored_prompt_is_the_training_chat_up_to_the_letter() -> None:
    """Scoring reads the position training teaches: a chat in the scored phrasing, tokenised as
    training tokenises it (utils.train), is the scored prompt followed by the letter's token."""
    from utils.models import teacher_dir
    from utils.multi_answer import _prompt_ids
    from utils.tokenizer import load_tokenizer
    from utils.train import tokenize_chat

    tok = load_tokenizer(teacher_dir())
    ids = letter_token_ids(tok)
    ws = words("train") + words("test")
    records = [chat_record(w, w[-1], frame=0) for w in ws]
    enc = tokenize_chat({"messages": [r["messages"] for r in records]}, tok)
    for w, seq in zip(ws, enc["input_ids"], strict=True):
        prompt = _prompt_ids(tok, w)
        assert seq[:len(prompt)] == prompt and seq[len(prompt)] == ids[w[-1]], w


def test_batched_scorer_matches_one_prompt_at_a_time() -> None:
    from utils.models import load_model
    from utils.multi_answer import _prompt_ids

    model, tok = load_model("student-xs-sft", verbose=False, progress=False)
    ws = words("test")[:7]  # lengths differ: left padding must not change a row
    batched = next_letter_probs(model, tok, ws, batch_size=3)
    for i, w in enumerate(ws):
        with torch.no_grad():
            one = torch.softmax(model(torch.tensor([_prompt_ids(tok, w)])).logits[0, -1], -1)
        assert torch.allclose(batched[i], one, atol=1e-5)
    assert torch.allclose(batched.sum(-1), torch.ones(len(ws)), atol=1e-4)


def test_student_recipe_arguments() -> None:
    from utils.recipes import any_letter_student_recipe

    with pytest.raises(ValueError, match="method must be one of"):
        any_letter_student_recipe("gkd", n_words=8, steps=3, seed=0)
    with pytest.raises(ValueError, match="n_words must be in"):
        any_letter_student_recipe("sft", n_words=0, steps=3, seed=0)
    a = any_letter_student_recipe("sft", n_words=8, steps=3, seed=0)
    b = any_letter_student_recipe("forward_kl", n_words=8, steps=3, seed=0)
    assert a.key() != b.key() and a.extra["teacher_sha256"] is None
    assert any_letter_student_recipe("sft", n_words=8, steps=3, seed=1).key() != a.key()
    g = any_letter_student_recipe("on_policy", n_words=8, steps=3, seed=0)
    assert g.extra["lmbda"] > 0 and "lmbda" not in b.extra  # GKD's share is in its key only


# --- the committed grid --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid() -> dict:
    if not GRID.is_file():
        pytest.fail(f"{GRID} is missing: run `python scripts/experiments_03_multi_answer.py`")
    return json.loads(GRID.read_text(encoding="utf-8"))


def test_grid_schema_and_the_teachers_entropy(grid: dict) -> None:
    assert grid["skill"] == SKILL and not grid["provenance"]["quick"]
    assert len(grid["seeds"]) >= 5
    assert grid["eval"]["words"] == len(words("test"))
    # the point of the skill: the teacher's targets are far from one-hot
    assert grid["teacher_entropy_nats"]["overall"] >= 0.3
    for row in grid["regimes"]:
        assert set(row["seeds"]) == set(grid["seeds"])
        for k in ("tv", "validity", "coverage", "entropy"):
            assert math.isclose(row[f"{k}_mean"], sum(row[k]) / len(row[k]))
        assert 0.0 <= row["tv_mean"] <= 1.0


def test_grid_paired_tests_recomputed_from_its_runs(grid: dict) -> None:
    runs = grid["runs"]
    for row in grid["regimes"]:
        if row["method"] == "sft":
            assert row["vs_sft"] is None
            continue
        sft = {r["seed"]: r["tv"] for r in runs
               if (r["regime"], r["method"]) == (row["regime"], "sft")}
        mine = {r["seed"]: r["tv"] for r in runs
                if (r["regime"], r["method"]) == (row["regime"], row["method"])}
        seeds = sorted(set(sft) & set(mine))
        t = paired_test([sft[s] for s in seeds], [mine[s] for s in seeds])
        assert math.isclose(row["vs_sft"]["p_value"], t.p_value, rel_tol=1e-9)
        assert math.isclose(row["vs_sft"]["mean_diff"], t.mean_diff, rel_tol=1e-9)


@pytest.mark.parametrize("key,a,b", [("forward_vs_reverse", "forward_kl", "reverse_kl"),
                                     ("on_policy_vs_reverse", "on_policy", "reverse_kl")])
def test_grid_method_comparisons_recomputed_from_its_runs(grid: dict, key: str, a: str,
                                                          b: str) -> None:
    runs = {m: {r["seed"]: r for r in grid["runs"] if (r["regime"], r["method"]) == ("scarce", m)}
            for m in (a, b)}
    seeds = grid[key]["seeds"]
    assert seeds == sorted(set(runs[a]) & set(runs[b])) and len(seeds) >= 5
    for k in ("tv", "validity", "coverage", "entropy"):
        t = paired_test([runs[a][s][k] for s in seeds], [runs[b][s][k] for s in seeds])
        assert math.isclose(grid[key][k]["p_value"], t.p_value, rel_tol=1e-9), k
        assert math.isclose(grid[key][k]["mean_diff"], t.mean_diff, rel_tol=1e-9), k


def test_the_shipped_teacher_verifies_and_reproduces_its_card() -> None:
    from utils.recipes import (
        any_letter_teacher_dir,
        any_letter_teacher_recipe,
        load_any_letter_teacher,
    )

    card = json.loads((any_letter_teacher_dir() / "model_card.json").read_text(encoding="utf-8"))
    # the committed teacher is the current recipe's (a new shipped teacher would change the key)
    assert card["cache_key"] == any_letter_teacher_recipe().key()
    teacher, tok = load_any_letter_teacher()
    test = words("test")
    s = distribution_scores(next_letter_probs(teacher, tok, test), test, letter_token_ids(tok))
    for k in ("tv", "validity", "coverage", "entropy"):
        assert math.isclose(s[k], card["test"][k], abs_tol=1e-4), k
    assert s["tv"] < 0.25 and s["validity"] > 0.95  # it knows the skill and its distribution


def test_a_live_student_lands_inside_the_grids_seed_spread(grid: dict) -> None:
    from utils.models import load_model
    from utils.recipes import any_letter_student_recipe

    row = next(r for r in grid["regimes"] if (r["regime"], r["method"]) == ("scarce", "sft"))
    model, tok = load_model(any_letter_student_recipe(
        "sft", n_words=row["n_words"], steps=grid["steps"], seed=0), verbose=False,
        progress=False)
    test = words("test")
    tv = distribution_scores(next_letter_probs(model, tok, test), test, letter_token_ids(tok))["tv"]
    assert min(row["tv"]) - 0.02 <= tv <= max(row["tv"]) + 0.02
