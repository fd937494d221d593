"""Loading refuses bad files (issue 21): every failure is the course's error with a fix.

- a shipped model (teacher or student) whose bytes differ from its sha256 manifest;
- a local folder of another architecture (``model_type: bert``) that would load with random
  weights;
- weights that do not fit the config (missing or mis-shaped tensors);
- a truncated or garbage ``model.safetensors``.
"""

from __future__ import annotations

import json
import shutil

import pytest
from _tiny_chat import tiny_model, tiny_tokenizer

from utils import models
from utils.model_cache import verify_folder, write_manifest
from utils.models import CorruptModelError, ModelNotFoundError, load_model


@pytest.fixture()
def tiny_folder(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def shipped_teacher(tmp_path, monkeypatch, tiny_folder):
    """A relocated 'shipped' teacher with its manifest, as make teacher writes it."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_folder, teacher)
    write_manifest(teacher, {"name": "teacher"})
    monkeypatch.setenv("DD_TEACHER_DIR", str(teacher))
    return teacher


def _overwrite(path, offset: int, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    n = min(n, len(data) - offset)
    data[offset:offset + n] = b"\xff" * n
    path.write_bytes(bytes(data))


def test_a_verified_teacher_loads(shipped_teacher):
    model, tok = load_model("teacher", verbose=False)
    assert model.config.model_type == "llama" and len(tok) > 0


def test_overwritten_teacher_weights_are_refused_with_the_fix(shipped_teacher):
    weights = shipped_teacher / "model.safetensors"
    _overwrite(weights, offset=weights.stat().st_size // 2)  # same size, other bytes
    with pytest.raises(CorruptModelError) as err:
        load_model("teacher", verbose=False)
    msg = str(err.value)
    assert "sha256" in msg and "git checkout --" in msg and "make teacher" in msg


def test_a_teacher_without_its_manifest_is_refused(shipped_teacher):
    (shipped_teacher / "manifest.json").unlink()
    with pytest.raises(CorruptModelError, match="no manifest.json"):
        load_model("teacher", verbose=False)


def test_overwritten_shipped_student_is_refused(tmp_path, monkeypatch, tiny_folder):
    students = tmp_path / "models" / "students"
    shutil.copytree(tiny_folder, students / "student-x")
    write_manifest(students / "student-x", {"name": "student-x"})
    monkeypatch.setattr(models, "data_dir", lambda: tmp_path)
    load_model("student-x", verbose=False)  # intact: loads
    _overwrite(students / "student-x" / "model.safetensors", offset=2048)
    with pytest.raises(CorruptModelError) as err:
        load_model("student-x", verbose=False)
    assert "make students" in str(err.value) and "git checkout --" in str(err.value)


def test_the_real_shipped_models_match_their_manifests():
    folders = [models.teacher_dir()] + [models.students_dir() / n
                                        for n in models.shipped_students()]
    folders = [f for f in folders if (f / "config.json").is_file()]
    if not folders:
        pytest.skip("no shipped models in data/models/")
    for folder in folders:
        assert verify_folder(folder) is None, folder


def test_a_foreign_architecture_is_refused_unless_asked(tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertLMHeadModel"])
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError) as err:
        load_model(tiny_folder, verbose=False)
    msg = str(err.value)
    assert "'bert'" in msg and "llama, qwen2" in msg and "any_architecture=True" in msg
    # asked for explicitly, it still refuses weights that do not fit: never a random model
    with pytest.raises((CorruptModelError, ModelNotFoundError)):
        load_model(tiny_folder, verbose=False, any_architecture=True)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["num_hidden_layers"] += 1  # a layer the weights file does not hold
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError) as err:
        load_model(tiny_folder, verbose=False)
    assert "missing" in str(err.value) and "save_pretrained" in str(err.value)


def test_mis_shaped_weights_are_refused(tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match="do not fit"):
        load_model(tiny_folder, verbose=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_safetensors_file_is_the_course_error(tiny_folder, damage):
    weights = tiny_folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    else:
        weights.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(CorruptModelError) as err:
        load_model(tiny_folder, verbose=False)
    assert "could not be loaded" in str(err.value) and "Fix:" in str(err.value)


def test_a_config_that_is_not_json_is_the_course_error(tiny_folder):
    (tiny_folder / "config.json").write_text("{ not json")
    with pytest.raises(CorruptModelError, match="not valid JSON"):
        load_model(tiny_folder, verbose=False)


def test_make_teacher_writes_the_manifest_load_model_verifies(tmp_path):
    """scripts/build_teacher.py's writer: the shipped teacher arrives with its sha256 manifest."""
    import importlib.util

    from utils.paths import repo_root

    spec = importlib.util.spec_from_file_location(
        "build_teacher", repo_root() / "scripts" / "build_teacher.py")
    build_teacher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_teacher)
    tok = tiny_tokenizer()
    card = models.teacher_card()  # the shipped card's shape; the weights are a tiny model
    out = tmp_path / "teacher"
    build_teacher._write_atomically(out, tiny_model(tok), tok, card, rows=[])
    assert verify_folder(out) is None
    assert {"model.safetensors", "config.json"} <= set(
        json.loads((out / "manifest.json").read_text())["files"])
