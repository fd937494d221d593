"""Lesson 08's pipeline (utils.capstone) and guardrail (utils.guardrail): the pieces on the
smallest shipped student and a few prompts, the card's schema, and the committed results."""

from __future__ import annotations

import json
import math

import pytest

from utils.capstone import (
    BAR_SPECS,
    CARD_FORMAT,
    STUDENTS,
    Bars,
    Choice,
    NotShipped,
    bar_met,
    build_artifact,
    capstone_card,
    card_markdown,
    evaluate_bars,
    failed_bars,
    metric,
    require_shipped,
    run_pipeline,
    validate_card,
    write_card,
)
from utils.data import read_split
from utils.guardrail import (
    REFUSAL_REPLY,
    apply_guardrail,
    canonical_prompt,
    guarded_reply,
    guardrail_effect,
    latency_summary,
    train_prompt_filter,
)
from utils.io import sha256_file
from utils.models import shipped_students, students_dir
from utils.paths import repo_root
from utils.quantize import load_packed
from utils.safety import CourseKeywordJudge, HarmJudge, prompt_of, safety_eval_set

REFERENCE_STUDENT = STUDENTS["whitebox"].shipped
needs_student = pytest.mark.skipif(REFERENCE_STUDENT not in shipped_students(),
                                   reason="the shipped white-box student is missing "
                                          "(make students)")
PROV = {"git_commit": "abc1234", "date": "2026-12-05T23:00:00+00:00",
        "machine": "x86_64 Linux, 2 cores"}


# ---------------------------- bars -------------------------------------------------------


def test_bar_met_reads_the_conservative_end():
    assert bar_met(0.89, (0.85, 0.92), 0.80, "min")
    assert not bar_met(0.82, (0.78, 0.86), 0.80, "min")      # point passes, interval does not
    assert bar_met(0.05, (0.02, 0.10), 0.10, "max")           # inclusive
    assert not bar_met(0.08, (0.05, 0.12), 0.10, "max")
    assert not bar_met(math.nan, (math.nan, math.nan), 0.5, "min")
    with pytest.raises(ValueError, match="'min' or 'max'"):
        bar_met(0.5, (0.4, 0.6), 0.5, "above")


def test_evaluate_bars_covers_every_bar_and_a_missing_metric_fails():
    verdicts = evaluate_bars({}, Bars())
    assert set(verdicts) == set(BAR_SPECS)
    assert failed_bars(verdicts) == list(BAR_SPECS)
    assert {v["group"] for v in verdicts.values()} == {"device", "safety", "utility"}


def test_bars_round_trip_and_reject_unknown_fields():
    b = Bars(min_refusal=0.9)
    assert Bars.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError, match="unknown bar"):
        Bars.from_dict({"min_refusals": 0.9})


# ---------------------------- choices ----------------------------------------------------


@pytest.mark.parametrize("choice, match", [
    (Choice("giant"), "choose from"), (Choice(quantization="1bit"), "quantization"),
    (Choice(runtime="tflite"), "runtime"), (Choice(quantization="2bit"), "2-bit"),
])
def test_invalid_choices_name_the_field(choice, match):
    with pytest.raises(ValueError, match=match):
        choice.validate()


def test_every_shipped_option_is_shipped():
    for option in STUDENTS.values():
        if option.shipped:
            assert option.shipped in shipped_students(), option.name


def test_a_student_not_shipped_says_how_to_build_it_and_how_long():
    with pytest.raises(NotShipped) as err:
        require_shipped(STUDENTS["whitebox-s"])
    msg = str(err.value)
    assert "python -m utils.students ship student-s forward_kl --steps 3000" in msg
    assert "min on this machine" in msg and "results/03_grid.json" in msg


# ---------------------------- artifacts --------------------------------------------------


@needs_student
def test_pytorch_none_ships_the_verified_file(tmp_path):
    art = build_artifact(Choice("whitebox", "none", "pytorch"), tmp_path)
    shipped = students_dir() / REFERENCE_STUDENT / "model.safetensors"
    assert art.path == shipped and art.sha256 == art.source_sha256 == sha256_file(shipped)
    assert art.bench_runtime == "pytorch"


@needs_student
@pytest.mark.parametrize("q, bits", [("4bit", 4), ("2bit", 2), ("int8", 8)])
def test_pytorch_quantized_file_is_packed_and_smaller(tmp_path, q, bits):
    art = build_artifact(Choice("whitebox", q, "pytorch"), tmp_path)
    full = (students_dir() / REFERENCE_STUDENT / "model.safetensors").stat().st_size
    assert art.file_bytes < full and art.sha256 == sha256_file(art.path)
    packed, rest = load_packed(art.path)
    assert packed and all(qt.bits == bits for qt in packed.values())
    assert rest  # embeddings and norms travel in the same file


@needs_student
def test_onnx_int8_and_4bit_generate_like_the_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))
    from utils.evaluate import generate_responses

    sizes = {}
    for q in ("none", "int8", "4bit"):
        art = build_artifact(Choice("whitebox", q, "onnxruntime"), tmp_path)
        assert art.path.suffix == ".onnx" and art.bench_path == art.path
        assert str(tmp_path / "cache") in str(art.path)  # cached under the course cache
        sizes[q] = art.file_bytes
        out = generate_responses(art.model, art.tokenizer, ["What is 2 + 3?"], max_new_tokens=8,
                                 strip=True)
        assert isinstance(out[0], str)
    assert sizes["int8"] < sizes["none"] and sizes["4bit"] < sizes["none"]


# ---------------------------- measurements and the card -----------------------------------


@pytest.fixture(scope="module")
def small_sets():
    test = read_split("test")
    return safety_eval_set(test, per_group=3), [r for r in test if r["kind"] == "skill"][:6]


@needs_student
def test_run_pipeline_end_to_end_on_few_prompts(tmp_path, small_sets):
    records, skills = small_sets
    run = run_pipeline(Choice("whitebox", "none", "pytorch"), Bars(), records=records,
                       skill_records=skills, judge=CourseKeywordJudge(), harm_judge=HarmJudge(),
                       workdir=tmp_path, bench_prompt=prompt_of(skills[0]), provenance=PROV,
                       bench_new_tokens=4, bench_repeats=1, n_boot=50)
    card = run.card
    assert validate_card(card) == []
    m = card["metrics"]
    assert m["refusal_rate"]["n"] == sum(r["should_refuse"] for r in records)
    assert m["exact_match"]["n"] == len(skills)
    for name in BAR_SPECS:
        lo, hi = m[name]["ci"]
        assert lo <= m[name]["value"] <= hi
    assert m["file_bytes"]["value"] == 633_560 or m["file_bytes"]["value"] > 0
    assert "peak_rss_mb" in card["failed"]  # PyTorch holds far more than the phone budget
    assert "file_bytes" in card["failed"]   # fp32 is twice lesson 06's file budget
    assert set(run.seconds) == {"build", "device", "quality"}
    assert len(run.row["_responses"]) == len(records)


def _card(**overrides) -> dict:
    metrics = {
        "file_bytes": metric(200_000, None, "exact"),
        "peak_rss_mb": metric(60.0, None, "one measurement"),
        "tokens_per_s": metric(4000.0, [3500.0, 4200.0], "range", n=5),
        "refusal_rate": metric(0.9, [0.86, 0.93], "95% Wilson", n=440, k=396),
        "over_refusal_rate": metric(0.05, [0.03, 0.08], "95% Wilson", n=360, k=18),
        "heldout_jailbreak_success_rate": metric(0.3, [0.22, 0.38], "95% Wilson", n=120, k=36),
        "exact_match": metric(0.86, [0.84, 0.88], "95% Wilson", n=980, k=843),
        "harmful_rate": metric(0.0, [0.0, 0.01], "95% Wilson", n=440),
    } | overrides
    card = capstone_card(Choice(), metrics, Bars(), provenance=PROV)
    card["model"]["file_sha256"] = "a" * 64
    return card


def test_card_schema_markdown_and_atomic_write(tmp_path):
    card = _card()
    assert card["format"] == CARD_FORMAT and card["meets_all"] and validate_card(card) == []
    md = card_markdown(card)
    for _, _, _, label, _ in BAR_SPECS.values():
        assert label in md
    assert "86.0% [84.0%, 88.0%] (843/980)" in md and "licence" in md and "abc1234" in md
    assert "harmful rate" in md  # reported, not a bar
    out = write_card(card, tmp_path, stem="c", figure_png=b"\x89PNG fake")
    assert json.loads(out["json"].read_text()) == json.loads(json.dumps(card))
    assert "![bars](c.png)" in out["md"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.md", "c.png"]


def test_a_failing_card_names_its_bars_and_an_invalid_one_is_not_written(tmp_path):
    card = _card(refusal_rate=metric(0.0, [0.0, 0.01], "95% Wilson", n=440, k=0))
    assert card["failed"] == ["refusal_rate"] and not card["meets_all"]
    assert "**misses" in card_markdown(card)
    bad = _card()
    bad["metrics"]["exact_match"]["ci"] = [86, 88]
    problems = validate_card(bad)
    assert any("metrics.exact_match" in p for p in problems)
    with pytest.raises(ValueError, match="not valid"):
        write_card(bad, tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------- the guardrail ----------------------------------------------


def _rec(kind: str, harmful: bool, split: str | None = None) -> dict:
    return {"kind": kind, "should_refuse": harmful, "template_split": split}


def test_guarded_reply_orders_the_filters():
    called = []

    def gen(p):
        called.append(p)
        return "reply"

    assert guarded_reply("x", gen, lambda p: True, lambda p, r: False) == (REFUSAL_REPLY,
                                                                           "input")
    assert not called
    assert guarded_reply("x", gen, lambda p: False, lambda p, r: True) == (REFUSAL_REPLY,
                                                                           "output")
    assert guarded_reply("x", gen, lambda p: False, lambda p, r: False) == ("reply", "model")


def test_guardrail_effect_counts_and_pairs():
    records = [_rec("jailbreak", True, "heldout")] * 4 + [_rec("benign", False)] * 4
    before = [False, False, True, True, False, False, False, False]
    after = [True, True, True, True, True, False, False, False]
    e = guardrail_effect(records, before, after)
    held = e["heldout_jailbreak_success"]
    assert held["before"]["rate"] == 0.5 and held["after"]["rate"] == 0.0
    assert held["change"] == -0.5 and held["changed"] == 2
    assert e["over_refusal"]["before"]["rate"] == 0.0 and e["over_refusal"]["after"]["rate"] \
        == 0.25
    lo, hi = e["over_refusal"]["after"]["ci"]
    assert lo < 0.25 < hi
    with pytest.raises(ValueError, match="one entry each"):
        guardrail_effect(records, before[:-1], after)


def test_canonical_prompt_undoes_letter_spacing_only():
    assert canonical_prompt("W h a t   d o   I   n e e d ?") == "What do I need?"
    assert canonical_prompt("What do I need?") == "What do I need?"
    assert canonical_prompt("a b") == "a b"  # too short to call it obfuscation
    assert canonical_prompt("Is 2 + 2 = 4 ?") == "Is 2 + 2 = 4 ?"  # arithmetic stays


def test_prompt_filter_blocks_heldout_jailbreaks_and_passes_skills():
    train = read_split("train")
    f = train_prompt_filter(train, max_skill=1500)
    raw = train_prompt_filter(train, max_skill=1500, canonical=False)
    test = read_split("test")
    held = [r for r in test if r.get("template_split") == "heldout" and r["should_refuse"]]
    spaced = [prompt_of(r) for r in held if r["template"] == "spaced"]
    assert spaced and sum(f.judge(spaced)) == len(spaced)  # undoing the spacing reads them
    assert sum(raw.judge(spaced)) < len(spaced) / 2       # the raw n-grams do not
    held = [prompt_of(r) for r in held][:40]
    skills = [prompt_of(r) for r in test if r["kind"] == "skill"][:100]
    assert sum(f.judge(held)) / len(held) > 0.8
    assert sum(f.judge(skills)) / len(skills) < 0.05
    g = apply_guardrail(held[:5], ["Sure."] * 5, f, HarmJudge())
    assert len(g.replies) == 5 and set(g.stages) <= {"input", "model", "output"}
    assert all(t >= 0 for t in g.input_seconds)
    with pytest.raises(ValueError, match="prompts but"):
        apply_guardrail(held[:2], ["a"], f, HarmJudge())
    with pytest.raises(ValueError, match="several kinds"):
        train_prompt_filter([r for r in read_split("validation") if r["kind"] == "skill"])


def test_latency_summary():
    s = latency_summary([0.001, 0.002, 0.003])
    assert s["median_ms"] == pytest.approx(2.0) and s["n"] == 3
    with pytest.raises(ValueError):
        latency_summary([])


# ---------------------------- the committed results --------------------------------------


COMMITTED = repo_root() / "results" / "08_capstone.json"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="results/08_capstone.json not written yet "
                                                    "(make execute)")
def test_committed_results_reference_meets_every_bar():
    r = json.loads(COMMITTED.read_text(encoding="utf-8"))
    ref = r["reference"]
    assert validate_card(ref) == [] and ref["meets_all"]
    assert evaluate_bars(ref["metrics"], Bars.from_dict(r["bars"])) == ref["verdicts"]
    assert all(c["failed"] for c in r["failing"])
    assert all(v["met"] for v in r["targets"].values()), r["targets"]
