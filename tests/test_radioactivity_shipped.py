"""Radioactivity on fresh prompts and the shipped watermarked extracted student (issue 17).

The test must run on prompts the suspect never saw (its training texts would test memory, not
radioactivity), must fail for a control that never saw watermarked text, and the shipped
``student-xs-extracted-text-skills-watermarked`` must agree with its card, its recipe, its
control and the committed ``results/04_radioactivity.json``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from _tiny_chat import tiny_model
from transformers import WatermarkingConfig

from utils.watermark import binomial_p_value, radioactivity_on_fresh_prompts, watermark_z

ROOT = Path(__file__).resolve().parents[1]
RADIO = ROOT / "results" / "04_radioactivity.json"
NAME = "student-xs-extracted-text-skills-watermarked"
CONTROL = "student-xs-extracted-text-skills"

TRAINING = ["what is the capital of france?", "how many legs does a spider have?",
            "name a primary colour."]
HELD_OUT = [f"question {i}: {w}" for i, w in enumerate(
    ["why is the sky blue?", "the teacher answers", "a small student learns",
     "distillation through an api", "watermarks hide a green list", "hello",
     "what is 2 + 3?", "tell me a short story", "the end", "red, blue and yellow"])]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=3)


def test_the_test_refuses_training_prompts(model, tok):
    wm = WatermarkingConfig(bias=4.0)
    with pytest.raises(ValueError, match="1 of 2 prompts are training prompts"):
        radioactivity_on_fresh_prompts(model, tok, [HELD_OUT[0], TRAINING[1]], wm,
                                       training_prompts=TRAINING)
    with pytest.raises(TypeError, match="list of str"):
        radioactivity_on_fresh_prompts(model, tok, "one prompt", wm, training_prompts=[])
    with pytest.raises(ValueError, match="no prompts"):
        radioactivity_on_fresh_prompts(model, tok, [], wm, training_prompts=[])


def test_held_out_detection_fails_for_the_control_and_not_for_a_marked_writer(model, tok):
    """Hand-made suspects on held-out prompts: the control (the same model, never near the
    watermark) must not be detected; a suspect that writes exactly like the watermarked
    teacher (the ideal student: ``generation_config.watermarking_config`` set) must be."""
    import copy

    wm = WatermarkingConfig(bias=4.0)
    marked = copy.deepcopy(model)
    marked.generation_config.watermarking_config = wm
    found = {}
    for label, suspect in (("control", model), ("marked", marked)):
        found[label] = radioactivity_on_fresh_prompts(
            suspect, tok, HELD_OUT, wm, training_prompts=TRAINING, samples=3,
            max_new_tokens=40)
    control, radioactive = found["control"].scores, found["marked"].scores
    assert set(control) == {"greedy", "sampled", "greedy+sampled"}
    assert control["greedy+sampled"].p_value > 0.01, control["greedy+sampled"]
    assert radioactive["greedy+sampled"].p_value < 1e-6, radioactive["greedy+sampled"]
    assert len(found["control"].greedy) == len(HELD_OUT)
    assert len(found["control"].sampled) == 3 * len(HELD_OUT)
    # each tuple counts once: the pooled test has at most the sum of the modes' tuples
    s = control
    assert s["greedy+sampled"].num_scored <= s["greedy"].num_scored + s["sampled"].num_scored


# ------------------------------------------------------------------ the shipped student


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("experiments_04_radioactivity")


@pytest.fixture(scope="module")
def shipped():
    from utils.models import recorded_responses, shipped_students, student_card

    if NAME not in shipped_students():
        pytest.skip(f"{NAME} is not shipped yet: python scripts/experiments_04_radioactivity.py "
                    "--part shipped")
    return student_card(NAME), recorded_responses(NAME)


@pytest.fixture(scope="module")
def committed():
    from _committed import load_committed

    d = load_committed(RADIO, "run `python scripts/experiments_04_radioactivity.py`")
    if "shipped_watermarked" not in d:
        pytest.skip("results/04_radioactivity.json has no shipped_watermarked yet")
    return d["shipped_watermarked"]


def test_shipped_watermarked_student_is_verified_safetensors_of_this_teacher(shipped):
    from utils.io import sha256_file
    from utils.model_cache import verify_folder
    from utils.models import students_dir, teacher_dir

    card, _ = shipped
    folder = students_dir() / NAME
    assert verify_folder(folder) is None  # every file against its sha256 manifest
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "safetensors only"
    assert card["recipe_function"] == "blackbox_recipe"
    assert card["teacher_sha256"] == sha256_file(teacher_dir() / "model.safetensors")
    assert card["tokenizer_sha256"] == sha256_file(teacher_dir() / "tokenizer.json")
    assert card["times_smaller"] >= 8  # at most 1/8 of the teacher (issue 17)
    assert card["provenance"]["quick"] is False
    assert "experiments_04_radioactivity.py" in card["provenance"]["command"]


def test_shipped_watermarked_student_is_its_controls_recipe_plus_the_watermark(shipped,
                                                                               monkeypatch):
    from utils.models import student_card

    card, _ = shipped
    script = _script(monkeypatch)
    delta = card["api_watermark"]["bias"]  # the card says which watermark it was trained on
    assert card["api_watermark"]["greenlist_ratio"] == 0.25 and "watermarked" in card[
        "description"]
    assert "api_watermark" not in student_card(CONTROL)  # the control's API had none
    assert card["cache_key"] == script.watermarked_recipe(delta, card["steps"], None).key()
    control = student_card(CONTROL)
    assert control["cache_key"] == script.watermarked_recipe(
        delta, card["steps"], None, watermark=False).key()
    same = {"steps", "seed", "transfer", "granularity", "top_k", "max_tokens", "batch_size",
            "lr", "queries", "queries_answered"}
    assert {k: card["settings"].get(k) for k in same} == {
        k: control["settings"].get(k) for k in same}


def test_shipped_watermarked_card_numbers_follow_from_recorded_responses(shipped):
    from utils.data import read_split
    from utils.evaluate import exact_match_from_rows

    card, rows = shipped
    assert [r["id"] for r in rows] == [r["id"] for r in read_split("test")]
    assert exact_match_from_rows(rows) == card["metrics"]["exact_match"]
    assert card["exact_match_retained"] == pytest.approx(
        card["metrics"]["exact_match"]["overall"] / card["teacher"]["exact_match"]["overall"])


def test_committed_shipped_radioactivity(committed, shipped):
    from utils.data import read_split
    from utils.extraction import mix_prompts
    from utils.models import student_card

    w = committed
    card, _ = shipped
    assert w["name"] == NAME and w["control"] == CONTROL and not w["quick"]
    assert w["cache_key"] == card["cache_key"]
    assert w["control_is_the_same_recipe_without_the_watermark"] is True
    for label, name in (("watermarked", NAME), ("control", CONTROL)):
        row = w["students"][label]
        assert row["name"] == name
        assert row["exact_match_test"] == student_card(name)["metrics"]["exact_match"]["overall"]
        for score in [*row["scores"].values(), row["stored_subset"]]:
            assert score["p_value"] == pytest.approx(
                binomial_p_value(score["green"], score["scored_tuples"], 0.25), rel=1e-6)
            assert score["z"] == pytest.approx(
                watermark_z(score["green"], score["scored_tuples"], 0.25))
    mode = w["mode"]
    assert w["p_watermarked"] == w["students"]["watermarked"]["scores"][mode]["p_value"]
    assert w["p_control"] == w["students"]["control"]["scores"][mode]["p_value"]
    assert w["tuples_watermarked"] == w["students"]["watermarked"]["scores"][mode]["scored_tuples"]
    assert w["target_met"] == (w["p_watermarked"] < 1e-5 and w["p_control"] > 0.01)
    assert w["exact_match_cost"] == pytest.approx(
        w["control_exact_match_test"] - w["exact_match_test"])
    # fresh prompts: none of them is a prompt the student (or its teacher) trained on
    fresh = [r["messages"][0]["content"] for r in read_split("validation")
             if r["kind"] == "skill"]
    assert w["fresh_prompts"] == len(fresh) and w["fresh_prompts_in_training"] == 0
    assert not set(fresh) & set(mix_prompts("skills", "train"))
    check = w["harvest"]["api_check"]  # the batched harvest is what the API answers alone
    assert check["batched_vs_unbatched_identical_share"] >= 0.95
    assert w["harvest"]["queries"] == card["settings"]["queries_answered"]


def test_the_shipped_student_rewrites_its_stored_answers_and_their_score(committed, shipped):
    """What lesson 04 runs live, in seconds: the shipped model by name, greedy answers to the
    stored fresh prompts, the same ids and the same detection as the committed file."""
    import torch

    from utils.extraction import watermark_config
    from utils.models import load_model
    from utils.watermark import chat_generations, radioactivity_of_generations

    d = json.loads(RADIO.read_text())
    prompts = d["stored"]["prompts"]
    row = committed["students"]["watermarked"]
    torch.set_num_threads(1)
    model, tok = load_model(NAME, verbose=False)
    gens = chat_generations(model, tok, prompts, temperature=0.0)
    same = sum(list(g.ids) == s for g, s in zip(gens, row["stored_greedy_ids"], strict=True))
    assert same >= 0.95 * len(prompts), f"{same} of {len(prompts)} answers reproduced"
    live = radioactivity_of_generations(gens, model.config.vocab_size,
                                        watermark_config(committed["delta"]))
    stored = row["stored_subset"]
    if same == len(prompts):
        assert (live.num_scored, live.num_green) == (stored["scored_tuples"], stored["green"])
    assert live.p_value == pytest.approx(stored["p_value"], rel=0.5, abs=1e-12)


@pytest.mark.slow
def test_shipped_watermarked_weights_reproduce_recorded_test_responses(shipped):
    """Drift: the weights still write the test responses the card was scored from."""
    import torch

    from utils.data import read_split
    from utils.evaluate import generate_responses
    from utils.models import load_model

    _, rows = shipped
    torch.set_num_threads(1)
    model, tok = load_model(NAME, verbose=False)
    test = read_split("test")[::16]
    got = generate_responses(model, tok, [r["messages"] for r in test], batch_size=64,
                             max_new_tokens=96)
    mismatched = [(r["id"], r["response"], g) for r, g in zip(rows[::16], got, strict=True)
                  if r["response"] != g]
    assert len(mismatched) <= 0.01 * len(test), f"weights and card disagree: {mismatched[:3]}"


def test_the_committed_harvest_went_through_the_api():
    """Issue 17: the attacker's harvest is the real API's answers (watermark on the server),
    and the batched API answers what it answers one request at a time, sampling included."""
    from _committed import load_committed

    d = load_committed(RADIO, "run `python scripts/experiments_04_radioactivity.py`")
    h = d["harvest"]
    if "api_cost" not in h:
        pytest.skip("results/04_radioactivity.json predates the API harvest: rerun the script")
    assert "API" in h["mode"]
    for label in ("watermarked", "clean"):
        cost = h["api_cost"][label]
        assert len(cost) == d["settings"]["repeats"]
        assert all(c["queries"] == d["settings"]["distinct_prompts"] for c in cost)
        assert all(1 <= c["largest_batch"] <= c["concurrency"] for c in cost)
        assert h["api_check"][f"{label}_identical_share"] >= 0.95  # whatever the temperature
    assert h["api_check"]["greedy_watermarked_api_vs_generate_identical_share"] >= 0.95
    assert h["api_requests_per_second"] > 0
