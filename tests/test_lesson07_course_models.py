"""Lesson 07's model list (utils.course_models): loaders, skips, the ONNX wrapper, grid rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests._tiny_chat import tiny_model, tiny_tokenizer
from utils.course_models import (
    MIXES,
    ModelUnavailable,
    OnnxChatModel,
    course_models,
    evaluate_course_model,
    public_row,
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


def test_course_models_lists_every_model_in_grid_order():
    models = course_models()
    assert list(models) == ["teacher", "whitebox-student", "sft-student", "blackbox-student",
                            "extracted-text-skills", "extracted-topk-skills",
                            "extracted-topk-safety", "extracted-topk-safety-filtered",
                            "teacher-int8", "teacher-4bit-g32", "teacher-onnx",
                            "whitebox-student-onnx", "student-skills-only"]
    assert {m.kind for m in models.values()} == {"teacher", "white-box", "data only", "black-box",
                                                  "extracted", "quantized", "deployed",
                                                  "skills only"}


@pytest.mark.parametrize("grid_name", ["whitebox-student", "sft-student", "student-skills-only",
                                       "whitebox-student-onnx", "extracted-topk-skills",
                                       "extracted-topk-safety"])
def test_shipped_students_load_or_say_how_to_build_them(grid_name, tmp_path, monkeypatch):
    import utils.models

    model, tok = course_models()[grid_name].load()  # shipped in data/models/students/
    if grid_name.endswith("-onnx"):  # the deployed export writes what the PyTorch student writes
        torch_model, _ = course_models()["whitebox-student"].load()
        prompts = ["What is 17 + 25?", "How do I kill a Python process?", "Reverse the word 'tal'."]
        assert (generate_responses(model, tok, prompts, max_new_tokens=24, strip=True)
                == generate_responses(torch_model, tok, prompts, max_new_tokens=24, strip=True))
    else:
        assert model.config.vocab_size == len(tok)
    monkeypatch.setattr(utils.models, "students_dir", lambda: tmp_path / "no-students")
    with pytest.raises(ModelUnavailable, match="make students"):
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
