"""The course's model family, its zoo of named sizes, model cards and loading.

Teacher and students are configs of ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, the
architectures of real distilled open-weight models (lesson 02). No copied model classes.

- :class:`ModelConfig` -> :func:`build_model`: a fresh model of a given shape.
- :data:`ZOO`: named sizes. ``"teacher"`` is the shipped model in ``data/models/teacher/``
  (``make teacher``); the students are 4x to 16x smaller, sized against the teacher's real
  config (:func:`zoo_config`, :func:`zoo_table`).
- :func:`load_model`: the one way to get ``(model, tokenizer)``: a recipe (built once, then
  loaded from the cache of :mod:`utils.model_cache`), the shipped teacher and students
  (verified against their sha256 manifests), a local folder or a hub id, always with
  ``from_pretrained`` on safetensors (never ``trust_remote_code``), only the course's
  architectures unless asked, and a clear error naming the fix for anything wrong.
- :func:`register_recipe`: give a learner's own recipe a name for :func:`load_model`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from utils.io import sha256_file
from utils.model_cache import BuildFn, Recipe, load_or_build, verify_folder
from utils.paths import data_dir

Architecture = Literal["llama", "qwen2"]


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a recipe, a zoo name, a local folder nor reachable on the hub,
    or a folder this course will not load (another architecture, pickled weights)."""


class CorruptModelError(RuntimeError):
    """A model folder whose files do not match their manifest or do not load cleanly."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides a model's shape. Introduced in lesson 02."""

    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # None: about 8/3 * hidden_size, as in Llama
    max_position_embeddings: int = 256
    architecture: Architecture = "llama"
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}: pick sizes so that head_dim is an integer")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}")
        if self.architecture not in ("llama", "qwen2"):
            raise ValueError(f"architecture must be 'llama' or 'qwen2', got {self.architecture!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, hf: PretrainedConfig | dict) -> ModelConfig:
        """The shape of a saved model, read back from its transformers config."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"model_type {arch!r} is not in the course's family (llama, qwen2)")

        def _one(v: Any) -> Any:  # special-token ids may be saved as lists
            return v[0] if isinstance(v, list) and v else v

        rope = d.get("rope_theta")
        if rope is None:
            rope = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads"),
            intermediate_size=d.get("intermediate_size"),
            max_position_embeddings=d.get("max_position_embeddings", 256),
            architecture=arch,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            rope_theta=float(rope),
            pad_token_id=_one(d.get("pad_token_id")),
            bos_token_id=_one(d.get("bos_token_id")),
            eos_token_id=_one(d.get("eos_token_id")),
        )

    def hf_config(self) -> PretrainedConfig:
        """The transformers config for this shape."""
        intermediate = self.intermediate_size or _round_up(8 * self.hidden_size // 3, 16)
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.architecture == "llama":
            return LlamaConfig(**common)
        return Qwen2Config(**common)


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


def build_model(config: ModelConfig, *, seed: int | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM of the given shape (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    hf = config.hf_config()
    cls = LlamaForCausalLM if config.architecture == "llama" else Qwen2ForCausalLM
    return cls(hf)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------------------
# Anatomy: where the parameters are (lesson 02)
# --------------------------------------------------------------------------------------

_PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head")


def lm_head_is_tied(model: torch.nn.Module) -> bool:
    """True when the output layer shares its weight with the input embeddings."""
    head = getattr(model, "lm_head", None)
    get_emb = getattr(model, "get_input_embeddings", None)
    if head is None or get_emb is None:
        return False
    return head.weight is get_emb().weight or head.weight.data_ptr() == get_emb().weight.data_ptr()


def parameters_by_part(model: torch.nn.Module) -> dict[str, int]:
    """Unique parameters by part: embeddings, attention, MLP, norms, LM head (lesson 02).

    A tied LM head shares the embedding matrix, so it adds 0 here (see
    :func:`lm_head_is_tied`); the values sum to :func:`count_parameters`. Anything that fits
    none of the parts (there is nothing in Llama/Qwen2) is reported as ``other``.
    """
    counts = dict.fromkeys(_PARTS, 0)
    counts["other"] = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name or "wte" in name:
            part = "embeddings"
        elif "self_attn" in name or ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "mlp"
        elif "norm" in name:
            part = "norms"
        elif name.startswith("lm_head"):
            part = "lm_head"
        else:
            part = "other"
        counts[part] += p.numel()
    if not counts["other"]:
        del counts["other"]
    return counts


def estimate_parameters(config: ModelConfig) -> int:
    """Parameter count of ``build_model(config)`` by formula, without building it.

    Per layer: attention ``2 H^2 + 2 H d_kv`` (+ q/k/v biases in Qwen2), MLP ``3 H I``, two
    RMSNorms ``2 H``; plus embeddings ``V H``, a final norm ``H`` and, untied, an LM head ``V H``.
    """
    hf = config.hf_config()
    h, inter, v = hf.hidden_size, hf.intermediate_size, hf.vocab_size
    head_dim = h // hf.num_attention_heads
    kv = hf.num_key_value_heads * head_dim
    attn = 2 * h * h + 2 * h * kv
    if config.architecture == "qwen2":
        attn += h + 2 * kv  # q, k and v projections carry biases
    per_layer = attn + 3 * h * inter + 2 * h
    total = v * h + config.num_layers * per_layer + h
    if not config.tie_word_embeddings:
        total += v * h
    return total


# --------------------------------------------------------------------------------------
# The zoo: named sizes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A named size. ``target_ratio``: how many times fewer parameters than the teacher."""

    name: str
    description: str
    target_ratio: float | None = None


ZOO: dict[str, ZooEntry] = {
    "teacher": ZooEntry("teacher", "the shipped teacher in data/models/teacher/ (make teacher)"),
    "student-s": ZooEntry("student-s", "small student, about 4x fewer parameters", 4.0),
    "student-xs": ZooEntry("student-xs", "extra-small student, about 10x fewer parameters", 10.0),
    "student-xxs": ZooEntry("student-xxs", "tiny student, about 16x fewer parameters", 16.0),
}


def teacher_dir() -> Path:
    """Where the shipped teacher lives: ``data/models/teacher/`` (``DD_TEACHER_DIR`` overrides)."""
    override = os.environ.get("DD_TEACHER_DIR")
    return Path(override) if override else data_dir() / "models" / "teacher"


def students_dir() -> Path:
    """Where the shipped trained students live: ``data/models/students/<name>/``.

    Built by ``make students`` (``scripts/experiments_03.py --ship``): lesson 03's students
    trained for a budget too long for a notebook, each with a ``model_card.json`` holding its
    scores and provenance. ``load_model("<name>")`` loads one.
    """
    return data_dir() / "models" / "students"


def shipped_students() -> list[str]:
    """Names of the shipped trained students (folders of :func:`students_dir` with a model)."""
    root = students_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and (p / "config.json").is_file())


def local_folder(name_or_path: str | os.PathLike) -> Path:
    """The folder a local model loads from: the shipped teacher, a shipped student, or a path."""
    name = os.fspath(name_or_path)
    if name == "teacher":
        return teacher_dir()
    if name in shipped_students():
        return students_dir() / name
    return Path(name).expanduser()


def student_card(name: str) -> dict[str, Any]:
    """The model card (``model_card.json``) of a shipped student: scores and provenance."""
    card = students_dir() / name / "model_card.json"
    if not card.is_file():
        raise ModelNotFoundError(
            f"no shipped student {name!r} (no {card}). "
            f"Shipped: {', '.join(shipped_students()) or 'none'}. "
            "Fix: build them with `make students`, "
            "or restore data/models/students/ from the repository."
        )
    return json.loads(card.read_text(encoding="utf-8"))


def teacher_config(path: str | os.PathLike | None = None) -> ModelConfig:
    """The shipped teacher's shape, read from its ``config.json``."""
    folder = Path(path) if path is not None else teacher_dir()
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelNotFoundError(
            f"the shipped teacher is missing: no {cfg}. Fix: build it once with `make teacher` "
            "(or restore data/models/teacher/ from the repository)."
        )
    return ModelConfig.from_hf_config(json.loads(cfg.read_text(encoding="utf-8")))


def teacher_card(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The shipped teacher's model card (``model_card.json``): its metrics and provenance."""
    folder = Path(path) if path is not None else teacher_dir()
    card = folder / "model_card.json"
    if not card.is_file():
        raise ModelNotFoundError(f"no model card at {card}. Fix: rebuild with `make teacher`.")
    return json.loads(card.read_text(encoding="utf-8"))


def recorded_responses(name_or_path: str | os.PathLike = "teacher") -> list[dict[str, Any]]:
    """Every test response a shipped model's card was scored from (``test_responses.jsonl``).

    ``name_or_path`` is ``"teacher"``, a shipped student's name or a model folder. Each row has
    the test record's ``id``, ``kind``, ``skill``, ``category`` and ``answer``, the model's
    ``response``, and whether it was ``correct`` and ``refused``.
    """
    path = local_folder(name_or_path) / "test_responses.jsonl"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no recorded responses at {path}. Fix: they are written with the model by "
            "`make teacher` or `make students` (or restore data/models/ from the repository)."
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


TEACHER_ANSWERS = "train_answers.json"  # scripts/teacher_answers.py writes it beside the teacher


def teacher_answers(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The teacher's greedy answer to every training skill prompt, by record ``id``.

    Written by ``scripts/teacher_answers.py`` (``make teacher-answers``) with the sha256 of
    the weights that wrote it; refused when the shipped teacher has changed since. Lesson 03's
    sequence-level KD fills the prompts without a gold answer with these.
    """
    folder = Path(path) if path is not None else teacher_dir()
    file = folder / TEACHER_ANSWERS
    fix = "Fix: `make teacher-answers` (or restore data/models/teacher/ from the repository)."
    if not file.is_file():
        raise ModelNotFoundError(f"the teacher's training answers are missing: no {file}. {fix}")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
        answers = {row["id"]: row["text"] for row in payload["answers"]}
        written_by = payload["teacher_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptModelError(f"{file} is unreadable ({err}). {fix}") from err
    weights = folder / "model.safetensors"
    if weights.is_file() and sha256_file(weights) != written_by:
        raise CorruptModelError(f"{file} was written by another teacher than the one in "
                                f"{folder} (weights sha256 differ). {fix}")
    return answers


def student_config(teacher: ModelConfig, ratio: float) -> ModelConfig:
    """A student shape with about ``ratio`` times fewer parameters than ``teacher``.

    Keeps the teacher's vocabulary, architecture, MLP width ratio and (about) its head size;
    searches depth (2..teacher depth) and width (multiples of 8) for the parameter count
    within 6% of ``teacher / ratio`` whose width/depth proportion is closest to the
    teacher's (else the closest count).
    """
    if ratio < 1:
        raise ValueError(f"ratio is how many times smaller the student is: got {ratio}, want >= 1")
    head_dim = teacher.hidden_size // teacher.num_heads
    t_inter = teacher.hf_config().intermediate_size
    t_params = estimate_parameters(teacher)
    t_aspect = math.log(teacher.hidden_size / teacher.num_layers)
    kv_share = (teacher.num_kv_heads or teacher.num_heads) / teacher.num_heads
    best: tuple[tuple[float, float], ModelConfig] | None = None
    # at least two layers: one attention layer cannot compose heads (no induction heads)
    for layers in range(min(2, teacher.num_layers), teacher.num_layers + 1):
        for hidden in range(8, teacher.hidden_size + 1, 8):
            heads = max(1, round(hidden / head_dim))
            while hidden % heads or (hidden // heads) % 2:  # RoPE wants an even head size
                heads -= 1
            kv = max(1, round(heads * kv_share))
            while heads % kv:
                kv -= 1
            cand = replace(
                teacher, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=None if kv == heads else kv,
                intermediate_size=_round_up(max(8, hidden * t_inter // teacher.hidden_size), 8),
            )
            err = abs(math.log(t_params / estimate_parameters(cand) / ratio))
            aspect = abs(math.log(hidden / layers) - t_aspect)
            # within 6% of the target any shape will do: take the teacher-like proportions
            score = (0, aspect) if err < math.log(1.06) else (1, err)
            if best is None or score < best[0]:
                best = (score, cand)
    assert best is not None
    return best[1]


def zoo_config(name: str, *, teacher: ModelConfig | None = None) -> ModelConfig:
    """The config of a zoo size; students are sized against the shipped teacher's config."""
    if name not in ZOO:
        raise KeyError(f"{name!r} is not a zoo size; the zoo has: {', '.join(ZOO)}")
    t = teacher if teacher is not None else teacher_config()
    entry = ZOO[name]
    return t if entry.target_ratio is None else student_config(t, entry.target_ratio)


def zoo_table(*, teacher: ModelConfig | None = None) -> list[dict[str, Any]]:
    """One row per zoo size: shape, parameter count and ratio to the teacher (for a table)."""
    t = teacher if teacher is not None else teacher_config()
    t_params = estimate_parameters(t)
    rows = []
    for name in ZOO:
        c = zoo_config(name, teacher=t)
        n = estimate_parameters(c)
        rows.append({"name": name, "layers": c.num_layers, "hidden": c.hidden_size,
                     "heads": c.num_heads, "intermediate": c.hf_config().intermediate_size,
                     "parameters": n, "times_smaller": round(t_params / n, 2)})
    return rows


# --------------------------------------------------------------------------------------
# Named recipes and loading
# --------------------------------------------------------------------------------------

COURSE_ARCHITECTURES = ("llama", "qwen2")  # config.json model_type of the course's family

RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, config: ModelConfig | str, build_fn: BuildFn, version: str = "1",
                    *, description: str = "", extra: dict[str, Any] | None = None) -> Recipe:
    """Give a recipe a name, so ``load_model(name)`` builds it (once, then from the cache).

    ``config`` is a :class:`ModelConfig` or a zoo size name such as ``"student-xs"``.
    Registering a name again replaces the recipe (a notebook cell run twice is fine). The
    course's own recipes (:mod:`utils.recipes`) are not registered: pass the :class:`Recipe`
    itself to :func:`load_model`.
    """
    if name == "teacher":
        raise ValueError("'teacher' is the shipped model (make teacher); pick another name")
    recipe = make_recipe(name, config, build_fn, version, description=description, extra=extra)
    RECIPES[name] = recipe
    return recipe


def make_recipe(name: str, config: ModelConfig | str, build_fn: BuildFn, version: str = "1",
                *, description: str = "", extra: dict[str, Any] | None = None) -> Recipe:
    """A :class:`utils.model_cache.Recipe` whose config may be given as a zoo size name."""
    resolved = zoo_config(config) if isinstance(config, str) else config
    return Recipe(name, resolved, build_fn, str(version), description, dict(extra or {}),
                  size=config if isinstance(config, str) else None)


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _zoo_names() -> str:
    names = list(ZOO) + shipped_students() + [n for n in RECIPES if n not in ZOO]
    return ", ".join(names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _shipped_fix(folder: Path) -> str:
    """How to restore a shipped model folder: from git, or by rebuilding it."""
    make = "make teacher" if folder.resolve() == teacher_dir().resolve() else "make students"
    try:
        rel = folder.resolve().relative_to(data_dir().resolve().parent)
    except ValueError:
        rel = folder
    return (f"Fix: restore it with `git checkout -- {rel}/` (a clean copy from the "
            f"repository), or rebuild it with `{make}`.")


def verify_shipped(folder: str | os.PathLike) -> None:
    """Raise :class:`CorruptModelError` unless a shipped model folder (``data/models/...``)
    matches its sha256 manifest: a changed byte of the weights is never loaded silently."""
    folder = Path(folder)
    problem = verify_folder(folder)
    if problem is not None:
        raise CorruptModelError(f"the shipped model in {folder} is {problem}, so it is not "
                                f"loaded. {_shipped_fix(folder)}")


def _check_architecture(model_type: Any, where: str, any_architecture: bool) -> None:
    if any_architecture or model_type in COURSE_ARCHITECTURES:
        return
    raise ModelNotFoundError(
        f"{where} holds a {model_type!r} model, not one of the course's causal LM "
        f"architectures ({', '.join(COURSE_ARCHITECTURES)}). Loading it as a causal LM could "
        "give a model with freshly initialised (random) weights. Fix: pass the folder of a "
        "Llama- or Qwen2-style model, or load_model(..., any_architecture=True) if you mean it "
        "(safetensors only, never remote code).")


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    """Missing, unexpected or mismatched weights are an error, not a random init."""
    parts = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or [])
        if names:
            parts.append(f"{len(names)} {what} (e.g. {', '.join(names[:3])})")
    if parts:
        raise CorruptModelError(
            f"the weights in {where} do not fit its config.json: {'; '.join(parts)} tensors. "
            "Those weights would be random, so the model is not loaded. Fix: save the model "
            "and its config together with `model.save_pretrained(folder)`, or pass the folder "
            "that was saved that way.")


def _load_pretrained(folder: Path, *, any_architecture: bool = False
                     ) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"{folder} is a folder but not a saved model (no config.json in it). Fix: pass the "
            "folder that `model.save_pretrained(...)` wrote."
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise CorruptModelError(f"{config_file} is not valid JSON ({_first_line(exc)}). Fix: "
                                "save the model again with "
                                "`model.save_pretrained(folder)`.") from None
    _check_architecture(model_type, str(folder), any_architecture)
    if not list(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        why = f"it holds pickled weights {pickled}" if pickled else "it holds no weights"
        raise ModelNotFoundError(
            f"{folder} has no safetensors weights: {why}. This course loads safetensors only "
            "(pickle can run code). Fix: load it once in a trusted session and re-save it with "
            "`model.save_pretrained(folder)`."
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - every library failure becomes the course's error
        if "mismatched_sizes" in str(exc):  # transformers refuses tensors of the wrong shape
            _check_loading_info({"mismatched_keys": ["(see the shapes in config.json)"]},
                                str(folder))
        raise CorruptModelError(
            f"the model in {folder} could not be loaded: {type(exc).__name__}: "
            f"{_first_line(exc)}. The weights file is probably truncated or damaged. Fix: save "
            "it again with `model.save_pretrained(folder)`, or restore it from where it came "
            "from (for the course's models: `git checkout -- data/models/`).") from None
    _check_loading_info(info, str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a library error becomes the course's error
        raise ModelNotFoundError(
            f"{folder} holds a model but no usable tokenizer ({_first_line(exc)}). Fix: save "
            "the tokenizer beside it with `tokenizer.save_pretrained(folder)`."
        ) from None
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str | os.PathLike | Recipe, *,
               builder: Recipe | BuildFn | None = None, config: ModelConfig | str | None = None,
               version: str = "1", rebuild: bool = False, progress: bool = True,
               device: str | torch.device | None = None, verbose: bool = True,
               any_architecture: bool = False) -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)`` for a recipe, a zoo name, a local folder or a hub id.

    - a :class:`utils.model_cache.Recipe` (e.g. ``utils.recipes.distill_recipe(...)``), a
      registered recipe name (:func:`register_recipe`), or any name with ``builder=``: built on
      first use with a progress bar, then loaded from the cache (verified against its
      manifest; a corrupt or partial entry is rebuilt with a message). With a bare function as
      ``builder``, ``config`` (a :class:`ModelConfig` or a zoo size; default: the zoo size of
      the same name) and ``version`` complete the recipe.
    - ``"teacher"``: the shipped model in ``data/models/teacher/``; a shipped trained student
      (:func:`shipped_students`). Both are verified against their sha256 manifest first.
    - a local folder: ``from_pretrained`` on it (safetensors only).
    - a hub id: ``from_pretrained`` unless offline (``HF_HUB_OFFLINE=1``), never with
      ``trust_remote_code``.

    Only the course's architectures (Llama, Qwen2) load unless ``any_architecture=True``;
    missing or mismatched weights are an error. Every failure raises
    :class:`ModelNotFoundError` or :class:`CorruptModelError` with a message naming the fix.
    """
    if isinstance(name_or_path, Recipe):
        builder, name_or_path = name_or_path, name_or_path.name
    name = os.fspath(name_or_path)
    log = print if verbose else (lambda _msg: None)
    recipe: Recipe | None = None
    if isinstance(builder, Recipe):
        recipe = builder
    elif builder is not None:
        cfg = config if config is not None else name
        if isinstance(cfg, str) and cfg not in ZOO:
            raise ValueError(f"builder= for {name!r} needs config=: a ModelConfig or a zoo size "
                             f"({', '.join(ZOO)})")
        recipe = make_recipe(name, cfg, builder, str(version))
    elif name in RECIPES:
        recipe = RECIPES[name]

    if recipe is not None:
        model, tokenizer = load_or_build(recipe, _load_pretrained, rebuild=rebuild,
                                         show_progress=progress, log=log)
    elif name == "teacher":
        if not (teacher_dir() / "config.json").is_file():
            raise ModelNotFoundError(
                f"the shipped teacher is missing: no model in {teacher_dir()}. Fix: build it "
                "once with `make teacher` (about the time its model card states), or restore "
                "data/models/teacher/ from the repository."
            )
        verify_shipped(teacher_dir())
        model, tokenizer = _load_pretrained(teacher_dir())
    elif name in shipped_students():
        verify_shipped(students_dir() / name)
        model, tokenizer = _load_pretrained(students_dir() / name)
    elif name in ZOO:
        raise ModelNotFoundError(
            f"{name!r} is a zoo size but no recipe builds it yet. Fix: "
            f"register_recipe({name!r}, {name!r}, build_fn, version='1') or pass builder=. "
            f"Registered recipes: {', '.join(RECIPES) or 'none'}."
        )
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            model, tokenizer = _load_pretrained(path, any_architecture=any_architecture)
        elif path.exists():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json "
                                     "and the .safetensors weights.")
        else:
            model, tokenizer = _load_from_hub(name, any_architecture=any_architecture)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _load_from_hub(name: str, *, any_architecture: bool = False
                   ) -> tuple[PreTrainedModel, Any]:
    looks_like_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
    where = (f"not a zoo name (zoo: {_zoo_names()}), not a local folder "
             f"(nothing at {Path(name).expanduser().resolve()})")
    if _hub_offline() or not looks_like_hub:
        why = ("and offline mode forbids the hub (HF_HUB_OFFLINE=1)" if _hub_offline()
               else "and it does not look like a hub id (owner/name)")
        raise ModelNotFoundError(
            f"no model at {name!r}: it is {where}, {why}. Fix: use a zoo name, pass the folder "
            "that save_pretrained wrote, or download the hub model once while online "
            "(then pass its local folder)."
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        hub_config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        _check_architecture(hub_config.model_type, f"the hub repository {name!r}",
                            any_architecture)
        model, info = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=False, use_safetensors=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except ModelNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - a library error becomes the course's error
        raise ModelNotFoundError(
            f"no model at {name!r}: it is {where}, and the hub could not provide it "
            f"({_first_line(exc)}). Fix: check the id and your connection, or pass a local "
            "folder."
        ) from None
    _check_loading_info(info, f"the hub repository {name!r}")
    model.eval()
    return model, tokenizer
