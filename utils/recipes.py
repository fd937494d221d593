"""The course's recipes: how each named student is built, and what its cache key covers.

A recipe (:class:`utils.model_cache.Recipe`) is a config plus a build function; passing it to
:func:`utils.models.load_model` builds the model once (with a progress bar) and loads it from
the cache afterwards. The key covers the shape, every setting, the recipe's version and the
sha256 of the files the build reads (tokenizer, data manifest, teacher weights), so a new
teacher or new data builds new students, and a change of code is marked by bumping the
recipe's ``*_RECIPE_VERSION``.

- :func:`scratch_recipe`: a zoo student trained from scratch on the world (lesson 02's baseline);
- :func:`distill_recipe`: lesson 03's students: SFT, forward KL, reverse KL, on-policy (GKD),
  on the whole training split or on skills only (lesson 07's twin);
- :func:`blackbox_recipe`: lesson 04's student, distilled through the teacher's API.

This module orchestrates the science modules (training, distillation, extraction); none of
them imports it (``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

from utils.data import load_world, scarce_labels
from utils.distill import check_temperature
from utils.distill_trainer import DistillResult, distill_lm
from utils.extraction import (
    HARVEST_MIXES,
    WATERMARK_BIAS,
    Granularity,
    cached_harvest,
    distill_from_topk,
    keep_for_training,
    mix_prompts,
    sft_examples,
    teacher_fingerprint,
    watermark_config,
)
from utils.io import sha256_file_or_none
from utils.model_cache import Recipe
from utils.models import (
    TEACHER_ANSWERS,
    ZOO,
    ModelConfig,
    build_model,
    load_model,
    make_recipe,
    students_dir,
    teacher_answers,
    teacher_dir,
)
from utils.paths import data_dir
from utils.serve import Defences
from utils.tokenizer import load_tokenizer, tokenizer_dir
from utils.train import bar_callback, train_lm

__all__ = [
    "BLACKBOX_RECIPE_VERSION",
    "DISTILL_DEFAULTS",
    "DISTILL_RECIPE_VERSION",
    "METHODS",
    "METHOD_LOSS",
    "SCRATCH_RECIPE_VERSION",
    "SEQ_KD",
    "TRANSFERS",
    "blackbox_recipe",
    "distill_recipe",
    "scratch_recipe",
]


def _check_size(size: str) -> None:
    if size not in ZOO or ZOO[size].target_ratio is None:
        students = [n for n, e in ZOO.items() if e.target_ratio is not None]
        raise ValueError(f"size must be a student of the zoo ({', '.join(students)}), "
                         f"got {size!r}")


# --------------------------------------------------------------------------------------
# Lesson 02: a zoo student trained from scratch (the baseline distillation must beat)
# --------------------------------------------------------------------------------------

SCRATCH_RECIPE_VERSION = "1"  # bump when scratch_recipe's training code changes


def scratch_recipe(size: str = "student-xs", *, steps: int = 300, batch_size: int = 32,
                   lr: float = 3e-3, seed: int = 0, name: str | None = None) -> Recipe:
    """The recipe that trains zoo size ``size`` from scratch on the world (lesson 02).

    Supervised fine-tuning from random weights with :func:`utils.train.train_lm` on the
    training split, with the teacher's tokenizer: the baseline that distillation (lesson 03)
    must beat. The cache key covers the shape, the budget, the seed and the sha256 of the
    tokenizer and the data manifest, so changing any of them builds a new entry.
    Returns the recipe; ``load_model(recipe)`` builds it once, then loads it.
    """
    _check_size(size)
    tok_dir = teacher_dir() if (teacher_dir() / "tokenizer.json").is_file() else None
    tok_file = (tok_dir or tokenizer_dir()) / "tokenizer.json"
    extra = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             "tokenizer_sha256": sha256_file_or_none(tok_file),
             "data_manifest_sha256": sha256_file_or_none(data_dir() / "world" / "manifest.json")}

    def build(config: ModelConfig, progress: Any = None) -> tuple[Any, Any, dict]:
        bar = bar_callback(progress, steps)
        tokenizer = load_tokenizer(tok_dir)
        model = build_model(config, seed=seed)
        result = train_lm(model, tokenizer, load_world("train"), None, max_steps=steps,
                          batch_size=batch_size, lr=lr, seed=seed, progress=False,
                          callbacks=[bar])
        losses = result.train_losses
        info = {"train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "tokens_seen": result.tokens_seen,
                "final_train_loss": losses[-1][1] if losses else None}
        return model, tokenizer, info

    return make_recipe(name or f"{size}-scratch", size, build, SCRATCH_RECIPE_VERSION,
                           description=f"{size} trained from scratch for {steps} steps",
                           extra=extra)


# --------------------------------------------------------------------------------------
# Lesson 03: students distilled with the teacher's logits (or trained on the data alone)
# --------------------------------------------------------------------------------------

METHODS = ("sft", "forward_kl", "reverse_kl", "on_policy")
# What each method of lesson 03 trains with. "sft" is utils.train.train_lm (no teacher at all);
# "on_policy" is GKD (Agarwal et al. 2024) with MiniLLM's reverse KL: a share ``lmbda`` of the
# batches are the student's own samples scored by the teacher. Everything else is shared.
METHOD_LOSS = {"sft": None, "forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
               "on_policy": "reverse_kl"}
# Lesson 03's scarce-label regime adds sequence-level KD (Kim & Rush 2016): SFT on the
# teacher's own answers where gold answers are missing. Only with ``labelled < 1``.
SEQ_KD = "seq_kd"
TRANSFERS = ("all", "skills")  # distill_recipe's training data: the whole split, or skills only
DISTILL_RECIPE_VERSION = "1"  # bump when distill_recipe's training code changes what it builds
DISTILL_DEFAULTS = {"steps": 200, "batch_size": 32, "lr": 3e-3, "temperature": 1.0,
                    "alpha": 0.5, "lmbda": 0.5, "max_new_tokens": 48}


def distill_recipe(size: str = "student-xs", method: str = "forward_kl", *,
                   steps: int = DISTILL_DEFAULTS["steps"],
                   batch_size: int = DISTILL_DEFAULTS["batch_size"],
                   lr: float = DISTILL_DEFAULTS["lr"], seed: int = 0,
                   temperature: float = DISTILL_DEFAULTS["temperature"],
                   alpha: float = DISTILL_DEFAULTS["alpha"],
                   lmbda: float = DISTILL_DEFAULTS["lmbda"],
                   max_new_tokens: int = DISTILL_DEFAULTS["max_new_tokens"],
                   transfer: str = "all", labelled: float = 1.0,
                   init: Recipe | None = None, name: str | None = None) -> Any:
    """The recipe of a zoo student trained by ``method`` (lesson 03's contract).

    ``method`` is one of :data:`METHODS`: ``"sft"`` (the data alone, :func:`utils.train.train_lm`),
    ``"forward_kl"`` (Hinton/word-level KD), ``"reverse_kl"`` (MiniLLM's direction) or
    ``"on_policy"`` (GKD: a share ``lmbda`` of the batches are the student's own samples, with the
    reverse KL). ``transfer`` is the training data: ``"all"`` (the world's training split: skills
    and the safety policy's refusal data) or ``"skills"`` (skill chats only: the transfer set of
    an attacker or a careless distiller, lesson 07).

    ``labelled < 1`` is the scarce-label regime (with ``transfer="skills"``): gold answers for
    that fraction of the skill prompts, drawn by ``seed`` (:func:`utils.data.scarce_labels`).
    ``"sft"`` trains on those alone; ``"seq_kd"`` (sequence-level KD) and the KD methods also
    see every other prompt with the teacher's answer (:func:`utils.models.teacher_answers`).

    ``init``: start from the weights of another recipe's student of the same size (built
    first when it is not cached) instead of a random initialisation: GKD and MiniLLM start
    the distillation from a student fine-tuned on the data (``init=distill_recipe(size,
    "sft", ...)``). Its cache key is part of this recipe's key.
    All methods see the same data, steps, optimiser,
    schedule and seed; the distilled
    ones mix ``alpha * KD + (1 - alpha) * CE`` at ``temperature``. The defaults ARE lesson 03's
    live configuration. The cache key covers the shape, every setting, the recipe version and
    the sha256 of the tokenizer, the data manifest and the teacher's weights, so a new teacher
    builds new students. ``load_model(recipe)`` builds once (with a progress bar), then
    loads from the cache; the manifest's ``build_info`` holds ``train_seconds``.
    """
    _check_size(size)
    if method not in (*METHODS, SEQ_KD):
        raise ValueError(f"method must be one of {', '.join((*METHODS, SEQ_KD))}, got {method!r}")
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    labelled = float(labelled)
    if not 0.0 <= labelled <= 1.0:
        raise ValueError(f"labelled is the fraction of prompts with a gold answer, in [0, 1]: "
                         f"got {labelled}")
    if labelled < 1.0 and transfer != "skills":
        raise ValueError("labelled < 1 needs transfer='skills': the teacher's answers that "
                         "fill the unlabelled prompts exist for skill prompts only")
    if method == SEQ_KD and labelled == 1.0:
        raise ValueError("seq_kd fills the prompts without a gold answer with the teacher's; "
                         "with labelled=1.0 there are none (it would be SFT): give labelled < 1")
    if method == "sft" and labelled == 0.0:
        raise ValueError("sft with labelled=0 has no data to train on: give labelled > 0")
    if int(steps) <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if init is not None and (not isinstance(init, Recipe) or init.size != size):
        raise ValueError(f"init must be the recipe of a {size} student (e.g. "
                         f"distill_recipe({size!r}, 'sft', ...)), got "
                         f"{getattr(init, 'name', type(init).__name__)!r}")
    check_temperature(temperature)
    for what, value in (("alpha", alpha), ("lmbda", lmbda)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{what} must be in [0, 1], got {value}.")
    steps, batch_size, seed = int(steps), int(batch_size), int(seed)
    loss_type = METHOD_LOSS.get(method)  # seq_kd: None (SFT on teacher-filled data)
    # Settings that do not change what this method builds are left out of its key.
    settings: dict[str, Any] = {"method": method, "steps": steps, "batch_size": batch_size,
                                "lr": float(lr), "seed": seed}
    if loss_type is not None:
        settings.update(loss_type=loss_type, temperature=float(temperature), alpha=float(alpha))
    if method == "on_policy":
        settings.update(lmbda=float(lmbda), max_new_tokens=int(max_new_tokens))
    if transfer != "all":  # left out of the key when default: earlier builds keep their key
        settings["transfer"] = transfer
    fills = labelled < 1.0 and method != "sft"  # the teacher's answers fill unlabelled prompts
    if labelled < 1.0:
        settings["labelled"] = labelled
    if init is not None:  # left out of the key when absent: earlier builds keep their key
        settings["init"] = f"{init.name}-{init.key()}"
    tok_file = teacher_dir() / "tokenizer.json"
    extra = {**settings,
             "tokenizer_sha256": sha256_file_or_none(tok_file),
             "data_manifest_sha256": sha256_file_or_none(data_dir() / "world" / "manifest.json"),
             "teacher_sha256": (None if method == "sft" else
                                sha256_file_or_none(teacher_dir() / "model.safetensors"))}
    if fills:
        extra["teacher_answers_sha256"] = sha256_file_or_none(teacher_dir() / TEACHER_ANSWERS)

    def build(config: Any, progress: Any = None) -> tuple[Any, Any, dict]:
        # The key was computed when the recipe was made; refuse to build from other files.
        now = {"tokenizer_sha256": sha256_file_or_none(tok_file),
               "data_manifest_sha256": sha256_file_or_none(data_dir() / "world" / "manifest.json")}
        if method != "sft":
            now["teacher_sha256"] = sha256_file_or_none(teacher_dir() / "model.safetensors")
        if fills:
            now["teacher_answers_sha256"] = sha256_file_or_none(teacher_dir() / TEACHER_ANSWERS)
        changed = [k for k, v in now.items() if extra[k] != v]
        if changed:
            raise RuntimeError(f"the teacher, tokenizer or data changed on disk since this "
                               f"recipe was made ({', '.join(changed)}): call "
                               f"distill_recipe(...) again so the "
                               "cache key matches what would be built.")
        bar = bar_callback(progress, steps)
        teacher, tokenizer = load_model("teacher", verbose=False, progress=False)
        student = build_model(config, seed=seed)
        if init is not None:
            start, _ = load_model(init, verbose=False, progress=False)
            student.load_state_dict(start.state_dict())
            del start
        train = load_world("train")
        if transfer == "skills":
            train = train.filter(lambda r: r["kind"] == "skill")
        if labelled < 1.0:
            train = Dataset.from_list(scarce_labels(
                train.to_list(), labelled, seed=seed,
                fill=teacher_answers() if fills else None))
        common = dict(max_steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                      callbacks=[bar])
        if loss_type is None:
            result = train_lm(student, tokenizer, train, None, **common)
        else:
            result = distill_lm(student, teacher, tokenizer, train, None, loss_type=loss_type,
                                temperature=temperature, alpha=alpha,
                                lmbda=float(lmbda) if method == "on_policy" else 0.0,
                                max_new_tokens=max_new_tokens, **common)
        losses = result.train_losses
        info = {"train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "tokens_seen": result.tokens_seen,
                "final_train_loss": losses[-1][1] if losses else None,
                "torch_threads": torch.get_num_threads(), **settings}
        if isinstance(result, DistillResult):
            info["on_policy_steps"] = result.on_policy_steps
        return student, tokenizer, info

    label = {"sft": "trained on the data alone (SFT)", "forward_kl": "distilled with forward KL",
             "reverse_kl": "distilled with reverse KL",
             "on_policy": f"distilled on-policy (GKD, lmbda={lmbda:g}, reverse KL)",
             SEQ_KD: "distilled on the teacher's answers (sequence-level KD)"}[method]
    on = "" if transfer == "all" else " on skill chats only"
    if labelled < 1.0:
        on += f", gold answers for {labelled:.0%} of the prompts"
    lab = "" if labelled == 1.0 else f"-gold{labelled:g}"
    if init is not None:
        on += f", starting from {init.name}"
        lab += "-from-" + init.name.removeprefix(f"{size}-").split("-")[0]
    return make_recipe(name or f"{size}-{method.replace('_', '-')}"
                           f"{'' if transfer == 'all' else '-' + transfer}{lab}"
                           f"-seed{seed}", size, build, DISTILL_RECIPE_VERSION,
                           description=f"{size} {label}{on} for {steps} steps, seed {seed}",
                           extra=extra)


# --------------------------------------------------------------------------------------
# Lesson 04: a student distilled through the teacher's API (black box)
# --------------------------------------------------------------------------------------

BLACKBOX_RECIPE_VERSION = "1"  # bump when blackbox_recipe's harvest or training code changes


def blackbox_recipe(*, queries: int | None = 96, granularity: Granularity = "topk",
                    seed: int = 0, watermark: bool = False,
                    watermark_bias: float = WATERMARK_BIAS, size: str = "student-xxs",
                    steps: int = 150, batch_size: int = 32, lr: float = 3e-3,
                    top_k: int | None = 10, max_tokens: int = 48, min_tokens: int | None = None,
                    temperature: float = 0.0, mix: str = "skills",
                    name: str | None = None) -> Any:
    """The recipe of a student distilled from the teacher *through its API* (lesson 04).

    The defaults are lesson 04's live student (its parameters cell), the one lesson 07's grid
    loads from the cache that lesson fills (``tests/test_lesson04.py`` keeps the two equal).

    The build harvests ``queries`` answers to ordinary skill prompts (train split, never a
    safety prompt) from the teacher served on 127.0.0.1 (:func:`cached_harvest`: start the
    API, query with the ``openai`` client, stop it), then trains zoo size ``size`` from
    scratch for ``steps`` steps:

    - ``granularity="text"``: sequence-level KD, SFT on the answers' text
      (:func:`utils.train.train_lm`; Kim & Rush 2016, the DeepSeek-R1-distill recipe);
    - ``granularity="topk"``: token-level KD on the top-``top_k`` logprobs
      (:func:`distill_from_topk` with :func:`sparse_kd_loss`).

    ``top_k`` is what the harvest asks for; ``granularity`` what the student learns from. With
    the same ``top_k`` a text student and a top-k student share one harvest (the same answers:
    only the granularity differs); ``top_k=None`` harvests text only (text students).

    ``mix`` is what the attacker asks and keeps (:func:`utils.extraction.mix_prompts`):
    ``"skills"`` (ordinary tasks only), ``"safety"`` (tasks mixed with restricted requests,
    look-alikes and jailbreaks; the API's refusals are kept) or ``"safety-filtered"`` (the same
    harvest, refusals dropped before training). ``queries=None`` asks every prompt of the mix:
    then every seed trains on the one complete harvest (the seed changes the student's
    initialisation and batch order, not what the API said).

    ``watermark=True`` puts a Kirchenbauer et al. (2023) watermark on the API
    (:func:`watermark_config` with ``watermark_bias``). The cache key covers every argument,
    the tokenizer's, the data manifest's and the teacher weights' sha256.
    ``load_model(recipe)`` builds once.
    """
    if granularity not in ("text", "topk"):
        raise ValueError(f"granularity must be 'text' or 'topk', got {granularity!r}")
    _check_size(size)
    if queries is not None and queries < 1:
        raise ValueError(f"queries must be >= 1 (or None: every prompt), got {queries}")
    if mix not in HARVEST_MIXES:
        raise ValueError(f"mix must be one of {', '.join(HARVEST_MIXES)}, got {mix!r}")
    if granularity == "topk" and not top_k:
        raise ValueError("granularity='topk' needs top_k >= 1 logprobs per token")
    k = top_k
    extra = {"queries": queries, "granularity": granularity, "top_k": k, "seed": seed,
             "watermark": watermark_bias if watermark else None, "steps": steps,
             "batch_size": batch_size, "lr": lr,
             "max_tokens": max_tokens, "min_tokens": min_tokens, "temperature": temperature,
             **teacher_fingerprint()}
    if mix != "skills":  # left out of the key when default: earlier builds keep their key
        extra["mix"] = mix
    harvest_seed = seed if queries is not None else 0  # every prompt: one harvest for all seeds

    def build(config: Any, progress: Any = None) -> tuple[Any, Any, dict]:
        teacher, tokenizer = load_model("teacher", verbose=False)
        defences = Defences(watermark=watermark_config(watermark_bias) if watermark else None)
        # the whole shuffled prompt list: every budget is a prefix of one cached harvest
        prompts = mix_prompts(mix, "train", seed=harvest_seed)
        asked = cached_harvest(prompts, budget=len(prompts) if queries is None else queries,
                               top_logprobs=k, max_tokens=max_tokens, min_tokens=min_tokens,
                               temperature=temperature, seed=harvest_seed, defences=defences,
                               model=teacher, tokenizer=tokenizer, progress=False)
        records = keep_for_training(asked, mix)
        bar = bar_callback(progress, steps)
        student = build_model(config, seed=seed)
        if granularity == "text":
            result = train_lm(student, tokenizer, Dataset.from_list(sft_examples(records)),
                              max_steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              progress=False, callbacks=[bar], max_length=256)
        else:
            result = distill_from_topk(student, tokenizer, records, max_steps=steps,
                                       batch_size=batch_size, lr=lr, seed=seed,
                                       callbacks=[bar])
        losses = result.train_losses
        info = {"queries_answered": len(asked), "records_kept": len(records),
                "train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "method": f"blackbox-{granularity}", "transfer": mix, "granularity": granularity,
                "batch_size": batch_size, "lr": lr, "seed": seed, "queries": queries,
                "top_k": k, "max_tokens": max_tokens, "torch_threads": torch.get_num_threads(),
                "completion_tokens": sum(r.completion_tokens for r in records),
                "final_train_loss": losses[-1][1] if losses else None}
        return student, tokenizer, info

    wm = "-wm" if watermark else ""
    q = "all" if queries is None else queries
    m = "" if mix == "skills" else f"-{mix}"
    default = f"{size}-blackbox-{granularity}-q{q}{m}{wm}-s{seed}"
    asked_for = "every" if queries is None else str(queries)
    return make_recipe(name or default, size, build, BLACKBOX_RECIPE_VERSION,
                       description=f"{size} distilled through the API from {asked_for} "
                                   f"{granularity} answers ({mix} prompts)", extra=extra)


# --------------------------------------------------------------------------------------
# Lesson 03: the any-letter skill (several right answers, utils.multi_answer)
# --------------------------------------------------------------------------------------

ANY_LETTER_RECIPE_VERSION = "1"  # bump when the any-letter recipes' code changes what they build
ANY_LETTER_TEACHER = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "samples_per_word": 4,
                      "seed": 0}
ANY_LETTER_METHODS = ("sft", "seq_kd", "forward_kl", "reverse_kl", "on_policy")
# GKD on the any-letter skill: the answer is "Answer: <letter>" and an end token, so a few
# sampled tokens hold the whole reply (the world recipes' 48 would only cost time)
ANY_LETTER_MAX_NEW_TOKENS = 8
ANY_LETTER_START = "student-xs-sft"  # the students start from this shipped student
ANY_LETTER_TEACHER_DIR = "teacher-any-letter"  # data/models/<this>: experiments_03_multi_answer


def any_letter_teacher_dir() -> Any:
    """Where the shipped any-letter teacher lives: ``data/models/teacher-any-letter/``."""
    return data_dir() / "models" / ANY_LETTER_TEACHER_DIR


def load_any_letter_teacher() -> tuple[Any, Any]:
    """The shipped any-letter teacher, verified against its sha256 manifest, then loaded."""
    from utils.models import ModelNotFoundError, verify_shipped

    folder = any_letter_teacher_dir()
    if not (folder / "manifest.json").is_file():
        raise ModelNotFoundError(f"no any-letter teacher in {folder}: build it with "
                                 "`python scripts/experiments_03_multi_answer.py --teacher-only`")
    verify_shipped(folder)
    return load_model(folder, verbose=False, progress=False)


def any_letter_teacher_recipe(*, steps: int = ANY_LETTER_TEACHER["steps"],
                              batch_size: int = ANY_LETTER_TEACHER["batch_size"],
                              lr: float = ANY_LETTER_TEACHER["lr"],
                              samples_per_word: int = ANY_LETTER_TEACHER["samples_per_word"],
                              seed: int = ANY_LETTER_TEACHER["seed"]) -> Recipe:
    """The shipped teacher fine-tuned on the any-letter skill (:mod:`utils.multi_answer`).

    It sees ``samples_per_word`` independent right answers for every training word, so it can
    learn the *distribution* of right answers, which no one-answer-per-prompt dataset shows.
    Fine-tuned on this skill alone it forgets some of the world's others; lesson 03 uses it for
    this skill only. About 10 min on two cores: `scripts/experiments_03_multi_answer.py` builds
    it once and commits it to ``data/models/teacher-any-letter/`` with its manifest.
    """
    import random

    from utils.models import teacher_config
    from utils.multi_answer import FRAMES, chat_record, words

    for what, value in (("steps", steps), ("batch_size", batch_size),
                        ("samples_per_word", samples_per_word)):
        if int(value) <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
    extra = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
             "samples_per_word": int(samples_per_word), "seed": int(seed),
             "teacher_sha256": sha256_file_or_none(teacher_dir() / "model.safetensors"),
             "tokenizer_sha256": sha256_file_or_none(teacher_dir() / "tokenizer.json")}

    def build(config: Any, progress: Any = None) -> tuple[Any, Any, dict]:
        bar = bar_callback(progress, steps)
        teacher, tokenizer = load_model("teacher", verbose=False, progress=False)
        rng = random.Random(seed)
        records = [chat_record(w, rng.choice(w), frame=rng.randrange(len(FRAMES)))
                   for w in words("train") for _ in range(samples_per_word)]
        rng.shuffle(records)
        result = train_lm(teacher, tokenizer, Dataset.from_list(records), None,
                          max_steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          progress=False, callbacks=[bar])
        losses = result.train_losses
        info = {"train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "examples": len(records), "torch_threads": torch.get_num_threads(),
                "final_train_loss": losses[-1][1] if losses else None}
        return teacher, tokenizer, info

    return make_recipe("teacher-any-letter", teacher_config(), build, ANY_LETTER_RECIPE_VERSION,
                       description=f"the shipped teacher fine-tuned on the any-letter skill for "
                                   f"{steps} steps, {samples_per_word} answers per word",
                       extra=extra)


def any_letter_student_recipe(method: str, *, n_words: int, steps: int, seed: int,
                              batch_size: int = DISTILL_DEFAULTS["batch_size"],
                              lr: float = DISTILL_DEFAULTS["lr"],
                              init: str = ANY_LETTER_START) -> Recipe:
    """A small student taught the any-letter skill by ``method`` (lesson 03, section 4).

    It starts from the shipped ``init`` student (it knows the world, not this skill) and sees
    ``n_words`` training words drawn by ``seed``, with the same steps, batch, optimiser and
    order for every method:

    - ``"sft"``: the labelled data, one right answer per word (:func:`gold_records`);
    - ``"seq_kd"``: the any-letter teacher's greedy answer per word (Kim & Rush 2016);
    - ``"forward_kl"`` / ``"reverse_kl"``: the labelled chats with the teacher's whole
      next-token distribution as the target (``alpha=1``: the one sampled label adds nothing
      the teacher's distribution does not already say, and would pull towards one answer);
    - ``"on_policy"``: GKD (Agarwal et al. 2024) as :func:`distill_recipe` runs it, reverse KL
      with a share ``DISTILL_DEFAULTS["lmbda"]`` of the batches replaced by the student's own
      sampled answers, scored token by token by the teacher.
    """
    import random

    from utils.multi_answer import (
        gold_records,
        letter_token_ids,
        next_letter_probs,
        sampled_records,
        words,
    )

    if method not in ANY_LETTER_METHODS:
        raise ValueError(f"method must be one of {', '.join(ANY_LETTER_METHODS)}, "
                         f"got {method!r}")
    pool = words("train")
    if not 1 <= int(n_words) <= len(pool):
        raise ValueError(f"n_words must be in [1, {len(pool)}], got {n_words}")
    if int(steps) <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    start = students_dir() / init
    teacher_weights = any_letter_teacher_dir() / "model.safetensors"
    extra = {"method": method, "n_words": int(n_words), "steps": int(steps), "seed": int(seed),
             "batch_size": int(batch_size), "lr": float(lr), "init": init,
             "init_sha256": sha256_file_or_none(start / "model.safetensors"),
             "teacher_sha256": None if method == "sft" else sha256_file_or_none(teacher_weights)}
    if method == "on_policy":  # only here, so the other methods' cache keys stay as they were
        extra.update(lmbda=float(DISTILL_DEFAULTS["lmbda"]),
                     max_new_tokens=ANY_LETTER_MAX_NEW_TOKENS)

    def build(config: Any, progress: Any = None) -> tuple[Any, Any, dict]:
        bar = bar_callback(progress, steps)
        student, tokenizer = load_model(init, verbose=False, progress=False)
        chosen = random.Random(seed).sample(pool, int(n_words))
        data = gold_records(chosen, seed=seed)
        common = dict(max_steps=int(steps), batch_size=batch_size, lr=lr, seed=seed,
                      progress=False, callbacks=[bar])
        if method == "sft":
            result = train_lm(student, tokenizer, Dataset.from_list(data), None, **common)
        else:
            teacher, _ = load_any_letter_teacher()
            if method == "seq_kd":
                ids = letter_token_ids(tokenizer)
                by_id = {v: k for k, v in ids.items()}
                top = next_letter_probs(teacher, tokenizer, chosen).argmax(-1).tolist()
                greedy = [by_id.get(t) for t in top]
                if None in greedy:
                    raise RuntimeError("the any-letter teacher's greedy answer is not a letter: "
                                       "rebuild it (scripts/experiments_03_multi_answer.py)")
                data = sampled_records(chosen, greedy, seed=seed, source="teacher-greedy")
                result = train_lm(student, tokenizer, Dataset.from_list(data), None, **common)
            else:
                gkd = method == "on_policy"
                result = distill_lm(student, teacher, tokenizer, Dataset.from_list(data), None,
                                    loss_type="reverse_kl" if gkd else method, alpha=1.0,
                                    lmbda=extra["lmbda"] if gkd else 0.0,
                                    max_new_tokens=ANY_LETTER_MAX_NEW_TOKENS, **common)
        losses = result.train_losses
        info = {"train_seconds": round(result.train_seconds, 2), "steps": result.steps,
                "torch_threads": torch.get_num_threads(), **extra,
                "final_train_loss": losses[-1][1] if losses else None}
        return student, tokenizer, info

    return make_recipe(f"any-letter-{method.replace('_', '-')}-n{int(n_words)}-seed{int(seed)}",
                       "student-xs", build, ANY_LETTER_RECIPE_VERSION,
                       description=f"{init} taught the any-letter skill by {method} on "
                                   f"{n_words} words for {steps} steps, seed {seed}",
                       extra=extra)
