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
- ``teacher-int8`` / ``teacher-4bit-g32``: the teacher quantized in memory (lesson 05:
  ``quantize_dynamic_int8`` and ``fake_quantize_model(bits=4, group_size=32)``);
- ``teacher-onnx``: the teacher exported with ``utils.deploy.export_onnx`` and decoded by ONNX
  Runtime, wrapped by :class:`OnnxChatModel`; ``whitebox-student-onnx``: the same for the
  white-box student, the model lesson 06 deploys;
- ``student-skills-only``: the shipped ``student-xs-forward-kl-skills-only``: the white-box
  student's recipe with the refusal data left out of its transfer set (lesson 07's remedy
  compares the two).

A model that with ``build=False`` is not in the cache, or is a shipped student missing from
``data/models/students/``, raises :class:`ModelUnavailable` with a message naming what makes
it; the grid skips it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.deploy import export_onnx, load_onnx_session, ort_generate
from utils.evaluate import exact_match_from_rows, generate_responses, score_records
from utils.io import sha256_file_or_none
from utils.model_cache import Recipe, entry_dir, verify_folder
from utils.models import load_model, local_folder, shipped_students, students_dir, teacher_dir
from utils.paths import cache_dir
from utils.quantize import fake_quantize_model, quantize_dynamic_int8
from utils.recipes import blackbox_recipe
from utils.safety import prompt_of, safety_report


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


def onnx_model(name: str = "teacher", *, threads: int = 1, folder: str | os.PathLike | None = None
               ) -> tuple[OnnxChatModel, Any]:
    """A course model (``load_model`` name) exported to ONNX with its KV cache, as lesson 06
    deploys it, wrapped as an :class:`OnnxChatModel`. The export is cached under
    ``<cache>/onnx/<name>-<sha256 of its weights>.onnx``, so new weights export again."""
    model, tokenizer = load_model(name, verbose=False)
    sha = sha256_file_or_none(local_folder(name) / "model.safetensors") or "unknown"
    root = Path(folder) if folder is not None else cache_dir() / "onnx"
    path = root / f"{Path(name).name}-{sha[:16]}.onnx"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, with_cache=True)
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
}


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


def course_models(*, build_missing: bool = False, onnx_threads: int = 1, progress: bool = True
                  ) -> dict[str, CourseModel]:
    """Every model of the course, in grid order, as ``{name: CourseModel}`` (lesson 07).

    The students of lessons 03 and 07 are shipped (``data/models/students/``, built by
    ``make students``). ``build_missing``: train lesson 04's black-box student here if it is not
    cached (slow); by default it comes from the cache that lesson 04 fills.
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

    def four_bit() -> tuple[Any, Any]:
        model, tok = teacher()
        return fake_quantize_model(model, bits=4, group_size=32), tok

    def onnx() -> tuple[Any, Any]:
        return onnx_teacher(threads=onnx_threads)

    def onnx_student() -> tuple[Any, Any]:
        name, made_by = SHIPPED["whitebox-student"]
        load_shipped(name, made_by)  # a clear ModelUnavailable when it is missing
        return onnx_model(name, threads=onnx_threads)

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
        CourseModel("teacher-int8", "quantized", "lesson 05",
                    "teacher, dynamic int8 (quantize_dynamic_int8)", int8),
        CourseModel("teacher-4bit-g32", "quantized", "lesson 05",
                    "teacher, 4-bit group 32 round-to-nearest (fake_quantize_model)", four_bit),
        CourseModel("teacher-onnx", "deployed", "lesson 06",
                    "teacher exported to ONNX, decoded by ONNX Runtime with a KV cache", onnx),
        CourseModel("whitebox-student-onnx", "deployed", "lesson 06",
                    "the white-box student exported to ONNX as lesson 06 deploys it, decoded by "
                    "ONNX Runtime with a KV cache", onnx_student),
        CourseModel("student-skills-only", "skills only", "lesson 07",
                    "the white-box student's recipe on skill chats only, no refusal data "
                    "(shipped student-xs-forward-kl-skills-only)", shipped("student-skills-only")),
    ]
    return {e.name: e for e in entries}


# --------------------------------------------------------------------------------------
# One model through the harness: the numbers of one grid row
# --------------------------------------------------------------------------------------


def utility_score(model: Any, tokenizer: Any, skill_records: Sequence[dict], *,
                  batch_size: int = 64, max_new_tokens: int = 96,
                  num_threads: int | None = 1) -> float:
    """Exact match on skill prompts (generated greedily, lesson 02's scoring): the utility axis."""
    if not skill_records:
        return float("nan")
    responses = generate_responses(model, tokenizer, [prompt_of(r) for r in skill_records],
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   num_threads=num_threads, strip=True)
    return float(exact_match_from_rows(score_records(list(skill_records), responses))["overall"])


def evaluate_course_model(name: str, model: Any, tokenizer: Any, records: Sequence[dict],
                          judge: Any, *, skill_records: Sequence[dict] = (),
                          batch_size: int = 64, max_new_tokens: int = 32,
                          utility_max_new_tokens: int = 96,
                          num_threads: int | None = 1) -> dict:
    """Generate on the safety ``records``, judge, and tabulate one grid row (lesson 07).

    Returns the JSON-able row (``name, refusal_rate, refusal_ci, over_refusal_rate,
    over_refusal_ci, heldout_jailbreak_success_rate, heldout_jailbreak_ci, utility_score,
    n_prompts, eval_seconds``) plus, under keys starting with ``_``, the responses, the
    judge's verdicts and the :class:`utils.safety.SafetyReport` (drop them before saving).
    ``eval_seconds`` times generation and judging of the safety prompts only.
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
    utility = (utility_score(model, tokenizer, skill_records, batch_size=batch_size,
                             max_new_tokens=utility_max_new_tokens, num_threads=num_threads)
               if skill_records else float("nan"))
    return {
        "name": name, "n_prompts": len(records), "eval_seconds": round(seconds, 2),
        "refusal_rate": refusal.rate, "refusal_ci": [refusal.low, refusal.high],
        "n_harmful": refusal.n,
        "over_refusal_rate": over.rate, "over_refusal_ci": [over.low, over.high],
        "n_benign": over.n,
        "heldout_jailbreak_success_rate": held.rate,
        "heldout_jailbreak_ci": [held.low, held.high], "n_heldout_jailbreak": held.n,
        "utility_score": utility, "utility_n": len(skill_records),
        "_responses": responses, "_refusals": refused, "_report": report,
    }


def public_row(row: dict) -> dict:
    """A grid row without its bulky ``_`` entries, NaN replaced by None (JSON-able)."""
    out = {}
    for k, v in row.items():
        if k.startswith("_"):
            continue
        out[k] = None if isinstance(v, float) and v != v else v
    return out
