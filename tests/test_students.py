"""The shipped trained students (``make students``) and their cards cannot drift apart.

Each folder of ``data/models/students/`` holds a student of lesson 03 trained on a budget too
long for a notebook, with a model card and every test-split response it gave. These tests check
the weights against their manifest, that the student still belongs to the shipped teacher,
tokenizer and data (else it must be rebuilt), that the card's numbers follow from the recorded
responses, and that the weights still write those responses and reach the card's grid score.
"""

from __future__ import annotations

import math

import pytest

from utils.io import sha256_file
from utils.model_cache import verify_folder
from utils.models import (
    ModelNotFoundError,
    load_model,
    recorded_responses,
    shipped_students,
    student_card,
    students_dir,
    teacher_dir,
)
from utils.paths import data_dir

EXPECTED = ("student-xs-forward-kl", "student-xs-sft")  # what `make students` ships
STRIDE = 16


def test_the_expected_students_are_shipped():
    missing = [n for n in EXPECTED if n not in shipped_students()]
    assert not missing, f"missing shipped students {missing}: run `make students`"


@pytest.fixture(scope="module", params=EXPECTED)
def shipped(request):
    name = request.param
    folder = students_dir() / name
    rows = recorded_responses(name)
    return name, folder, student_card(name), rows


def test_weights_match_their_manifest_and_are_safetensors(shipped):
    _, folder, _, _ = shipped
    assert verify_folder(folder) is None
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "safetensors only"


def test_the_student_belongs_to_the_shipped_teacher_tokenizer_and_data(shipped):
    name, _, card, _ = shipped
    fix = f"the teacher, tokenizer or data changed since {name} was built: run `make students`"
    assert card["tokenizer_sha256"] == sha256_file(teacher_dir() / "tokenizer.json"), fix
    assert card["data_manifest_sha256"] == sha256_file(data_dir() / "world" / "manifest.json"), fix
    if card["method"] == "sft":
        assert card["teacher_sha256"] is None  # trained on the data alone
    else:
        assert card["teacher_sha256"] == sha256_file(teacher_dir() / "model.safetensors"), fix
    assert (card["provenance"]["quick"] is False
            and "experiments_03.py" in card["provenance"]["command"])


def test_card_numbers_follow_from_recorded_responses(shipped):
    from utils.data import extract_answer, is_refusal, read_split
    from utils.evaluate import exact_match_from_rows, refusal_rates_from_rows

    _, _, card, rows = shipped
    assert [r["id"] for r in rows] == [r["id"] for r in read_split("test")]
    for r in rows:  # re-score each stored response with today's scoring code
        assert r["refused"] == is_refusal(r["response"])
        assert r["correct"] == (r["answer"] is not None
                                and extract_answer(r["response"]) == r["answer"])
    assert exact_match_from_rows(rows) == card["metrics"]["exact_match"]
    for key, value in refusal_rates_from_rows(rows).items():
        stored = card["metrics"]["safety"][key]
        assert stored == value or (isinstance(value, float) and math.isnan(value)
                                   and stored is None), key
    assert card["exact_match_retained"] == pytest.approx(
        card["metrics"]["exact_match"]["overall"] / card["teacher"]["exact_match"]["overall"])


@pytest.mark.slow
def test_shipped_weights_reproduce_recorded_responses_and_grid_score(shipped):
    import torch

    from utils.data import read_split
    from utils.evaluate import eval_subset, generate_responses, teacher_forced_exact_match

    name, _, card, rows = shipped
    torch.set_num_threads(1)
    model, tok = load_model(name, verbose=False)
    test = read_split("test")[::STRIDE]
    got = generate_responses(model, tok, [r["messages"] for r in test], batch_size=64,
                             max_new_tokens=96)
    mismatched = [(r["id"], r["response"], g) for r, g in zip(rows[::STRIDE], got, strict=True)
                  if r["response"] != g]
    assert len(mismatched) <= 0.01 * len(test), f"weights and card disagree: {mismatched[:3]}"
    subset = eval_subset(card["grid"]["n_eval"])
    score = teacher_forced_exact_match(model, tok, subset)["score"]
    assert abs(score - card["grid"]["score"]) <= 1 / len(subset)  # a near-tie may flip one answer


def test_an_unknown_student_name_lists_the_shipped_ones():
    with pytest.raises(ModelNotFoundError, match="student-xs-forward-kl"):
        student_card("student-xs-nothing")


def test_local_folder_names_the_folder_a_model_loads_from(tmp_path):
    from utils.models import local_folder

    assert local_folder("teacher") == teacher_dir()
    assert local_folder("student-xs-sft") == students_dir() / "student-xs-sft"
    assert local_folder(tmp_path) == tmp_path


def test_publish_entry_copies_atomically_and_hashes_what_it_is_told(tmp_path, monkeypatch):
    from utils.model_cache import read_manifest, write_manifest
    from utils.students import publish_entry

    src = tmp_path / "entry"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    write_manifest(src, {"name": "x"})
    dest = tmp_path / "shipped" / "x"
    # the entry's own manifest: it covers the weights, the card beside it is not hashed
    publish_entry(src, dest, {"model_card.json": "{}\n"})
    assert set(read_manifest(dest)["files"]) == {"model.safetensors"}
    assert verify_folder(dest) is None and (dest / "model_card.json").read_text() == "{}\n"
    assert all(oct(f.stat().st_mode)[-3:] == "644" for f in dest.iterdir())
    # a new manifest: the card is hashed too, so editing it is caught
    publish_entry(src, dest, {"model_card.json": "{}\n"}, manifest={"name": "y"})
    assert read_manifest(dest)["name"] == "y"
    assert set(read_manifest(dest)["files"]) == {"model.safetensors", "model_card.json"}
    (dest / "model_card.json").write_text("{\"edited\": 1}\n")
    assert verify_folder(dest) is not None
    # a failure half-way leaves the previous folder whole and no temporary folder behind
    before = sorted(p.name for p in dest.iterdir())
    import utils.model_cache

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(utils.model_cache, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        publish_entry(src, dest, {"model_card.json": "{}\n"}, manifest={"name": "z"})
    assert sorted(p.name for p in dest.iterdir()) == before
    assert [p.name for p in dest.parent.iterdir()] == ["x"]
