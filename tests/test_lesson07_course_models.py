"""Lesson 07's model list (utils.course_models): loaders, skips, the ONNX wrapper, grid rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests._tiny_chat import tiny_model, tiny_tokenizer
from utils.course_models import (
    EXTRA_SEEDS,
    EXTRACTED,
    GRID_PAIRS,
    MIXES,
    SHIPPED,
    ModelUnavailable,
    OnnxChatModel,
    course_models,
    evaluate_course_model,
    extracted_seed_recipe,
    heldout_cluster_interval,
    holm_adjust,
    paired_verdict_tests,
    public_row,
    seed_name,
    transfer_set,
)
from utils.evaluate import generate_responses
from utils.models import teacher_dir
from utils.safety import CourseKeywordJudge

needs_teacher = pytest.mark.skipif(not (teacher_dir() / "config.json").is_file(),
                                   reason="the shipped teacher is missing (make teacher)")


def _rec(i: int, kind: str, harmful: bool, split: str | None = None) -> dict:
    return {"id": f"r{i}", "kind": kind, "skill": "facts" if kind == "skill" else None,
            "category": "harm" if harmful else "history", "template": "t1" if split else None,
            "template_split": split, "should_refuse": harmful, "answer": None,
            "messages": [{"role": "user", "content": f"the teacher answers {i}"},
                         {"role": "assistant", "content": "ok"}]}


RECORDS = [_rec(0, "restricted", True), _rec(1, "benign", False),
           _rec(2, "jailbreak", True, "heldout"), _rec(3, "jailbreak", False, "seen"),
           _rec(4, "skill", False), _rec(5, "jailbreak", True, "seen")]


def test_transfer_set_keeps_refusal_data_only_in_the_safety_mix():
    skills = transfer_set(RECORDS, "skills")
    safety = transfer_set(RECORDS, "safety")
    assert {r["kind"] for r in skills} == {"skill"}
    assert {r["kind"] for r in safety} == {"skill", "restricted", "benign", "jailbreak"}
    assert len(safety) == len(RECORDS)
    assert MIXES == ("skills", "safety")
    with pytest.raises(ValueError, match="mix must be one of"):
        transfer_set(RECORDS, "everything")


SHIPPED_ORDER = ["teacher", "whitebox-student", "sft-student", "blackbox-student",
                 "extracted-text-skills", "extracted-topk-skills", "extracted-topk-safety",
                 "extracted-topk-safety-filtered", "extracted-text-skills-watermarked",
                 "teacher-int8", "teacher-4bit-g32",
                 "teacher-3bit-g32", "teacher-2bit-g32", "whitebox-student-int8",
                 "whitebox-student-4bit-g32", "teacher-onnx", "whitebox-student-onnx",
                 "whitebox-student-onnx-int8", "student-skills-only"]


def test_course_models_lists_every_model_in_grid_order():
    models = course_models(seeds=False)
    assert list(models) == SHIPPED_ORDER
    assert {m.kind for m in models.values()} == {"teacher", "white-box", "data only", "black-box",
                                                  "extracted", "quantized", "quantized student",
                                                  "deployed", "skills only"}
    with_seeds = course_models()
    assert list(with_seeds)[:len(SHIPPED_ORDER)] == SHIPPED_ORDER  # seed rows come last
    assert list(with_seeds)[len(SHIPPED_ORDER):] == [seed_name(g, s) for g in EXTRACTED
                                                     for s in EXTRA_SEEDS]
    named = {n for pair in GRID_PAIRS for n in pair[:2]}
    assert named <= set(with_seeds), named - set(with_seeds)


def test_every_shipped_student_is_a_course_model():
    """Issue 18: every folder of data/models/students/ is a row of lesson 07's grid (a student
    shipped without a grid row, like the watermarked copy of issue 17 once was, fails here)."""
    from utils.models import shipped_students

    assert set(shipped_students()) == {name for name, _ in SHIPPED.values()}
    models = course_models(seeds=False)
    assert set(SHIPPED) <= set(models)
    assert SHIPPED["extracted-text-skills-watermarked"][0] == (
        "student-xs-extracted-text-skills-watermarked")
    assert models["extracted-text-skills-watermarked"].lesson == "lesson 04"
    pairs = {(a, b) for a, b, _ in GRID_PAIRS}  # compared with the teacher and its control
    assert {("teacher", "extracted-text-skills-watermarked"),
            ("extracted-text-skills", "extracted-text-skills-watermarked")} <= pairs


def test_every_extracted_variant_of_lesson_04_is_shipped_and_listed():
    import json

    from utils.paths import repo_root

    shipped = json.loads((repo_root() / "results" / "04_extracted_students.json")
                         .read_text(encoding="utf-8"))["shipped"]
    assert set(shipped.values()) == {SHIPPED[g][0] for g in EXTRACTED}


@pytest.mark.parametrize("grid_name", EXTRACTED)
def test_extracted_seed_recipes_are_the_shipped_recipe_with_another_seed(grid_name):
    from utils.models import student_card

    card = student_card(SHIPPED[grid_name][0])
    assert extracted_seed_recipe(grid_name, card["seed"]).key() == card["cache_key"]
    other = extracted_seed_recipe(grid_name, 1)
    assert other.key() != card["cache_key"] and other.extra["seed"] == 1
    with pytest.raises(ValueError, match="not an extracted student"):
        extracted_seed_recipe("teacher", 1)


def test_uncached_seed_rows_are_skipped_not_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailable, match="extract_students"):
        course_models()[seed_name("extracted-topk-safety", 1)].load()


@pytest.mark.parametrize("grid_name", ["whitebox-student", "sft-student", "student-skills-only",
                                       "whitebox-student-onnx", "whitebox-student-onnx-int8",
                                       "whitebox-student-4bit-g32", "extracted-topk-skills",
                                       "extracted-topk-safety",
                                       "extracted-text-skills-watermarked"])
def test_shipped_students_load_or_say_how_to_build_them(grid_name, tmp_path, monkeypatch):
    import utils.models

    model, tok = course_models()[grid_name].load()  # shipped in data/models/students/
    if "onnx" in grid_name:  # the deployed export writes what the PyTorch student writes
        torch_model, _ = course_models()["whitebox-student"].load()
        prompts = ["What is 17 + 25?", "How do I kill a Python process?", "Reverse the word 'tal'."]
        got = generate_responses(model, tok, prompts, max_new_tokens=24, strip=True)
        want = generate_responses(torch_model, tok, prompts, max_new_tokens=24, strip=True)
        if grid_name.endswith("-int8"):  # int8 may flip a token; the file must be the int8 one
            assert model.path.name.endswith("-int8.onnx")
            assert sum(g == w for g, w in zip(got, want, strict=True)) >= 2
        else:
            assert got == want
    else:
        assert model.config.vocab_size == len(tok)
    monkeypatch.setattr(utils.models, "students_dir", lambda: tmp_path / "no-students")
    with pytest.raises(ModelUnavailable, match="make (students|experiments)"):
        course_models()[grid_name].load()


@needs_teacher
def test_uncached_students_are_not_trained_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "empty-cache"))
    models = course_models()
    with pytest.raises(ModelUnavailable, match="not in the model cache.*lesson 04"):
        models["blackbox-student"].load()
    assert not (tmp_path / "empty-cache" / "models").exists() or not any(
        p for p in (tmp_path / "empty-cache" / "models").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny_chat():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights: replies that depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    return model, tok


PROMPTS = ["what is the capital of france?", "why is the sky blue?", "hello!",
           "name a primary colour and tell me why it is primary", "a"]


def test_onnx_wrapper_generates_what_the_torch_model_generates(tiny_chat, tmp_path):
    from utils.deploy import export_onnx

    model, tok = tiny_chat
    path = export_onnx(model, tmp_path / "tiny.onnx", with_cache=True)
    onnx_model = OnnxChatModel(path)
    expected = generate_responses(model, tok, PROMPTS, batch_size=2, max_new_tokens=6)
    got = generate_responses(onnx_model, tok, PROMPTS, batch_size=2, max_new_tokens=6)
    assert got == expected
    assert len(set(got)) > 1
    with pytest.raises(ValueError, match="greedily"):
        onnx_model.generate(torch.tensor([[1, 2]]), do_sample=True)


def test_evaluate_course_model_gives_a_json_row(tiny_chat):
    model, tok = tiny_chat
    refuse_all = lambda response: True  # noqa: E731 - a plain function is a judge too
    row = evaluate_course_model("tiny", model, tok, RECORDS, refuse_all, max_new_tokens=4)
    assert row["n_prompts"] == len(RECORDS)
    # the tiny model writes nothing of the world's restricted content: harmful rate 0 of 3
    assert row["harmful_rate"] == 0.0 and row["harmful_ci"][0] == 0.0 < row["harmful_ci"][1]
    assert row["_harmful"] == [False] * len(RECORDS) and row["_correct"] == []
    assert row["utility_ci"] == [None, None]
    assert row["refusal_rate"] == 1.0 and row["over_refusal_rate"] == 1.0  # refuses everything
    assert row["heldout_jailbreak_success_rate"] == 0.0 and row["n_heldout_jailbreak"] == 1
    assert row["refusal_ci"][0] < 1.0 == row["refusal_ci"][1]
    assert math.isnan(row["utility_score"])  # no skill records given
    assert row["_refusals"] == [True] * len(RECORDS) and len(row["_responses"]) == len(RECORDS)
    pub = public_row(row)
    assert not any(k.startswith("_") for k in pub) and pub["utility_score"] is None
    json.dumps(pub)  # JSON-able
    row2 = evaluate_course_model("tiny", model, tok, RECORDS, CourseKeywordJudge(),
                                 max_new_tokens=4)
    assert row2["_responses"] == row["_responses"]  # deterministic across runs


def test_onnx_int8_file_is_made_once_and_cached():
    from utils.course_models import onnx_model

    # the model cache's export (test_shipped_students_load... makes it if it is missing)
    model, _ = onnx_model("student-xs-forward-kl", int8=True)
    fp32 = model.path.with_name(model.path.name.replace("-int8.onnx", ".onnx"))
    assert model.path.name.endswith("-int8.onnx") and fp32.is_file()
    assert model.path.stat().st_size < fp32.stat().st_size / 2  # int8 weights
    mtime = model.path.stat().st_mtime_ns
    again, _ = onnx_model("student-xs-forward-kl", int8=True)
    assert again.path == model.path and model.path.stat().st_mtime_ns == mtime


def test_holm_adjust_known_values():
    # Holm (1979): sorted p (0.01, 0.02, 0.03, 0.04) times (4, 3, 2, 1), made monotone
    assert holm_adjust([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []


def _hand_records() -> list[dict]:
    recs = []
    for i in range(12):  # 8 harmful (4 held-out in two templates), 4 benign
        harmful = i < 8
        split = "heldout" if i < 4 else None
        recs.append(_rec(i, "jailbreak" if split else ("restricted" if harmful else "benign"),
                         harmful, split) | {"template": ("A" if i < 2 else "B") if split else None})
    return recs


def test_paired_verdict_tests_on_a_hand_made_grid():
    recs = _hand_records()
    grid = {"verdicts": {"x": "111111110000", "y": "000011110011"},
            "harm_verdicts": {"x": "0" * 12, "y": "1" * 12},
            "utility_verdicts": {"x": "1100", "y": "1111"}}
    tests = paired_verdict_tests(grid, recs, [("x", "y", "hand"), ("x", "missing", "skipped")])
    by = {t["metric"]: t for t in tests}
    assert set(by) == {"refusal", "over_refusal", "heldout_jailbreak_success", "harmful",
                       "utility"}
    r = by["refusal"]  # harmful prompts 0-7: x refuses all 8, y refuses 4-7
    assert (r["n"], r["b10"], r["b01"], r["rate_a"], r["rate_b"]) == (8, 4, 0, 1.0, 0.5)
    assert r["p_value"] == pytest.approx(0.125)  # 2 * 0.5^4
    o = by["over_refusal"]  # benign prompts 8-11: y refuses 10 and 11
    assert (o["n"], o["b10"], o["b01"]) == (4, 0, 2)
    h = by["heldout_jailbreak_success"]  # held-out 0-3: x refuses (no success), y answers
    assert (h["n"], h["rate_a"], h["rate_b"], h["b01"]) == (4, 0.0, 1.0, 4)
    assert by["harmful"]["b01"] == 8 and by["harmful"]["n"] == 8  # harmful prompts only
    assert by["utility"]["n"] == 4 and by["utility"]["b01"] == 2
    assert [t["holm_p_value"] for t in tests] == pytest.approx(
        holm_adjust([t["p_value"] for t in tests]))
    with pytest.raises(ValueError, match="unknown metric"):
        paired_verdict_tests(grid, recs, metrics=["accuracy"])
    with pytest.raises(ValueError, match="only '0' and '1'"):
        paired_verdict_tests({"verdicts": {"x": "1x" * 6, "y": "0" * 12}}, recs,
                             [("x", "y", "bad")], metrics=["refusal"])
    with pytest.raises(ValueError, match="same 12 prompts"):
        paired_verdict_tests({"verdicts": {"x": "1" * 11, "y": "0" * 12}}, recs,
                             [("x", "y", "short")], metrics=["refusal"])


def test_heldout_cluster_interval_on_a_hand_made_case():
    recs = _hand_records()
    # template A (prompts 0, 1) always answered, template B (2, 3) always refused: 50% success
    iv = heldout_cluster_interval("001111110000", recs, n_boot=400, seed=0)
    assert (iv["rate"], iv["n"], iv["n_templates"]) == (0.5, 4, 2)
    assert iv["per_template"] == {"A": 1.0, "B": 0.0}
    # resampling templates reaches both extremes (both A or both B); prompts alone cannot
    assert iv["cluster_bootstrap_ci"] == [0.0, 1.0]
    assert iv["wilson_ci"] == pytest.approx(list(wilson_interval_of(2, 4)))
    assert iv == heldout_cluster_interval([c == "1" for c in "001111110000"], recs,
                                          n_boot=400, seed=0)  # bools or a verdict string
    with pytest.raises(ValueError, match="12 records"):
        heldout_cluster_interval("0", recs)


def wilson_interval_of(k: int, n: int) -> tuple[float, float]:
    from utils.safety import wilson_interval

    return wilson_interval(k, n)
