"""Lesson 03's regimes: scarce labels (:func:`utils.data.scarce_labels`), the recipes that use
them, the teacher's committed answers, the entropy measurement, the committed regime grid (its
schema, its paired tests recomputed from its runs, the live point inside its seed spread) and
``scripts/experiments_03_regimes.py --quick`` end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _committed import load_committed

from utils.data import read_split, scarce_labels
from utils.evaluate import assistant_entropy
from utils.models import TEACHER_ANSWERS, CorruptModelError, ModelNotFoundError, teacher_answers
from utils.models import teacher_dir as shipped_teacher_dir
from utils.recipes import distill_recipe
from utils.stats import paired_test

ROOT = Path(__file__).resolve().parent.parent
REGIMES = ROOT / "results" / "03_regimes.json"
LESSON = ROOT / "results" / "03_white_box_distillation.json"


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "kind": "skill", "skill": "arithmetic", "answer": str(i),
             "messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"gold Answer: {i}"}]}
            for i in range(n)]


# --- scarce_labels ---------------------------------------------------------------------------

def test_scarce_labels_keeps_the_fraction_and_drops_the_rest_without_a_teacher():
    recs = _records(20)
    out = scarce_labels(recs, 0.25, seed=3)
    assert len(out) == 5 and all(r["label_source"] == "gold" for r in out)
    assert [r["id"] for r in out] == sorted((r["id"] for r in out), key=lambda s: int(s[1:]))
    assert {r["id"] for r in out} == {r["id"] for r in scarce_labels(recs, 0.25, seed=3)}
    assert {r["id"] for r in out} != {r["id"] for r in scarce_labels(recs, 0.25, seed=4)}
    assert len(scarce_labels(recs, 1.0)) == 20


def test_scarce_labels_fills_the_unlabelled_prompts_with_the_teachers_answers():
    recs = _records(10)
    fill = {r["id"]: f"teacher says Answer: {int(r['id'][1:]) + 100}" for r in recs}
    out = scarce_labels(recs, 0.2, seed=0, fill=fill)
    assert [r["id"] for r in out] == [r["id"] for r in recs]  # every prompt, order kept
    gold = [r for r in out if r["label_source"] == "gold"]
    teacher = [r for r in out if r["label_source"] == "teacher"]
    assert len(gold) == 2 and len(teacher) == 8
    for r in gold:
        assert r["messages"][-1]["content"].startswith("gold")
    for r in teacher:
        assert r["messages"][-1]["content"] == fill[r["id"]]
        assert r["messages"][0]["content"] == f"q{r['id'][1:]}"  # the prompt is untouched
        assert r["answer"] == str(int(r["id"][1:]) + 100)
    # labelled=0 with a teacher: the black-box attacker's position (prompts only)
    assert all(r["label_source"] == "teacher" for r in scarce_labels(recs, 0.0, fill=fill))
    assert recs[0]["messages"][-1]["content"] == "gold Answer: 0"  # the input is not mutated


@pytest.mark.parametrize("labelled", [-0.1, 1.5])
def test_scarce_labels_rejects_a_fraction_outside_0_1(labelled):
    with pytest.raises(ValueError, match="fraction"):
        scarce_labels(_records(4), labelled)


def test_scarce_labels_refuses_nothing_to_train_on_and_a_foreign_answers_file():
    with pytest.raises(ValueError, match="fill="):
        scarce_labels(_records(4), 0.0)
    with pytest.raises(KeyError, match="make teacher-answers"):
        scarce_labels(_records(4), 0.25, fill={"other": "x"})


# --- recipes ---------------------------------------------------------------------------------

def test_regime_recipes_validate_their_arguments_and_get_their_own_keys():
    with pytest.raises(ValueError, match="labelled < 1"):
        distill_recipe("student-xs", "seq_kd")
    with pytest.raises(ValueError, match="transfer='skills'"):
        distill_recipe("student-xs", "sft", labelled=0.2)
    with pytest.raises(ValueError, match="no data"):
        distill_recipe("student-xs", "sft", transfer="skills", labelled=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        distill_recipe("student-xs", "sft", transfer="skills", labelled=1.2)
    keys = {distill_recipe("student-xs", m, transfer="skills", labelled=f).key()
            for m in ("sft", "seq_kd", "forward_kl") for f in (0.05, 0.2)}
    keys.add(distill_recipe("student-xs", "sft", transfer="skills").key())
    assert len(keys) == 7
    seq = distill_recipe("student-xs", "seq_kd", transfer="skills", labelled=0.05)
    assert seq.extra["labelled"] == 0.05 and seq.extra["teacher_answers_sha256"]
    assert "labelled" not in distill_recipe("student-xs", "sft").extra  # old keys unchanged
    assert "teacher_answers_sha256" not in distill_recipe(
        "student-xs", "sft", transfer="skills", labelled=0.05).extra  # SFT reads no teacher


def test_a_warm_started_recipe_names_its_start_in_its_key_and_starts_from_its_weights(tmp_path,
                                                                                     monkeypatch):
    from utils.model_cache import entry_dir
    from utils.models import load_model

    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path))
    sft = distill_recipe("student-xxs", "sft", steps=2, batch_size=4, transfer="skills",
                         labelled=0.05)
    warm = distill_recipe("student-xxs", "forward_kl", steps=1, batch_size=4, lr=1e-9,
                          transfer="skills", labelled=0.05, init=sft)
    cold = distill_recipe("student-xxs", "forward_kl", steps=1, batch_size=4, lr=1e-9,
                          transfer="skills", labelled=0.05)
    assert warm.key() != cold.key() and warm.extra["init"] == f"{sft.name}-{sft.key()}"
    assert "init" not in cold.extra and "from-sft" in warm.name
    with pytest.raises(ValueError, match="student-xs student"):
        distill_recipe("student-xs", "forward_kl", init=sft)
    start, _ = load_model(sft, verbose=False, progress=False)
    after, _ = load_model(warm, verbose=False, progress=False)  # one step at lr 1e-9
    assert entry_dir(sft).is_dir() and entry_dir(warm).is_dir()
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), f"{name} did not start from the SFT student"


# --- the teacher's committed answers ---------------------------------------------------------

def test_the_teachers_answers_cover_every_training_skill_prompt():
    answers = teacher_answers()
    skills = [r for r in read_split("train") if r["kind"] == "skill"]
    assert set(answers) == {r["id"] for r in skills}
    gold = {r["id"]: r["messages"][-1]["content"] for r in skills}
    same = sum(answers[i] == gold[i] for i in answers) / len(answers)
    assert 0.8 < same < 1.0, f"{same:.3f} of the teacher's answers equal the gold ones"


def test_the_teachers_answers_are_its_greedy_generations():
    from utils.evaluate import generate_responses
    from utils.models import load_model

    answers = teacher_answers()
    skills = [r for r in read_split("train") if r["kind"] == "skill"][::997][:8]
    model, tok = load_model("teacher", verbose=False)
    out = generate_responses(model, tok, [r["messages"][:-1] for r in skills],
                             max_new_tokens=128)
    assert [o.strip() for o in out] == [answers[r["id"]].strip() for r in skills]


def test_teacher_answers_are_refused_when_missing_unreadable_or_from_another_teacher(tmp_path):
    with pytest.raises(ModelNotFoundError, match="make teacher-answers"):
        teacher_answers(tmp_path)
    (tmp_path / TEACHER_ANSWERS).write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptModelError, match="unreadable"):
        teacher_answers(tmp_path)
    shutil.copy(shipped_teacher_dir() / TEACHER_ANSWERS, tmp_path / TEACHER_ANSWERS)
    (tmp_path / "model.safetensors").write_bytes(b"another teacher")
    with pytest.raises(CorruptModelError, match="another teacher"):
        teacher_answers(tmp_path)


# --- entropy ---------------------------------------------------------------------------------

class _ConstantLM(torch.nn.Module):
    """Logits that are the same at every position: entropy known in closed form."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.row = logits
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, t, -1).clone())


def test_assistant_entropy_matches_closed_forms():
    from utils.models import load_model

    _, tok = load_model("teacher", verbose=False)
    recs = [r for r in read_split("test") if r["kind"] == "skill"][:6]
    v = len(tok)
    uniform = assistant_entropy(_ConstantLM(torch.zeros(v)), tok, recs)
    assert uniform["overall"] == pytest.approx(math.log(v), rel=1e-5)
    peaked = torch.full((v,), -1e4)
    peaked[0] = 0.0
    one_hot = assistant_entropy(_ConstantLM(peaked), tok, recs)["overall"]
    assert one_hot == pytest.approx(0, abs=1e-6)
    two = torch.full((v,), -1e4)
    two[:2] = 0.0
    res = assistant_entropy(_ConstantLM(two), tok, recs, batch_size=4)
    assert set(res) == {"overall", *(r["skill"] for r in recs)}
    assert all(x == pytest.approx(math.log(2), rel=1e-5) for x in res.values())
    with pytest.raises(ValueError, match="empty"):
        assistant_entropy(_ConstantLM(two), tok, [])


# --- the committed regime grid ---------------------------------------------------------------

def _grid() -> dict:
    return load_committed(REGIMES, "run `python scripts/experiments_03_regimes.py`")


def test_committed_regime_grid_has_provenance_schema_and_five_seeds():
    grid = _grid()
    prov = grid["provenance"]
    assert prov["quick"] is False and "experiments_03_regimes.py" in prov["command"]
    for key in ("machine", "cpu", "date", "git_commit", "torch", "wall_seconds"):
        assert prov.get(key) not in (None, ""), f"provenance lacks {key}"
    assert {"regimes", "runs", "teacher_entropy_nats", "kd_vs_sft_best_regime", "teacher",
            "budgets", "eval"} <= set(grid)
    assert grid["eval"]["n"] == len([r for r in read_split("test") if r["kind"] == "skill"])
    names = {(r["regime"], r["budget"], r["method"]) for r in grid["regimes"]}
    for need in [("scarce-5%", "long", m) for m in ("sft", "seq_kd", "forward_kl")] + [
            ("scarce-20%", "long", m) for m in ("sft", "seq_kd")] + [
            ("abundant", "long", m) for m in ("sft", "forward_kl")] + [
            ("scarce-5%", "sft+500", m) for m in ("sft", "forward_kl", "reverse_kl",
                                                   "on_policy")]:
        assert need in names, f"the grid lacks {need}"
    for row in grid["regimes"]:
        assert len(row["seeds"]) >= 5 and len(row["scores"]) == len(row["seeds"])
        assert min(row["scores"]) <= row["mean"] <= max(row["scores"])
        assert (row["vs_sft"] is None) == (row["method"] == "sft")
    assert 0 <= grid["teacher_entropy_nats"]["overall"] < math.log(2)


def test_regime_paired_tests_recompute_from_the_committed_runs():
    grid = _grid()
    for row in grid["regimes"]:
        if row["vs_sft"] is None:
            continue
        def scores(method: str, row: dict = row) -> dict[int, float]:
            return {r["seed"]: r["score"] for r in grid["runs"]
                    if (r["regime"], r["budget"], r["method"])
                    == (row["regime"], row["budget"], method)}
        mine, sft = scores(row["method"]), scores("sft")
        seeds = sorted(mine)
        t = paired_test([mine[s] for s in seeds], [sft[s] for s in seeds])
        assert row["vs_sft"]["mean_diff"] == pytest.approx(t.mean_diff)
        assert row["vs_sft"]["p_value"] == pytest.approx(t.p_value)
        assert row["vs_sft"]["sign_p_value"] == pytest.approx(t.sign_p_value)
    best = grid["kd_vs_sft_best_regime"]
    long_rows = [r for r in grid["regimes"] if r["budget"] == "long" and r["vs_sft"]]
    assert best["mean_diff"] == pytest.approx(max(r["vs_sft"]["mean_diff"] for r in long_rows))


def test_the_notebooks_live_regime_point_is_inside_the_committed_seed_spread():
    grid = _grid()
    lesson = load_committed(LESSON, "execute solutions/03_white_box_distillation.ipynb")
    live = lesson.get("regime_live")
    if not live:
        pytest.skip("results/03_white_box_distillation.json predates the regime section: "
                    "execute solutions/03_white_box_distillation.ipynb")
    for method, point in live.items():
        runs = [r["token_accuracy"] for r in grid["runs"]
                if r["budget"] == "live" and r["method"] == method
                and r["labelled"] == point["labelled"]]
        assert runs, f"no committed live-budget runs for {method}"
        assert min(runs) - 0.01 <= point["token_accuracy"] <= max(runs) + 0.01


def test_regime_script_runs_end_to_end_quickly(tmp_path):
    out = tmp_path / "regimes.json"
    env = {**os.environ, "DD_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiments_03_regimes.py"),
                          "--quick", "--out", str(out), "--jobs", "1"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    grid = json.loads(out.read_text(encoding="utf-8"))
    assert grid["provenance"]["quick"] is True and len(grid["runs"]) == 2 * 13
    sft_long = {r["seed"]: f"{r['name']}-{r['cache_key']}" for r in grid["runs"]
                if (r["regime"], r["budget"], r["method"]) == ("scarce-5%", "long", "sft")}
    warm = [r for r in grid["runs"] if r["budget"] == "sft+500"]
    assert len(warm) == 2 * 4 and all(r["init"] == sft_long[r["seed"]] for r in warm)
    assert {r["regime"] for r in grid["regimes"]} == {"scarce-5%", "scarce-20%", "abundant"}
