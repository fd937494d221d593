"""The world's data: deterministic, split hygiene, committed files match the generator."""

from __future__ import annotations

import json
import re

import pytest

from utils import data
from utils.data import (
    BENIGN_HOWTO_CATEGORIES,
    FACT_FRAMES_SEEN,
    FACT_FRAMES_TEST,
    FACT_FRAMES_VALIDATION,
    HOWTO_FRAMES_HELDOUT,
    HOWTO_FRAMES_SEEN,
    JAILBREAKS_HELDOUT,
    JAILBREAKS_SEEN,
    JAILBREAKS_VALIDATION,
    REFUSALS,
    SKILL_COUNTS,
    SPLITS,
    STRING_LENGTHS,
    WORLD_VERSION,
    check_splits,
    extract_answer,
    generate_world,
    is_refusal,
    world_dir,
    world_files,
)

KEYS = {"id", "messages", "kind", "skill", "category", "template", "template_split", "answer",
        "should_refuse"}


@pytest.fixture(scope="module")
def world():
    return generate_world()


def prompts(records):
    return {r["messages"][0]["content"] for r in records}


def test_generation_is_deterministic():
    assert world_files() == world_files()


def test_schema(world):
    for split in SPLITS:
        for r in world[split]:
            assert set(r) == KEYS, r["id"]
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert r["kind"] in ("skill", "restricted", "benign", "jailbreak")
            assert r["skill"] in (*data.SKILLS, None)
            if r["kind"] == "skill":
                assert r["answer"] and r["skill"] and not r["should_refuse"]
            if r["should_refuse"]:
                assert r["kind"] in ("restricted", "jailbreak") and r["answer"] is None
                assert is_refusal(r["messages"][1]["content"])
            else:
                assert not is_refusal(r["messages"][1]["content"]), r
            if r["answer"] is not None:
                assert extract_answer(r["messages"][1]["content"]) == r["answer"], r
            assert (r["template"] is None) == (r["kind"] != "jailbreak")


def test_no_prompt_in_two_splits(world):
    check_splits(world)  # raises on a leak
    train, val, test = (prompts(world[s]) for s in SPLITS)
    assert not train & test and not train & val and not val & test


def test_check_splits_catches_a_leak(world):
    leaky = {s: list(world[s]) for s in SPLITS}
    leaky["test"] = leaky["test"] + [leaky["train"][0]]
    with pytest.raises(AssertionError, match="both train and test"):
        check_splits(leaky)


def test_heldout_templates_only_in_their_own_split(world):
    own = {"test": set(JAILBREAKS_HELDOUT), "validation": set(JAILBREAKS_VALIDATION)}
    assert not own["test"] & own["validation"] and not (own["test"] | own["validation"]) & set(
        JAILBREAKS_SEEN
    )
    for split in SPLITS:
        used = {r["template"] for r in world[split] if r["template"]}
        for other, names in own.items():
            if other != split:
                assert not used & names, (split, used & names)
        held = [r for r in world[split] if r["template_split"] == "heldout"]
        if split == "train":
            assert not held
            continue
        assert {r["template"] for r in held} == own[split]
        assert any(r["should_refuse"] for r in held) and any(not r["should_refuse"] for r in held)
        assert any(
            r["kind"] == "jailbreak" and r["skill"] for r in held
        )  # skill requests wrapped too


def test_check_splits_catches_a_test_template_in_validation(world):
    leaked = [r for r in world["test"] if r["template_split"] == "heldout"][:1]
    with pytest.raises(AssertionError, match="held-out templates appear in validation"):
        check_splits({"validation": list(world["validation"]) + leaked})


def test_wrapped_requests_are_not_all_refusals(world):
    wrapped = [r for r in world["train"] if r["kind"] == "jailbreak"]
    assert any(r["should_refuse"] for r in wrapped)
    assert any(r["skill"] for r in wrapped) and any(r["category"] and not r["should_refuse"]
                                                   and not r["skill"] for r in wrapped)


def test_skill_problems_do_not_cross_splits(world):
    """A test arithmetic/string/sorting/conversion problem is never trained on in any phrasing."""
    def key(r):  # the working in the response names the problem whatever the phrasing
        prompt = r["messages"][0]["content"]
        if r["skill"] == "sorting" and r["category"] in ("ascending", "descending"):
            # every order of the same digits has the same answer: the problem is the set
            return r["category"], frozenset(re.findall(r"\d+", prompt))
        if r["skill"] == "strings":
            # the spelled word (and position) is the problem: nth's working stops at letter k,
            # so its response does not name the whole word
            word = re.search(r"\b(?:[a-z] ){3,}[a-z]\b", prompt).group(0)
            return r["category"], word, tuple(re.findall(r"\d+", prompt))
        return r["messages"][1]["content"]
    for skill in ("arithmetic", "strings", "sorting", "conversion"):
        train = {key(r) for r in world["train"] if r["kind"] == "skill" and r["skill"] == skill}
        test = {key(r) for r in world["test"] if r["kind"] == "skill" and r["skill"] == skill}
        assert len(test) >= 150 and not train & test, skill


def test_facts_use_heldout_phrasings(world):
    test_facts = [r for r in world["test"] if r["skill"] == "facts" and r["kind"] == "skill"]
    train_facts = [r for r in world["train"] if r["skill"] == "facts" and r["kind"] == "skill"]
    assert {r["answer"] for r in test_facts} <= {r["answer"] for r in train_facts}
    assert set(FACT_FRAMES_SEEN).isdisjoint(FACT_FRAMES_TEST)
    starts = {f.split("{")[0] for f in FACT_FRAMES_TEST if not f.startswith("{")}
    assert all(any(r["messages"][0]["content"].startswith(s) for s in starts) for r in test_facts)


def test_every_sub_task_has_its_designed_count(world):
    """A skill's test score weighs its operations as SKILL_COUNTS says (not as a pool happens
    to be mixed): v2's test held 10 multiplications out of 200 arithmetic problems."""
    for skill, cats in SKILL_COUNTS.items():
        for cat, counts in cats.items():
            for split, n in zip(SPLITS, counts, strict=True):
                got = sum(r["kind"] == "skill" and r["skill"] == skill and r["category"] == cat
                          for r in world[split])
                assert got == n if n is not None else got > 0, (skill, cat, split, got)


def _letters(response: str) -> list[tuple[str, int]]:
    working = response.split(". Answer:")[0].split(": ", 1)[1]
    return [(t[0], int(t[1:])) for t in working.split()]


def test_string_answers_are_the_last_step_of_the_working(world):
    """Letters are tagged with their positions (``b1 o2 n3``); count answers the last position,
    nth stops at position k and answers that letter, reverse walks the positions back."""
    lengths = {}
    for r in world["train"] + world["test"]:
        if r["kind"] != "skill" or r["skill"] != "strings":
            continue
        prompt, response = (m["content"] for m in r["messages"])
        word = re.search(r"\b(?:[a-z] ){3,}[a-z]\b", prompt).group(0).replace(" ", "")
        tagged = _letters(response)
        assert [i for _, i in tagged] == list(range(1, len(tagged) + 1)), response
        assert "".join(ch for ch, _ in tagged) == word[:len(tagged)], (prompt, response)
        if r["category"] == "count":
            assert len(tagged) == len(word) and r["answer"] == str(len(word))
        elif r["category"] == "nth":
            k = int(re.search(r"\d+", prompt).group(0))
            assert len(tagged) == k and r["answer"] == word[k - 1]
        else:
            assert r["answer"] == " ".join(f"{ch}{i}" for ch, i in reversed(tagged))
            assert len(tagged) == len(word)
        lengths.setdefault(r["category"], []).append(len(word))
    for cat, ns in lengths.items():  # every word length about equally often
        share = {n: ns.count(n) / len(ns) for n in STRING_LENGTHS}
        assert all(0.15 <= v <= 0.25 for v in share.values()), (cat, share)


def _frame(prompt: str, frames: tuple[str, ...]) -> str | None:
    hits = [f for f in frames if f.split("{a}")[0].lower() in prompt.lower()]
    return hits[0] if len(hits) == 1 else None


def test_every_request_frame_carries_restricted_and_benign_alike(world):
    """The frame never tells which requests to refuse: in training every seen frame holds
    about as many benign look-alikes as restricted requests, and test asks both kinds in
    every held-out frame."""
    for split, frames, least in (
        ("train", HOWTO_FRAMES_SEEN, 60),
        ("test", HOWTO_FRAMES_HELDOUT, 20),
    ):
        counts = {f: [0, 0] for f in frames}
        for r in world[split]:
            if r["kind"] == "restricted" or (
                r["kind"] == "benign" and r["category"] in BENIGN_HOWTO_CATEGORIES
            ):
                frame = _frame(r["messages"][0]["content"], frames)
                assert frame is not None, r["messages"][0]["content"]
                counts[frame][r["kind"] == "benign"] += 1
        for frame, (n_restricted, n_benign) in counts.items():
            assert min(n_restricted, n_benign) >= least, (split, frame, n_restricted, n_benign)
            if split == "train":
                assert 2 / 3 <= n_benign / n_restricted <= 3 / 2, (frame, n_restricted, n_benign)


def test_heldout_phrasings_never_reach_training(world):
    """Held-out request frames and fact phrasings stay out of training (plain or wrapped), so
    test still measures a new phrasing; their styles are covered by other wordings."""
    train = [r["messages"][0]["content"].lower() for r in world["train"]]
    for frame in HOWTO_FRAMES_HELDOUT:
        start = frame.split("{a}")[0].lower()
        assert not any(start in p for p in train), frame
    for frame in FACT_FRAMES_TEST + FACT_FRAMES_VALIDATION:
        start = frame.split("{")[0].lower() or frame.split("}")[1].lower()
        assert not any(start in p for p in train), frame


def test_seen_templates_wrap_as_much_to_answer_as_to_refuse(world):
    for name in JAILBREAKS_SEEN:
        wrapped = [r for r in world["train"] if r["template"] == name]
        refuse = sum(r["should_refuse"] for r in wrapped)
        assert 0.8 <= (len(wrapped) - refuse) / refuse <= 1.25, (name, refuse, len(wrapped))


def test_refusals_are_varied_and_recognisable():
    assert len(REFUSALS) >= 8
    assert all(is_refusal(r) for r in REFUSALS)
    assert not is_refusal("To end a Python process, use kill. Answer: kill")


def test_extract_answer():
    assert extract_answer("47 + 38: ones ... Answer: 85") == "85"
    assert extract_answer("Answer: 7, 19, 42.") == "7, 19, 42"
    assert extract_answer("  Quelltown  ") == "Quelltown"
    assert extract_answer("Answer: 1. Answer: 2") == "2"
    assert extract_answer("") == ""


def test_committed_files_match_generator_and_manifest():
    if not (world_dir() / "manifest.json").exists():
        pytest.skip("data/world not generated yet: run python -m utils.data generate")
    assert data.check_world() == [], "run `python -m utils.data generate`"
    manifest = json.loads((world_dir() / "manifest.json").read_text())
    assert manifest["version"] == WORLD_VERSION
    import hashlib
    for name, info in manifest["files"].items():
        blob = (world_dir() / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == info["sha256"]
        assert blob.count(b"\n") == info["records"]


def test_check_names_the_differing_file(tmp_path):
    data.write_world(tmp_path)
    assert data.check_world(tmp_path) == []
    (tmp_path / "validation.jsonl").write_text("{}\n")
    assert data.check_world(tmp_path) == [str(tmp_path / "validation.jsonl")]


def test_load_world_returns_datasets():
    if not (world_dir() / "test.jsonl").exists():
        pytest.skip("data/world not generated yet")
    ds = data.load_world("test")
    assert len(ds) == len(data.read_split("test"))
    assert set(ds.column_names) == KEYS
    with pytest.raises(ValueError, match="unknown split"):
        data.load_world("dev")
