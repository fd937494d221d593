"""utils.models: config round trip, anatomy, zoo sizes and the on-disk model cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from utils import models, recipes
from utils.model_cache import (
    cached_entries,
    entry_dir,
    read_manifest,
    verify_folder,
    write_manifest,
)
from utils.models import (
    ModelConfig,
    ModelNotFoundError,
    build_model,
    count_parameters,
    estimate_parameters,
    lm_head_is_tied,
    load_model,
    parameters_by_part,
    recorded_responses,
    register_recipe,
    student_config,
    zoo_config,
    zoo_table,
)

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["hello world", "what is 2+3? Answer: 5", "the cat sat on the mat", "reverse abc: cba"]


def make_tokenizer():
    """A tiny byte-level BPE trained in a blink (tests must not need data/)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<end>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<end>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def tiny_config(tokenizer, **kw) -> ModelConfig:
    base = dict(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh cache per test, via the documented environment variable."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DD_CACHE_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield root
    models.RECIPES.clear()


class CountingBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, config, progress=None):
        self.calls += 1
        if progress is not None:
            progress.reset(total=3)
            progress.update(3)
        return build_model(config, seed=0), self.tokenizer, {"calls": self.calls}


def logits_of(model, tokenizer):
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
def test_estimate_and_parts_match_the_built_model(tokenizer, arch, tie):
    cfg = tiny_config(tokenizer, hidden_size=48, num_heads=6, num_kv_heads=2, architecture=arch,
                      tie_word_embeddings=tie)
    model = build_model(cfg, seed=0)
    n = count_parameters(model)
    assert estimate_parameters(cfg) == n
    parts = parameters_by_part(model)
    assert set(parts) == {"embeddings", "attention", "mlp", "norms", "lm_head"}
    assert sum(parts.values()) == n
    assert lm_head_is_tied(model) is tie
    assert (parts["lm_head"] == 0) is tie
    assert parts["embeddings"] == len(tokenizer) * 48
    assert parts["norms"] == (2 * 2 + 1) * 48  # two RMSNorms per layer and a final one


def test_config_round_trips_through_the_transformers_config(tokenizer):
    cfg = tiny_config(tokenizer, architecture="qwen2", num_kv_heads=1, tie_word_embeddings=False)
    back = ModelConfig.from_hf_config(cfg.hf_config())
    assert back.architecture == "qwen2" and back.num_kv_heads == 1
    assert estimate_parameters(back) == estimate_parameters(cfg)
    assert back.eos_token_id == cfg.eos_token_id


@pytest.mark.parametrize("ratio", [4, 10, 16])
def test_students_are_about_ratio_times_smaller(ratio):
    teacher = ModelConfig(vocab_size=768, hidden_size=256, num_layers=6, num_heads=8)
    student = student_config(teacher, ratio)
    got = estimate_parameters(teacher) / estimate_parameters(student)
    assert ratio / 1.06 <= got <= ratio * 1.06, got
    assert student.num_layers >= 2
    assert student.vocab_size == teacher.vocab_size  # students share the teacher's tokenizer
    build_model(student)  # a valid shape


def test_zoo_ratios_against_the_shipped_teacher():
    if not (models.teacher_dir() / "config.json").is_file():
        pytest.skip("the shipped teacher is not built yet (make teacher)")
    rows = {r["name"]: r for r in zoo_table()}
    assert rows["teacher"]["times_smaller"] == 1
    for name in ("student-s", "student-xs", "student-xxs"):
        target = models.ZOO[name].target_ratio
        assert target / 1.15 <= rows[name]["times_smaller"] <= target * 1.15, rows[name]
    assert rows["student-s"]["parameters"] > rows["student-xs"]["parameters"] \
        > rows["student-xxs"]["parameters"]


def test_zoo_rejects_unknown_names():
    with pytest.raises(KeyError, match="zoo has"):
        zoo_config("student-huge")


# ---------------------------------------------------------------------------- cache


def test_cache_hit_builds_once_and_writes_a_manifest(cache, tokenizer):
    builder = CountingBuilder(tokenizer)
    register_recipe("tiny", tiny_config(tokenizer), builder, version="1")
    m1, t1 = load_model("tiny", progress=False)
    m2, t2 = load_model("tiny", progress=False)
    assert builder.calls == 1
    torch.testing.assert_close(logits_of(m1, t1), logits_of(m2, t2), rtol=0, atol=0)
    [entry] = cached_entries()
    assert entry.parent == cache / "models"
    manifest = read_manifest(entry)
    assert manifest["build_info"] == {"calls": 1}
    assert manifest["parameters"] == count_parameters(m1)
    files = manifest["files"]
    assert "model.safetensors" in files and len(files["model.safetensors"]["sha256"]) == 64
    assert not list(entry.glob("*.bin"))
    assert verify_folder(entry) is None
    # nothing but the entry and hidden lock files is visible in the cache
    assert [p.name for p in (cache / "models").iterdir() if not p.name.startswith(".")] == \
        [entry.name]


def test_the_key_changes_with_config_and_version(cache, tokenizer):
    builder = CountingBuilder(tokenizer)
    r1 = register_recipe("tiny", tiny_config(tokenizer), builder, version="1")
    r2 = register_recipe("tiny", tiny_config(tokenizer), builder, version="2")
    r3 = register_recipe("tiny", tiny_config(tokenizer, hidden_size=64), builder, version="2")
    assert len({r1.key(), r2.key(), r3.key()}) == 3
    load_model("tiny", builder=r1, progress=False)
    load_model("tiny", builder=r2, progress=False)
    load_model("tiny", builder=r2, progress=False)
    assert builder.calls == 2


def test_a_truncated_safetensors_file_is_detected_and_rebuilt(cache, tokenizer, capsys):
    builder = CountingBuilder(tokenizer)
    recipe = register_recipe("tiny", tiny_config(tokenizer), builder)
    model, tok = load_model("tiny", progress=False)
    expected = logits_of(model, tok)
    weights = entry_dir(recipe) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt" in verify_folder(entry_dir(recipe))
    capsys.readouterr()
    model, tok = load_model("tiny", progress=False)
    out = capsys.readouterr().out
    assert "corrupt" in out and "model.safetensors" in out and "rebuilding" in out
    assert builder.calls == 2
    assert verify_folder(entry_dir(recipe)) is None
    torch.testing.assert_close(logits_of(model, tok), expected, rtol=0, atol=0)


def test_a_flipped_byte_is_caught_by_the_sha256(cache, tokenizer):
    recipe = register_recipe("tiny", tiny_config(tokenizer), CountingBuilder(tokenizer))
    load_model("tiny", progress=False)
    weights = entry_dir(recipe) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in verify_folder(entry_dir(recipe))


def test_an_entry_without_manifest_is_incomplete_and_rebuilt(cache, tokenizer, capsys):
    builder = CountingBuilder(tokenizer)
    recipe = register_recipe("tiny", tiny_config(tokenizer), builder)
    load_model("tiny", progress=False)
    (entry_dir(recipe) / "manifest.json").unlink()
    assert "incomplete" in verify_folder(entry_dir(recipe))
    load_model("tiny", progress=False)
    assert "incomplete" in capsys.readouterr().out
    assert builder.calls == 2 and verify_folder(entry_dir(recipe)) is None


def test_a_failing_builder_leaves_nothing_behind(cache, tokenizer):
    def broken(config):
        raise RuntimeError("boom in the middle of training")

    register_recipe("tiny", tiny_config(tokenizer), broken)
    with pytest.raises(RuntimeError, match="boom"):
        load_model("tiny", progress=False)
    assert cached_entries() == []
    leftovers = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_a_killed_build_leaves_no_entry_and_is_cleaned_up_later(cache, tokenizer):
    """SIGKILL a build mid-way in a subprocess: no entry; the next build removes its temp dir."""
    marker = cache.parent / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from utils.models import ModelConfig, load_model, register_recipe

        def slow(config):
            Path({str(marker)!r}).write_text("x")
            time.sleep(120)

        cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2)
        register_recipe("tiny", cfg, slow)
        load_model("tiny", progress=False)
    """)
    env = dict(os.environ, DD_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the subprocess never started building"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cached_entries() == []
    root = cache / "models"
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert visible == []
    stale = [p for p in root.iterdir() if p.is_dir()]
    assert stale and all(p.name.startswith(".building-") for p in stale)  # hidden, not an entry

    # A later build of the same name succeeds and sweeps the dead build's temp folder.
    builder = CountingBuilder(tokenizer)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    register_recipe("tiny", cfg, builder)
    load_model("tiny", progress=False)
    assert builder.calls == 1 and len(cached_entries()) == 1
    assert not [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_the_environment_variable_relocates_the_cache(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "elsewhere"))
    try:
        recipe = register_recipe("tiny", tiny_config(tokenizer), CountingBuilder(tokenizer))
        load_model("tiny", progress=False)
        assert entry_dir(recipe).is_relative_to(tmp_path / "elsewhere")
        assert (entry_dir(recipe) / "manifest.json").is_file()
    finally:
        models.RECIPES.clear()


def test_builder_keyword_with_a_bare_function(cache, tokenizer):
    builder = CountingBuilder(tokenizer)
    cfg = tiny_config(tokenizer)
    load_model("adhoc", builder=builder, config=cfg, version="3", progress=False)
    load_model("adhoc", builder=builder, config=cfg, version="3", progress=False)
    assert builder.calls == 1
    assert read_manifest(cached_entries()[0])["version"] == "3"
    with pytest.raises(ValueError, match="needs config"):
        load_model("adhoc2", builder=builder, progress=False)


def test_a_builder_must_return_model_and_tokenizer(cache, tokenizer):
    register_recipe("tiny", tiny_config(tokenizer), lambda config: build_model(config))
    with pytest.raises(TypeError, match=r"\(model, tokenizer\)"):
        load_model("tiny", progress=False)
    assert cached_entries() == []


# ---------------------------------------------------------------------------- folders and hub


def test_a_local_folder_round_trips(tmp_path, tokenizer):
    model = build_model(tiny_config(tokenizer), seed=1)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    torch.testing.assert_close(logits_of(loaded, tok), logits_of(model.eval(), tokenizer))
    assert not loaded.training


def test_a_missing_path_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(tmp_path / "no-such-model"))
    msg = str(err.value)
    assert "not a zoo name" in msg and "teacher" in msg and "not a local folder" in msg
    assert "Fix:" in msg


def test_a_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("someone/some-model")
    msg = str(err.value)
    assert "offline mode forbids the hub" in msg and "HF_HUB_OFFLINE" in msg and "Fix:" in msg
    assert err.value.__cause__ is None  # no traceback from deep inside transformers


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path / "notes")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_model(tmp_path / "notes.txt")


def test_recorded_responses_read_every_row_or_name_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no recorded responses") as err:
        recorded_responses(tmp_path)
    assert "make teacher" in str(err.value)
    rows = [{"id": "test-00001", "correct": True}, {"id": "test-00002", "correct": False}]
    (tmp_path / "test_responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert recorded_responses(tmp_path) == rows


def test_pickled_weights_are_refused(tmp_path, tokenizer):
    folder = tmp_path / "pickled"
    build_model(tiny_config(tokenizer)).config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="safetensors only"):
        load_model(folder)


def test_a_zoo_size_without_recipe_says_how_to_register_one(cache):
    with pytest.raises(ModelNotFoundError, match="register_recipe"):
        load_model("student-xxs")


def test_a_missing_teacher_says_make_teacher(tmp_path, monkeypatch):
    monkeypatch.delenv("DD_TEACHER_DIR", raising=False)
    monkeypatch.setattr(models, "data_dir", lambda: tmp_path)
    assert models.teacher_dir() == tmp_path / "models" / "teacher"
    with pytest.raises(ModelNotFoundError, match="make teacher"):
        load_model("teacher")
    with pytest.raises(ModelNotFoundError, match="make teacher"):
        zoo_config("student-xs")


def test_the_teacher_folder_can_be_relocated(tmp_path, monkeypatch, tokenizer):
    cfg = tiny_config(tokenizer, num_layers=3)
    build_model(cfg).save_pretrained(tmp_path / "t")
    tokenizer.save_pretrained(tmp_path / "t")
    write_manifest(tmp_path / "t", {"name": "teacher"})  # as make teacher writes it
    monkeypatch.setenv("DD_TEACHER_DIR", str(tmp_path / "t"))
    assert zoo_config("teacher").num_layers == 3
    model, _ = load_model("teacher")
    assert count_parameters(model) == estimate_parameters(cfg)


def test_the_shipped_teacher_loads_when_present():
    if not (models.teacher_dir() / "config.json").is_file():
        pytest.skip("the shipped teacher is not built yet (make teacher)")
    model, tok = load_model("teacher")
    assert count_parameters(model) == estimate_parameters(zoo_config("teacher"))
    assert model.config.vocab_size >= len(tok)
    card = json.loads((models.teacher_dir() / "model_card.json").read_text())
    assert card


def test_recipe_names_are_checked():
    with pytest.raises(ValueError, match="shipped"):
        register_recipe("teacher", "student-xs", lambda c: None)
    with pytest.raises(ValueError, match="letters"):
        register_recipe("bad name/..", "student-xs", lambda c: None)


@pytest.mark.slow
def test_the_scratch_recipe_trains_caches_and_keys_on_its_budget(tmp_path, monkeypatch, cache):
    """The real recipe end to end (2 steps): built once, loaded after, a new budget rebuilds."""
    teacher = tmp_path / "teacher"
    cfg = ModelConfig(vocab_size=768, hidden_size=64, num_layers=2, num_heads=2,
                      max_position_embeddings=256)
    build_model(cfg).config.save_pretrained(teacher)
    monkeypatch.setenv("DD_TEACHER_DIR", str(teacher))
    recipe = recipes.scratch_recipe("student-xxs", steps=2, batch_size=4)
    assert recipes.scratch_recipe("student-xxs", steps=3, batch_size=4).key() != recipe.key()
    recipe = recipes.scratch_recipe("student-xxs", steps=2, batch_size=4)
    model, tok = load_model(recipe, progress=False)
    manifest = read_manifest(entry_dir(recipe))
    assert manifest["build_info"]["steps"] == 2 and manifest["extra"]["steps"] == 2
    assert manifest["extra"]["tokenizer_sha256"] and manifest["extra"]["data_manifest_sha256"]
    assert count_parameters(model) == estimate_parameters(zoo_config("student-xxs"))
    assert tok.chat_template  # the chat template survives the cache round trip
    with pytest.raises(ValueError, match="student of the zoo"):
        recipes.scratch_recipe("teacher")


def test_a_build_shows_a_progress_bar_and_says_where_it_cached(cache, tokenizer, capsys):
    seen = {}

    def build(config, progress):
        seen["bar"] = progress
        progress.reset(total=2)
        progress.update(2)
        return build_model(config), tokenizer

    register_recipe("tiny", tiny_config(tokenizer), build)
    load_model("tiny", progress=True)
    captured = capsys.readouterr()
    assert seen["bar"].n == 2 and seen["bar"].total == 2
    assert "building tiny" in captured.err  # tqdm writes to stderr outside notebooks
    assert "Built 'tiny'" in captured.out and str(cache) in captured.out
