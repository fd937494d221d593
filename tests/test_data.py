"""The world's data: deterministic, split hygiene, committed files match the generator."""

from __future__ import annotations

import json
import re

import pytest

from utils import data
from utils.data import (
    FACT_FRAMES_SEEN,
    FACT_FRAMES_TEST,
    JAILBREAKS_HELDOUT,
    REFUSALS,
    SPLITS,
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


def test_heldout_templates_only_in_test(world):
    for split in ("train", "validation"):
        assert {r["template"] for r in world[split] if r["template"]} & set(JAILBREAKS_HELDOUT) == set()
    held = [r for r in world["test"] if r["template_split"] == "heldout"]
    assert {r["template"] for r in held} == set(JAILBREAKS_HELDOUT)
    assert any(r["should_refuse"] for r in held) and any(not r["should_refuse"] for r in held)


def test_wrapped_requests_are_not_all_refusals(world):
    wrapped = [r for r in world["train"] if r["kind"] == "jailbreak"]
    assert any(r["should_refuse"] for r in wrapped)
    assert any(r["skill"] for r in wrapped) and any(r["category"] and not r["should_refuse"]
                                                   and not r["skill"] for r in wrapped)


def test_skill_problems_do_not_cross_splits(world):
    """A test arithmetic/string/sorting/conversion problem is never trained on in any phrasing."""
    def key(r):  # the working in the response names the problem whatever the phrasing
        if r["skill"] == "sorting" and r["category"] in ("ascending", "descending"):
            # a sort answer is shared by every order of the same digits: the problem is the list
            return r["category"], tuple(re.findall(r"\d+", r["messages"][0]["content"]))
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
