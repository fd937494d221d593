"""Every model the course makes, in one list, for lesson 07's safety grid.

:func:`course_models` returns ``{name: CourseModel}``; ``CourseModel.load()`` gives
``(model, tokenizer)`` that :func:`utils.evaluate.generate_responses` can generate from:

- ``teacher``: the shipped teacher (lesson 02);
- ``whitebox-student``: lesson 03's shipped ``student-xs-forward-kl`` (``make students``:
  distilled with forward KL for a long budget on the whole training split, skills *and* the
  world's refusal data, so it is also the safety-aware student of section 5);
- ``sft-student``: lesson 03's shipped ``student-xs-sft`` (the same data and budget, no teacher);
- ``blackbox-student``: lesson 04's live student, ``utils.recipes.blackbox_recipe()``
  (its defaults);
- ``extracted-*``: lesson 04's four shipped extracted students (text or top-k harvest of the
  skill prompts; the mixed harvest with the API's refusals kept or filtered out), seed 0; the
  ``-s1``/``-s2`` rows are the same recipes' other seeds, loaded from the model cache that
  ``scripts/extract_students.py`` fills (not shipped: skipped when absent);
- ``extracted-text-skills-watermarked``: lesson 04's shipped watermarked copy, the text recipe
  of ``extracted-text-skills`` harvested from an API that watermarks every answer
  (``scripts/experiments_04_radioactivity.py --part shipped``; issue 17);
- ``teacher-int8`` / ``teacher-4bit-g32`` / ``teacher-3bit-g32`` / ``teacher-2bit-g32``: the
  teacher quantized in memory (lesson 05: ``quantize_dynamic_int8`` and
  ``fake_quantize_model(bits, group_size=32)``);
- ``whitebox-student-int8`` / ``whitebox-student-4bit-g32``: the white-box student quantized as
  lesson 05's section 10 does (per-channel symmetric int8; 4-bit group 32);
- ``teacher-onnx``: the teacher exported with ``utils.deploy.export_onnx`` and decoded by ONNX
  Runtime, wrapped by :class:`OnnxChatModel`; ``whitebox-student-onnx``: the same for the
  white-box student; ``whitebox-student-onnx-int8``: that file through
  ``utils.deploy.quantize_onnx_int8``, the file lesson 06 ships (its chat box runs on it);
- ``student-skills-only``: the shipped ``student-xs-forward-kl-skills-only``: the white-box
  student's recipe with the refusal data left out of its transfer set (lesson 07's remedy
  compares the two).

:data:`GRID_PAIRS` names the pairs the grid compares prompt by prompt (exact McNemar,
:func:`paired_verdict_tests`); :func:`heldout_cluster_interval` is the held-out jailbreak
success rate's interval when templates, not only prompts, are resampled.

A model that with ``build=False`` is not in the cache, or is a shipped student missing from
``data/models/students/``, raises :class:`ModelUnavailable` with a message naming what makes
it; the grid skips it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.deploy import export_onnx, load_onnx_session, ort_generate, quantize_onnx_int8
from utils.evaluate import generate_responses, score_records
from utils.io import sha256_file_or_none
from utils.model_cache import Recipe, entry_dir, verify_folder
from utils.models import (
    load_model,
    local_folder,
    shipped_students,
    student_card,
    students_dir,
    teacher_dir,
)
from utils.paths import cache_dir
from utils.quantize import fake_quantize_model, quantize_dynamic_int8
from utils.recipes import blackbox_recipe
from utils.safety import HarmJudge, Rate, prompt_of, safety_report, wilson_interval
from utils.stats import cluster_bootstrap, mcnemar_exact


class ModelUnavailable(RuntimeError):
    """A course model that cannot be loaded now (its recipe is missing or not yet built)."""


# --------------------------------------------------------------------------------------
# The deployed ONNX model, wrapped so generate_responses can use it
# --------------------------------------------------------------------------------------


class OnnxChatModel(torch.nn.Module):
    """An ONNX Runtime decode session behind the slice of the transformers API that
    :func:`utils.evaluate.generate_responses` uses: ``generate``, ``eval``, ``parameters``.

    ``generate`` is greedy decoding with the KV cache (:func:`utils.deploy.ort_generate`), so
    the safety harness measures exactly what the deployed file does (lesson 06, lesson 07).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = load_onnx_session(self.path, threads=threads)
        # generate_responses asks for the device of the first parameter: an empty anchor.
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, do_sample: bool = False,
                 **_: Any) -> torch.Tensor:
        if do_sample:
            raise ValueError("OnnxChatModel decodes greedily only: pass do_sample=False")
        out = ort_generate(self.session, input_ids, max_new_tokens, eos_token_id,
                           attention_mask=attention_mask, pad_token_id=pad_token_id)
        return torch.from_numpy(out)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not a torch model
        raise NotImplementedError("OnnxChatModel only generates; use utils.deploy.ort_logits "
                                  "for logits")


def onnx_model(name: str = "teacher", *, threads: int = 1, folder: str | os.PathLike | None = None,
               int8: bool = False) -> tuple[OnnxChatModel, Any]:
    """A course model (``load_model`` name) exported to ONNX with its KV cache, as lesson 06
    deploys it, wrapped as an :class:`OnnxChatModel`. The export is cached under
    ``<cache>/onnx/<name>-<sha256 of its weights>.onnx``, so new weights export again.
    ``int8=True``: that file through :func:`utils.deploy.quantize_onnx_int8` (dynamic int8,
    per channel), the file lesson 06 ships, cached beside it as ``...-int8.onnx``."""
    model, tokenizer = load_model(name, verbose=False)
    sha = sha256_file_or_none(local_folder(name) / "model.safetensors") or "unknown"
    root = Path(folder) if folder is not None else cache_dir() / "onnx"
    path = root / f"{Path(name).name}-{sha[:16]}.onnx"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, with_cache=True)
    if int8:
        fp32, path = path, path.with_name(f"{path.stem}-int8.onnx")
        if not path.is_file():
            quantize_onnx_int8(fp32, path)
    return OnnxChatModel(path, threads=threads), tokenizer


def onnx_teacher(*, threads: int = 1, folder: str | os.PathLike | None = None
                 ) -> tuple[OnnxChatModel, Any]:
    """The teacher exported to ONNX (cached by the teacher's sha256) as an
    :class:`OnnxChatModel`."""
    return onnx_model("teacher", threads=threads, folder=folder)


# --------------------------------------------------------------------------------------
# Transfer sets: what a student is distilled on, with or without the world's refusal data
# --------------------------------------------------------------------------------------

SAFETY_KINDS = ("restricted", "benign", "jailbreak")  # the world's refusal data
MIXES = ("skills", "safety")


def teacher_sha256() -> str | None:
    """sha256 of the shipped teacher's ``model.safetensors`` (None when it is missing)."""
    return sha256_file_or_none(teacher_dir() / "model.safetensors")


def transfer_set(records: Sequence[dict], mix: str) -> list[dict]:
    """The prompts a student is distilled on: ``"skills"`` keeps the skill records only;
    ``"safety"`` keeps them *and* the world's refusal data (restricted requests, benign
    look-alikes, jailbreak-wrapped requests with the teacher's refusals or answers)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    kinds = {"skill"} | (set(SAFETY_KINDS) if mix == "safety" else set())
    return [r for r in records if r["kind"] in kinds]


# --------------------------------------------------------------------------------------
# The grid's list of models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CourseModel:
    """One entry of the grid: a name, where it comes from, and how to load it."""

    name: str
    kind: str  # teacher, white-box, black-box, quantized, deployed, safety-aware
    lesson: str
    description: str
    loader: Callable[[], tuple[Any, Any]]

    def load(self) -> tuple[Any, Any]:
        return self.loader()


def load_recipe(recipe: Recipe, *, build: bool, lesson: str, progress: bool = True
                ) -> tuple[Any, Any]:
    """``load_model`` for a recipe; with ``build=False`` a missing cache entry raises
    :class:`ModelUnavailable` (run ``lesson`` first) instead of training it here."""
    if not build and verify_folder(entry_dir(recipe)) is not None:
        raise ModelUnavailable(f"{recipe.name!r} is not in the model cache ({entry_dir(recipe)}): "
                               f"run {lesson} first (it builds it), or allow building here.")
    return load_model(recipe, verbose=False, progress=progress)


_EXTRACT = "`make students` (scripts/extract_students.py, lesson 04)"
SHIPPED = {  # grid name -> (shipped student, the command and lesson that make it)
    "whitebox-student": ("student-xs-forward-kl", "`make students` (lesson 03)"),
    "sft-student": ("student-xs-sft", "`make students` (lesson 03)"),
    "student-skills-only": ("student-xs-forward-kl-skills-only", "`make students` (lesson 07)"),
    "extracted-text-skills": ("student-xs-extracted-text-skills", _EXTRACT),
    "extracted-topk-skills": ("student-xs-extracted-topk-skills", _EXTRACT),
    "extracted-topk-safety": ("student-xs-extracted-topk-safety", _EXTRACT),
    "extracted-topk-safety-filtered": ("student-xs-extracted-topk-safety-filtered", _EXTRACT),
    "extracted-text-skills-watermarked": (
        "student-xs-extracted-text-skills-watermarked",
        "`make experiments` (scripts/experiments_04_radioactivity.py --part shipped, lesson 04)"),
}


EXTRACTED = ("extracted-text-skills", "extracted-topk-skills", "extracted-topk-safety",
             "extracted-topk-safety-filtered")  # lesson 04's shipped harvest variants (seed 0)
EXTRA_SEEDS = (1, 2)  # the other seeds scripts/extract_students.py trains (cache only)


def extracted_seed_recipe(grid_name: str, seed: int) -> Recipe:
    """The recipe of a shipped extracted student (``EXTRACTED``) with another ``seed``.

    Rebuilt from the shipped card's settings, and checked: the same settings with the card's
    seed must give the card's cache key, so a seed row is the shipped student's recipe with
    only the seed changed (:func:`utils.recipes.blackbox_recipe`; lesson 04)."""
    if grid_name not in EXTRACTED:
        raise ValueError(f"{grid_name!r} is not an extracted student; choose from {EXTRACTED}")
    name, made_by = SHIPPED[grid_name]
    if name not in shipped_students():
        raise ModelUnavailable(f"the shipped student {name!r} is not in {students_dir()}: build "
                               f"it with {made_by}")
    card = student_card(name)
    s = card["settings"]

    def recipe(seed: int) -> Recipe:
        return blackbox_recipe(queries=s["queries"], granularity=s["granularity"], seed=seed,
                               steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                               top_k=s["top_k"], max_tokens=s["max_tokens"],
                               mix=card["transfer"], size=card["size"])

    if recipe(card["seed"]).key() != card["cache_key"]:
        raise ModelUnavailable(f"{name}'s card no longer matches utils.recipes.blackbox_recipe "
                               "(another teacher, data or recipe version): re-run "
                               f"{made_by}")
    return recipe(seed)


def seed_name(grid_name: str, seed: int) -> str:
    """Grid name of another seed of a shipped extracted student: ``extracted-topk-safety-s1``."""
    return f"{grid_name}-s{seed}"


def shipped_students_sha256() -> dict[str, str | None]:
    """sha256 of each shipped grid student's weights (None when missing): what a committed
    grid was measured on, so a notebook can tell whether the grid is still current."""
    return {name: sha256_file_or_none(students_dir() / name / "model.safetensors")
            for name, _ in SHIPPED.values()}


def load_shipped(name: str, made_by: str) -> tuple[Any, Any]:
    """``load_model(name)`` for a shipped student, or :class:`ModelUnavailable` naming the fix."""
    if name not in shipped_students():
        raise ModelUnavailable(f"the shipped student {name!r} is not in {students_dir()}: build it "
                               f"with {made_by}, or restore data/models/students/ from the "
                               "repository.")
    return load_model(name, verbose=False)


def course_models(*, build_missing: bool = False, onnx_threads: int = 1, progress: bool = True,
                  seeds: bool = True) -> dict[str, CourseModel]:
    """Every model of the course, in grid order, as ``{name: CourseModel}`` (lesson 07).

    The students of lessons 03, 04 and 07 are shipped (``data/models/students/``, built by
    ``make students``). ``build_missing``: train lesson 04's black-box student here if it is not
    cached (slow); by default it comes from the cache that lesson 04 fills. ``seeds``: append
    the extracted students' other seeds (cache only, never built here), after every shipped
    model.
    """
    _cache: dict[str, tuple[Any, Any]] = {}

    def teacher() -> tuple[Any, Any]:
        if "teacher" not in _cache:
            _cache["teacher"] = load_model("teacher", verbose=False)
        return _cache["teacher"]

    def shipped(grid_name: str) -> Callable[[], tuple[Any, Any]]:
        return lambda: load_shipped(*SHIPPED[grid_name])

    def blackbox() -> tuple[Any, Any]:
        return load_recipe(blackbox_recipe(), build=build_missing, lesson="lesson 04",
                           progress=progress)

    def int8() -> tuple[Any, Any]:
        model, tok = teacher()
        return quantize_dynamic_int8(model), tok

    def teacher_bits(bits: int) -> Callable[[], tuple[Any, Any]]:
        def load() -> tuple[Any, Any]:
            model, tok = teacher()
            return fake_quantize_model(model, bits=bits, group_size=32), tok
        return load

    def student_quantized(bits: int) -> Callable[[], tuple[Any, Any]]:
        def load() -> tuple[Any, Any]:  # lesson 05, section 10: the student's two recipes
            model, tok = load_shipped(*SHIPPED["whitebox-student"])
            if bits == 8:
                return fake_quantize_model(model, bits=8, group_size=None, symmetric=True), tok
            return fake_quantize_model(model, bits=bits, group_size=32), tok
        return load

    def onnx() -> tuple[Any, Any]:
        return onnx_teacher(threads=onnx_threads)

    def onnx_student(int8_file: bool) -> Callable[[], tuple[Any, Any]]:
        def load() -> tuple[Any, Any]:
            name, made_by = SHIPPED["whitebox-student"]
            load_shipped(name, made_by)  # a clear ModelUnavailable when it is missing
            return onnx_model(name, threads=onnx_threads, int8=int8_file)
        return load

    def other_seed(grid_name: str, seed: int) -> Callable[[], tuple[Any, Any]]:
        def load() -> tuple[Any, Any]:
            recipe = extracted_seed_recipe(grid_name, seed)
            return load_recipe(recipe, build=False, lesson="scripts/extract_students.py "
                               "(`make students`)", progress=progress)
        return load

    entries = [
        CourseModel("teacher", "teacher", "lesson 02", "the shipped teacher", teacher),
        CourseModel("whitebox-student", "white-box", "lesson 03",
                    "student-xs distilled with the teacher's logits on the whole training split "
                    "(skills and refusal data; shipped student-xs-forward-kl)",
                    shipped("whitebox-student")),
        CourseModel("sft-student", "data only", "lesson 03",
                    "student-xs trained on the same data without the teacher "
                    "(shipped student-xs-sft)",
                    shipped("sft-student")),
        CourseModel("blackbox-student", "black-box", "lesson 04",
                    "lesson 04's live student, extracted through the teacher's API "
                    "(blackbox_recipe defaults)", blackbox),
        CourseModel("extracted-text-skills", "extracted", "lesson 04",
                    "student-xs copied through the API from the text of every skill prompt's "
                    "answer, 3000 steps (shipped)", shipped("extracted-text-skills")),
        CourseModel("extracted-topk-skills", "extracted", "lesson 04",
                    "the same harvest, learnt from the top-10 logprobs (shipped)",
                    shipped("extracted-topk-skills")),
        CourseModel("extracted-topk-safety", "extracted", "lesson 04",
                    "skill prompts mixed with restricted requests, look-alikes and jailbreaks; "
                    "the API's refusals kept (shipped)", shipped("extracted-topk-safety")),
        CourseModel("extracted-topk-safety-filtered", "extracted", "lesson 04",
                    "the same mixed harvest with the API's refusals filtered out (shipped)",
                    shipped("extracted-topk-safety-filtered")),
        CourseModel("extracted-text-skills-watermarked", "extracted", "lesson 04",
                    "extracted-text-skills' recipe harvested from an API that watermarks every "
                    "answer (Kirchenbauer et al. 2023; shipped, issue 17)",
                    shipped("extracted-text-skills-watermarked")),
        CourseModel("teacher-int8", "quantized", "lesson 05",
                    "teacher, dynamic int8 (quantize_dynamic_int8)", int8),
        *[CourseModel(f"teacher-{bits}bit-g32", "quantized", "lesson 05",
                      f"teacher, {bits}-bit group 32 round-to-nearest (fake_quantize_model)",
                      teacher_bits(bits)) for bits in (4, 3, 2)],
        CourseModel("whitebox-student-int8", "quantized student", "lesson 05",
                    "the white-box student, int8 per-channel symmetric (lesson 05 section 10)",
                    student_quantized(8)),
        CourseModel("whitebox-student-4bit-g32", "quantized student", "lesson 05",
                    "the white-box student, 4-bit group 32 round-to-nearest (lesson 05 "
                    "section 10)", student_quantized(4)),
        CourseModel("teacher-onnx", "deployed", "lesson 06",
                    "teacher exported to ONNX, decoded by ONNX Runtime with a KV cache", onnx),
        CourseModel("whitebox-student-onnx", "deployed", "lesson 06",
                    "the white-box student exported to ONNX (fp32), decoded by ONNX Runtime "
                    "with a KV cache", onnx_student(False)),
        CourseModel("whitebox-student-onnx-int8", "deployed", "lesson 06",
                    "that ONNX file quantized to int8 (quantize_onnx_int8): the file lesson 06 "
                    "ships and its chat box runs", onnx_student(True)),
        CourseModel("student-skills-only", "skills only", "lesson 07",
                    "the white-box student's recipe on skill chats only, no refusal data "
                    "(shipped student-xs-forward-kl-skills-only)", shipped("student-skills-only")),
    ]
    if seeds:
        entries += [CourseModel(seed_name(g, seed), "extracted (seed)", "lesson 04",
                                f"{g} with seed {seed} (model cache of "
                                "scripts/extract_students.py; not shipped)", other_seed(g, seed))
                    for g in EXTRACTED for seed in EXTRA_SEEDS]
    return {e.name: e for e in entries}


# --------------------------------------------------------------------------------------
# One model through the harness: the numbers of one grid row
# --------------------------------------------------------------------------------------


def utility_flags(model: Any, tokenizer: Any, skill_records: Sequence[dict], *,
                  batch_size: int = 64, max_new_tokens: int = 96,
                  num_threads: int | None = 1) -> list[bool]:
    """Whether each skill prompt's greedy answer is exactly right (lesson 02's scoring)."""
    if not skill_records:
        return []
    responses = generate_responses(model, tokenizer, [prompt_of(r) for r in skill_records],
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   num_threads=num_threads, strip=True)
    return [bool(r["correct"]) for r in score_records(list(skill_records), responses)]


def utility_score(model: Any, tokenizer: Any, skill_records: Sequence[dict], *,
                  batch_size: int = 64, max_new_tokens: int = 96,
                  num_threads: int | None = 1) -> float:
    """Exact match on skill prompts (generated greedily, lesson 02's scoring): the utility axis."""
    flags = utility_flags(model, tokenizer, skill_records, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, num_threads=num_threads)
    return sum(flags) / len(flags) if flags else float("nan")


def _heldout_harmful(records: Sequence[dict]) -> list[bool]:
    return [bool(r["should_refuse"]) and r.get("template_split") == "heldout" for r in records]


def evaluate_course_model(name: str, model: Any, tokenizer: Any, records: Sequence[dict],
                          judge: Any, *, skill_records: Sequence[dict] = (),
                          batch_size: int = 64, max_new_tokens: int = 32,
                          utility_max_new_tokens: int = 96,
                          num_threads: int | None = 1,
                          harm_judge: HarmJudge | None = None) -> dict:
    """Generate on the safety ``records``, judge, and tabulate one grid row (lesson 07).

    Returns the JSON-able row (``name, refusal_rate, refusal_ci, over_refusal_rate,
    over_refusal_ci, heldout_jailbreak_success_rate, heldout_jailbreak_ci, harmful_rate,
    harmful_ci, heldout_harmful_rate, heldout_harmful_ci, utility_score, utility_ci,
    n_prompts, eval_seconds, harm_seconds, utility_seconds``) plus, under keys starting with
    ``_``, the responses, the refusal judge's verdicts, the harm judge's flags, the skill
    prompts' exact-match flags and the :class:`utils.safety.SafetyReport` (drop them before
    saving). ``harmful_rate`` is the share of harmful requests whose response the harm judge
    (:class:`utils.safety.HarmJudge`, the default) finds fulfilled: an attack that produced
    gibberish does not count. ``eval_seconds`` times generation and refusal judging of the
    safety prompts; ``harm_seconds`` the harm judge; ``utility_seconds`` the skill prompts.
    Every interval is a 95% Wilson interval.
    """
    start = time.perf_counter()
    prompts = [prompt_of(r) for r in records]
    responses = generate_responses(model, tokenizer, prompts, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, num_threads=num_threads,
                                   strip=True)
    refused = ([bool(v) for v in judge.judge(responses, prompts)] if hasattr(judge, "judge")
               else [bool(judge(r)) for r in responses])
    report = safety_report(records, responses, judge, model=name, refusals=refused)
    seconds = time.perf_counter() - start
    refusal = report.get("harmful", "refusal_rate")
    over = report.over_refusal
    held = report.get("harmful", "attack_success_rate", "template_split", "heldout")
    start = time.perf_counter()
    harm = (harm_judge or HarmJudge()).judge(responses, prompts)
    harm_seconds = time.perf_counter() - start
    harmful = [bool(r["should_refuse"]) for r in records]
    harm_rate = Rate.of(sum(f for f, h in zip(harm, harmful, strict=True) if h), sum(harmful))
    held_mask = _heldout_harmful(records)
    held_harm = Rate.of(sum(f for f, h in zip(harm, held_mask, strict=True) if h), sum(held_mask))
    start = time.perf_counter()
    correct = utility_flags(model, tokenizer, skill_records, batch_size=batch_size,
                            max_new_tokens=utility_max_new_tokens, num_threads=num_threads)
    utility_seconds = time.perf_counter() - start
    utility = sum(correct) / len(correct) if correct else float("nan")
    utility_ci = list(wilson_interval(sum(correct), len(correct))) if correct else [None, None]
    return {
        "name": name, "n_prompts": len(records), "eval_seconds": round(seconds, 2),
        "harm_seconds": round(harm_seconds, 2), "utility_seconds": round(utility_seconds, 2),
        "refusal_rate": refusal.rate, "refusal_ci": [refusal.low, refusal.high],
        "n_harmful": refusal.n,
        "over_refusal_rate": over.rate, "over_refusal_ci": [over.low, over.high],
        "n_benign": over.n,
        "heldout_jailbreak_success_rate": held.rate,
        "heldout_jailbreak_ci": [held.low, held.high], "n_heldout_jailbreak": held.n,
        "harmful_rate": harm_rate.rate, "harmful_ci": [harm_rate.low, harm_rate.high],
        "heldout_harmful_rate": held_harm.rate,
        "heldout_harmful_ci": [held_harm.low, held_harm.high],
        "utility_score": utility, "utility_ci": utility_ci, "utility_n": len(skill_records),
        "_responses": responses, "_refusals": refused, "_harmful": harm, "_correct": correct,
        "_report": report,
    }


def public_row(row: dict) -> dict:
    """A grid row without its bulky ``_`` entries, NaN replaced by None (JSON-able)."""
    out = {}
    for k, v in row.items():
        if k.startswith("_"):
            continue
        out[k] = None if isinstance(v, float) and v != v else v
    return out


# --------------------------------------------------------------------------------------
# Is a difference real? Paired per-prompt tests and the clustered interval
# --------------------------------------------------------------------------------------

# (a, b, why the pair is compared): quantized and deployed copies against what they copy,
# every student against the teacher, the extracted harvest with the API's refusals kept
# against the same harvest with them filtered (every seed), the watermarked copy against the
# same recipe harvested without the watermark, safety-aware vs skills-only.
GRID_PAIRS: tuple[tuple[str, str, str], ...] = (
    *((("teacher", f"teacher-{q}", "quantized copy of the teacher"))
      for q in ("int8", "4bit-g32", "3bit-g32", "2bit-g32")),
    ("teacher", "teacher-onnx", "deployed copy of the teacher"),
    *(("teacher", s, "student of the teacher")
      for s in ("whitebox-student", "sft-student", "student-skills-only", "blackbox-student",
                *EXTRACTED, "extracted-text-skills-watermarked")),
    ("extracted-text-skills", "extracted-text-skills-watermarked",
     "the API's watermark vs none (same harvest and recipe)"),
    *(("extracted-topk-safety" + sfx, "extracted-topk-safety-filtered" + sfx,
       f"refusals kept vs filtered (seed {seed})")
      for seed, sfx in ((0, ""), *((s, f"-s{s}") for s in EXTRA_SEEDS))),
    ("whitebox-student", "whitebox-student-int8", "quantized copy of the student"),
    ("whitebox-student", "whitebox-student-4bit-g32", "quantized copy of the student"),
    ("whitebox-student", "whitebox-student-onnx", "deployed copy of the student (fp32 ONNX)"),
    ("whitebox-student", "whitebox-student-onnx-int8",
     "deployed copy of the student (int8 ONNX, lesson 06)"),
    ("whitebox-student", "student-skills-only", "refusal data in the transfer set vs none"),
)

# metric -> (the verdicts it reads, which prompts, verdict counted): "refusal" reads refusals
# on harmful prompts, "harmful" the harm judge's flags on harmful prompts, and so on.
PAIRED_METRICS = {
    "refusal": ("verdicts", "harmful", True),
    "over_refusal": ("verdicts", "benign", True),
    "heldout_jailbreak_success": ("verdicts", "heldout", False),
    "harmful": ("harm_verdicts", "harmful", True),
    "utility": ("utility_verdicts", "skill", True),
}


def _flags(bits: str) -> list[bool]:
    if set(bits) - {"0", "1"}:
        raise ValueError("a verdict string holds only '0' and '1' (one per prompt)")
    return [c == "1" for c in bits]


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values: control the family-wise error of many tests
    (reject where the adjusted p-value is below the level)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_verdict_tests(grid: Mapping[str, Any], records: Sequence[dict],
                         pairs: Sequence[tuple[str, str, str]] = GRID_PAIRS, *,
                         metrics: Sequence[str] = tuple(PAIRED_METRICS),
                         level: float = 0.05) -> list[dict]:
    """Exact McNemar tests (:func:`utils.stats.mcnemar_exact`) of each pair on each metric.

    ``grid`` holds verdict strings per model, one character per prompt: ``verdicts`` (refusal
    judge, every safety record), ``harm_verdicts`` (harm judge, every safety record) and
    ``utility_verdicts`` (exact match, every skill record) as written by
    ``scripts/experiments_07.py``; ``records`` are the safety records in the grid's order.
    A pair with a model missing from ``grid`` is left out. Each test is a dict: ``a, b, why,
    metric, n, rate_a, rate_b, diff, b01, b10, discordant, p_value, holm_p_value,
    significant`` (``holm_p_value`` < ``level``: Holm's correction over every test returned).
    """
    unknown = set(metrics) - set(PAIRED_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from "
                         f"{list(PAIRED_METRICS)}")
    masks = {"harmful": [bool(r["should_refuse"]) for r in records],
             "benign": [not r["should_refuse"] for r in records],
             "heldout": _heldout_harmful(records)}
    tests = []
    for a, b, why in pairs:
        for metric in metrics:
            source, subset, counted = PAIRED_METRICS[metric]
            table = grid.get(source) or {}
            if a not in table or b not in table:
                continue
            va, vb = _flags(table[a]), _flags(table[b])
            mask = masks.get(subset, [True] * len(va))
            if not (len(va) == len(vb) == len(mask)):
                raise ValueError(f"{source} of {a!r} and {b!r} do not cover the same "
                                 f"{len(mask)} prompts: re-run scripts/experiments_07.py")
            xa = [v == counted for v, m in zip(va, mask, strict=True) if m]
            xb = [v == counted for v, m in zip(vb, mask, strict=True) if m]
            t = mcnemar_exact(xa, xb)
            tests.append({"a": a, "b": b, "why": why, "metric": metric, "n": t.n,
                          "rate_a": sum(xa) / t.n, "rate_b": sum(xb) / t.n, "diff": t.diff,
                          "b01": t.b01, "b10": t.b10, "discordant": t.discordant,
                          "p_value": t.p_value})
    for t, p in zip(tests, holm_adjust([t["p_value"] for t in tests]), strict=True):
        t["holm_p_value"] = p
        t["significant"] = p < level
    return tests


def heldout_cluster_interval(refusals: Sequence[bool] | str, records: Sequence[dict], *,
                             n_boot: int = 2000, seed: int = 0) -> dict:
    """The held-out jailbreak success rate with three 95% intervals: Wilson (prompts
    independent), the prompts-only bootstrap, and the two-stage cluster bootstrap that
    resamples jailbreak templates and then prompts within them
    (:func:`utils.stats.cluster_bootstrap`). With few templates the clustered interval is the
    honest one: the next template may be easier or harder than these."""
    from utils.stats import bootstrap_interval

    flags = _flags(refusals) if isinstance(refusals, str) else [bool(v) for v in refusals]
    if len(flags) != len(records):
        raise ValueError(f"got {len(flags)} verdicts for {len(records)} records")
    mask = _heldout_harmful(records)
    success = [float(not f) for f, m in zip(flags, mask, strict=True) if m]
    templates = [r["template"] for r, m in zip(records, mask, strict=True) if m]
    if not success:
        raise ValueError("no harmful prompt in a held-out jailbreak template among the records")
    k = int(sum(success))
    prompts = bootstrap_interval(success, n_boot=n_boot, seed=seed)
    clusters = cluster_bootstrap(success, templates, n_boot=n_boot, seed=seed)
    return {"rate": k / len(success), "n": len(success), "n_templates": clusters.n_clusters,
            "per_template": {t: sum(v for v, u in zip(success, templates, strict=True) if u == t)
                             / templates.count(t) for t in dict.fromkeys(templates)},
            "wilson_ci": list(wilson_interval(k, len(success))),
            "bootstrap_ci": [prompts.low, prompts.high],
            "cluster_bootstrap_ci": [clusters.low, clusters.high], "n_boot": n_boot,
            "seed": seed}
