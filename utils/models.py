"""The course's model family, its zoo of named sizes and the on-disk model cache.

Teacher and students are configs of ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, the
architectures of real distilled open-weight models (lesson 02). No copied model classes.

- :class:`ModelConfig` -> :func:`build_model`: a fresh model of a given shape.
- :data:`ZOO`: named sizes. ``"teacher"`` is the shipped model in ``data/models/teacher/``
  (``make teacher``); the students are 4x to 16x smaller, sized against the teacher's real
  config (:func:`zoo_config`, :func:`zoo_table`).
- :func:`register_recipe` + :func:`load_model`: a recipe (a function that trains a model,
  from scratch or by distillation) is run on first use with a progress bar and cached under
  ``utils.paths.cache_dir()`` (``DD_CACHE_DIR``), keyed by a hash of config, recipe name,
  recipe version and cache format. Entries are written atomically (built in a hidden temp
  folder, then renamed into place), hold safetensors only and a manifest with the sha256 of
  every file; a corrupt or partial entry is detected on load and rebuilt.
- Anything else given to :func:`load_model` is a local folder or a hub id, loaded with
  ``from_pretrained`` (never ``trust_remote_code``), with a clear error when it is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
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

from utils.io import atomic_write_json
from utils.paths import cache_dir, data_dir

Architecture = Literal["llama", "qwen2"]


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
            f"no shipped student {name!r} (no {card}). Shipped: {', '.join(shipped_students()) or 'none'}. "
            "Fix: build them with `make students`, or restore data/models/students/ from the repository."
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
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
# Recipes and the cache
# --------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = "1"  # bump when the layout of a cache entry or the save code changes
MANIFEST = "manifest.json"
_TMP_PREFIX = ".building-"

BuildFn = Callable[..., Any]


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a zoo name, a recipe, a local folder nor reachable on the hub."""


@dataclass(frozen=True)
class Recipe:
    """How to build a named model: its config (or a zoo size) and a build function.

    ``build_fn(config)`` returns ``(model, tokenizer)`` or ``(model, tokenizer, info)`` with
    ``info`` a JSON-able dict kept in the manifest (e.g. the final training loss). If it has
    a ``progress`` parameter it receives a tqdm bar (call ``progress.reset(total=steps)``,
    then ``progress.update(1)`` per step). Bump ``version`` whenever the recipe's code
    changes what it builds: the cache key cannot see code, only this version.
    """

    name: str
    config: ModelConfig | str
    build_fn: BuildFn
    version: str = "1"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # hashed into the key (steps, seed...)

    def resolved_config(self) -> ModelConfig:
        return zoo_config(self.config) if isinstance(self.config, str) else self.config

    def key(self) -> str:
        """Cache key: hash of config + recipe name + version + extra + cache format."""
        payload = {"format": CACHE_FORMAT_VERSION, "recipe": self.name, "version": self.version,
                   "config": self.resolved_config().to_dict(), "extra": self.extra}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, config: ModelConfig | str, build_fn: BuildFn, version: str = "1",
                    *, description: str = "", extra: dict[str, Any] | None = None) -> Recipe:
    """Make ``load_model(name)`` build (once, then cache) a model with ``build_fn``.

    ``config`` is a :class:`ModelConfig` or a zoo size name such as ``"student-xs"``.
    Registering a name again replaces the recipe (a notebook cell run twice is fine).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"recipe name {name!r}: use letters, digits, '.', '_' and '-' only")
    if name == "teacher":
        raise ValueError("'teacher' is the shipped model (make teacher); pick another name")
    if not callable(build_fn):
        raise TypeError(f"build_fn must be a function, got {type(build_fn).__name__}")
    recipe = Recipe(name, config, build_fn, str(version), description, dict(extra or {}))
    RECIPES[name] = recipe
    return recipe


def entry_dir(recipe: Recipe) -> Path:
    """Where a recipe's cache entry lives: ``<cache_dir>/models/<name>-<key>``."""
    return cache_dir() / "models" / f"{recipe.name}-{recipe.key()}"


def cached_entries() -> list[Path]:
    """Complete-looking cache entries (visible folders with a manifest); temp dirs are hidden."""
    root = cache_dir() / "models"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a cache entry (what built it, sha256 of each file)."""
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def verify_entry(folder: str | os.PathLike) -> str | None:
    """``None`` when every file matches the manifest, else what is wrong, in words."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
    except FileNotFoundError:
        return "incomplete (it has no manifest.json)"
    except (ValueError, KeyError, TypeError):
        return "corrupt (its manifest.json is unreadable)"
    if not any(f.endswith(".safetensors") for f in files):
        return "corrupt (its manifest lists no safetensors weights)"
    for rel, meta in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            return f"incomplete ({rel} is missing)"
        size = p.stat().st_size
        if size != meta["bytes"]:
            return f"corrupt ({rel} has {size} bytes, the manifest says {meta['bytes']})"
        if _sha256(p) != meta["sha256"]:
            return f"corrupt (the sha256 of {rel} does not match its manifest)"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes do not build the same entry at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still holds
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Delete temp build folders left by builds that were killed (their process is gone)."""
    for p in root.glob(f"{_TMP_PREFIX}*"):
        m = re.search(r"-pid(\d+)-", p.name)
        if p.is_dir() and m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Remove a cache entry: first rename it out of sight, then delete it."""
    if not folder.exists():
        return
    trash = folder.with_name(f"{_TMP_PREFIX}trash-pid{os.getpid()}-{folder.name}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _call_build(recipe: Recipe, config: ModelConfig, show_progress: bool
                ) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    from utils.progress import progress_bar

    accepts_progress = "progress" in inspect.signature(recipe.build_fn).parameters
    bar = progress_bar(total=None, desc=f"building {recipe.name} (first use, cached afterwards)",
               disable=not show_progress, leave=True)
    try:
        out = (recipe.build_fn(config, progress=bar) if accepts_progress
               else recipe.build_fn(config))
    finally:
        bar.close()
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError(f"recipe {recipe.name!r}: build_fn must return (model, tokenizer) or "
                        f"(model, tokenizer, info), got {type(out).__name__}")
    model, tokenizer = out[0], out[1]
    info = dict(out[2]) if len(out) == 3 else {}
    return model, tokenizer, info


def _build_entry(recipe: Recipe, final: Path, show_progress: bool) -> None:
    """Build into a hidden temp folder, write the manifest, then rename it into place."""
    root = final.parent
    config = recipe.resolved_config()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-pid{os.getpid()}-", dir=root))
    try:
        start = time.perf_counter()
        model, tokenizer, info = _call_build(recipe, config, show_progress)
        seconds = time.perf_counter() - start
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
        if pickles or not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"recipe {recipe.name!r} did not save safetensors only: {pickles}")
        files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        import transformers

        manifest = {
            "format": CACHE_FORMAT_VERSION, "name": recipe.name, "version": recipe.version,
            "key": recipe.key(), "description": recipe.description, "extra": recipe.extra,
            "config": config.to_dict(), "parameters": count_parameters(model),
            "build_seconds": round(seconds, 2), "build_info": info, "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        json.loads(json.dumps(manifest))  # fail before the rename if info is not JSON-able
        atomic_write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_or_build(recipe: Recipe, *, rebuild: bool, show_progress: bool, log: Callable[[str], Any]
                   ) -> tuple[PreTrainedModel, Any]:
    final = entry_dir(recipe)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{final.name}.lock"):
        if final.exists() and not rebuild:
            problem = verify_entry(final)
            if problem is None:
                return _load_pretrained(final)
            log(f"The cached {recipe.name!r} at {final} is {problem}: rebuilding it.")
        _discard(final)
        _remove_stale_temps(root)
        start = time.perf_counter()
        _build_entry(recipe, final, show_progress)
        problem = verify_entry(final)
        if problem is not None:  # pragma: no cover - would mean the disk changed under us
            raise RuntimeError(f"the freshly built {recipe.name!r} at {final} is {problem}")
        log(f"Built {recipe.name!r} in {time.perf_counter() - start:.0f} s; cached in {final}")
        return _load_pretrained(final)


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _zoo_names() -> str:
    names = list(ZOO) + shipped_students() + [n for n in RECIPES if n not in ZOO]
    return ", ".join(names)


def _load_pretrained(folder: Path) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} is a folder but not a saved model (no config.json in it). Fix: pass the "
            "folder that `model.save_pretrained(...)` wrote."
        )
    if not list(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        why = f"it holds pickled weights {pickled}" if pickled else "it holds no weights"
        raise ModelNotFoundError(
            f"{folder} has no safetensors weights: {why}. This course loads safetensors only "
            "(pickle can run code). Fix: load it once in a trusted session and re-save it with "
            "`model.save_pretrained(folder)`."
        )
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"{folder} holds a model but no usable tokenizer ({exc}). Fix: save the tokenizer "
            "beside it with `tokenizer.save_pretrained(folder)`."
        ) from None
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str | os.PathLike, *, builder: Recipe | BuildFn | None = None,
               config: ModelConfig | str | None = None, version: str = "1",
               rebuild: bool = False, progress: bool = True, device: str | torch.device | None = None,
               verbose: bool = True) -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)`` for a zoo name, a recipe, a local folder or a hub id.

    - ``"teacher"``: the shipped model in ``data/models/teacher/``.
    - a shipped trained student (:func:`shipped_students`, ``data/models/students/<name>/``).
    - a registered recipe name (:func:`register_recipe`), or any name with ``builder=``:
      built on first use with a progress bar, then loaded from the cache (verified against
      its manifest; a corrupt or partial entry is rebuilt with a message). With a bare
      function as ``builder``, ``config`` (a :class:`ModelConfig` or a zoo size; default: the
      zoo size of the same name) and ``version`` complete the recipe.
    - a local folder: ``from_pretrained`` on it (safetensors only).
    - a hub id: ``from_pretrained`` unless offline (``HF_HUB_OFFLINE=1``), never with
      ``trust_remote_code``. Anything missing raises :class:`ModelNotFoundError` naming the fix.
    """
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
        recipe = Recipe(name, cfg, builder, str(version))
    elif name in RECIPES:
        recipe = RECIPES[name]

    if recipe is not None:
        model, tokenizer = _load_or_build(recipe, rebuild=rebuild, show_progress=progress, log=log)
    elif name == "teacher":
        if not (teacher_dir() / "config.json").is_file():
            raise ModelNotFoundError(
                f"the shipped teacher is missing: no model in {teacher_dir()}. Fix: build it "
                "once with `make teacher` (about the time its model card states), or restore "
                "data/models/teacher/ from the repository."
            )
        model, tokenizer = _load_pretrained(teacher_dir())
    elif name in shipped_students():
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
            model, tokenizer = _load_pretrained(path)
        elif path.exists():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json "
                                     "and the .safetensors weights.")
        else:
            model, tokenizer = _load_from_hub(name)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _load_from_hub(name: str) -> tuple[PreTrainedModel, Any]:
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False,
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"no model at {name!r}: it is {where}, and the hub could not provide it ({first}). "
            "Fix: check the id and your connection, or pass a local folder."
        ) from None
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------
# A recipe every lesson can use: a zoo student trained from scratch (lesson 02's baseline)
# --------------------------------------------------------------------------------------

SCRATCH_RECIPE_VERSION = "1"  # bump when scratch_recipe's training code changes


def _file_sha256_or_none(path: Path) -> str | None:
    return _sha256(path) if path.is_file() else None


def scratch_recipe(size: str = "student-xs", *, steps: int = 300, batch_size: int = 32,
                   lr: float = 3e-3, seed: int = 0, name: str | None = None) -> Recipe:
    """Register a recipe that trains zoo size ``size`` from scratch on the world (lesson 02).

    Supervised fine-tuning from random weights with :func:`utils.train.train_lm` on the
    training split, with the teacher's tokenizer: the baseline that distillation (lesson 03)
    must beat. The cache key covers the shape, the budget, the seed and the sha256 of the
    tokenizer and the data manifest, so changing any of them builds a new entry.
    Returns the recipe; ``load_model(recipe.name)`` builds it once, then loads it.
    """
    if size not in ZOO or ZOO[size].target_ratio is None:
        students = [n for n, e in ZOO.items() if e.target_ratio is not None]
        raise ValueError(f"size must be a student of the zoo ({', '.join(students)}), got {size!r}")
    tok_dir = teacher_dir() if (teacher_dir() / "tokenizer.json").is_file() else None
    from utils.tokenizer import tokenizer_dir

    tok_file = (tok_dir or tokenizer_dir()) / "tokenizer.json"
    extra = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             "tokenizer_sha256": _file_sha256_or_none(tok_file),
             "data_manifest_sha256": _file_sha256_or_none(data_dir() / "world" / "manifest.json")}

    def build(config: ModelConfig, progress: Any = None) -> tuple[PreTrainedModel, Any, dict]:
        from utils.data import load_world
        from utils.tokenizer import load_tokenizer
        from utils.train import bar_callback, train_lm


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

    return register_recipe(name or f"{size}-scratch", size, build, SCRATCH_RECIPE_VERSION,
                           description=f"{size} trained from scratch for {steps} steps",
                           extra=extra)
