"""The on-disk model cache: recipes, their keys, manifests, verification, locking, building.

A :class:`Recipe` says how to build a named model (a config and a build function). On first
use :func:`load_or_build` runs it with a progress bar and stores the result under
``utils.paths.cache_dir()/models/<name>-<key>`` (``DD_CACHE_DIR`` moves it), keyed by a hash of
the config, the recipe's name, version and ``extra`` settings, and the cache format. Entries
are built in a hidden temp folder and renamed into place (a reader never sees half an entry),
hold safetensors only, and carry a ``manifest.json`` with the sha256 of every file; a corrupt
or partial entry is detected on load and rebuilt. An exclusive lock keeps two processes from
building the same entry at once.

The same manifest format protects the shipped models in ``data/models/`` (teacher and
students): :func:`write_manifest` records their files, :func:`verify_folder` checks them.

This module knows nothing of the course's model family: a recipe's config is any object with
``to_dict()`` (a :class:`utils.models.ModelConfig`), and loading a verified folder is the
caller's function (:func:`utils.models.load_model`). The recipes themselves live in
:mod:`utils.recipes`. Lessons 02-04.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from utils.io import atomic_write_json, file_lock, sha256_file
from utils.paths import cache_dir

__all__ = [
    "CACHE_FORMAT_VERSION",
    "MANIFEST",
    "Recipe",
    "cached_entries",
    "entry_dir",
    "file_table",
    "load_or_build",
    "read_manifest",
    "verify_folder",
    "write_manifest",
]

CACHE_FORMAT_VERSION = "1"  # bump when the layout of a cache entry or the save code changes
MANIFEST = "manifest.json"
_TMP_PREFIX = ".building-"

BuildFn = Callable[..., Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Recipe:
    """How to build a named model: its config and a build function.

    ``build_fn(config)`` returns ``(model, tokenizer)`` or ``(model, tokenizer, info)`` with
    ``info`` a JSON-able dict kept in the manifest (e.g. the final training loss). If it has
    a ``progress`` parameter it receives a tqdm bar (call ``progress.reset(total=steps)``,
    then ``progress.update(1)`` per step). Bump ``version`` whenever the recipe's code
    changes what it builds: the cache key cannot see code, only this version.
    """

    name: str
    config: Any  # a utils.models.ModelConfig (anything with to_dict())
    build_fn: BuildFn
    version: str = "1"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # hashed into the key (steps, seed...)
    size: str | None = None  # the zoo size the config came from, if any (not in the key)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"recipe name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not callable(self.build_fn):
            raise TypeError(f"build_fn must be a function, got {type(self.build_fn).__name__}")
        if not callable(getattr(self.config, "to_dict", None)):
            raise TypeError(f"recipe {self.name!r}: config must be a ModelConfig (something with "
                            f"to_dict()), got {type(self.config).__name__}")

    def key(self) -> str:
        """Cache key: hash of config + recipe name + version + extra + cache format."""
        payload = {"format": CACHE_FORMAT_VERSION, "recipe": self.name, "version": self.version,
                   "config": self.config.to_dict(), "extra": self.extra}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


# --------------------------------------------------------------------------------------
# Manifests: the sha256 of every file of a model folder
# --------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a model folder (what built it, sha256 of each file)."""
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def file_table(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` for ``names`` (default: every file but the
    manifest) of ``folder``: the ``files`` entry of a manifest."""
    folder = Path(folder)
    paths = ([folder / n for n in names] if names is not None else
             [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST])
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in paths}


def write_manifest(folder: str | os.PathLike, meta: dict[str, Any],
                   names: list[str] | None = None) -> Path:
    """Write ``folder/manifest.json`` (atomically): ``meta`` plus the ``files`` table of
    :func:`file_table`. Used by the cache and by ``make teacher`` / ``make students``."""
    manifest = {**meta, "files": file_table(folder, names)}
    json.loads(json.dumps(manifest))  # fail before writing if meta is not JSON-able
    return atomic_write_json(Path(folder) / MANIFEST, manifest)


def verify_folder(folder: str | os.PathLike) -> str | None:
    """``None`` when every file matches the folder's manifest, else what is wrong, in words."""
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
        if sha256_file(p) != meta["sha256"]:
            return f"corrupt (the sha256 of {rel} does not match its manifest)"
    return None


# --------------------------------------------------------------------------------------
# Building an entry: lock, temp folder, manifest, rename
# --------------------------------------------------------------------------------------


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


def _call_build(recipe: Recipe, show_progress: bool) -> tuple[Any, Any, dict[str, Any]]:
    from utils.progress import progress_bar

    accepts_progress = "progress" in inspect.signature(recipe.build_fn).parameters
    bar = progress_bar(total=None, desc=f"building {recipe.name} (first use, cached afterwards)",
                       disable=not show_progress, leave=True)
    try:
        out = (recipe.build_fn(recipe.config, progress=bar) if accepts_progress
               else recipe.build_fn(recipe.config))
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
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-pid{os.getpid()}-", dir=root))
    try:
        start = time.perf_counter()
        model, tokenizer, info = _call_build(recipe, show_progress)
        seconds = time.perf_counter() - start
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
        if pickles or not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"recipe {recipe.name!r} did not save safetensors only: {pickles}")
        import torch
        import transformers

        write_manifest(tmp, {
            "format": CACHE_FORMAT_VERSION, "name": recipe.name, "version": recipe.version,
            "key": recipe.key(), "description": recipe.description, "extra": recipe.extra,
            "config": recipe.config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),  # tied weights once
            "build_seconds": round(seconds, 2), "build_info": info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__, "transformers": transformers.__version__,
        })
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_or_build(recipe: Recipe, load: Callable[[Path], T], *, rebuild: bool = False,
                  show_progress: bool = True, log: Callable[[str], Any] = print) -> T:
    """``load(folder)`` of the recipe's verified cache entry, building it first when it is
    missing, partial or corrupt (with a message) or when ``rebuild``."""
    final = entry_dir(recipe)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{final.name}.lock"):
        if final.exists() and not rebuild:
            problem = verify_folder(final)
            if problem is None:
                return load(final)
            log(f"The cached {recipe.name!r} at {final} is {problem}: rebuilding it.")
        _discard(final)
        _remove_stale_temps(root)
        start = time.perf_counter()
        _build_entry(recipe, final, show_progress)
        problem = verify_folder(final)
        if problem is not None:  # pragma: no cover - would mean the disk changed under us
            raise RuntimeError(f"the freshly built {recipe.name!r} at {final} is {problem}")
        log(f"Built {recipe.name!r} in {time.perf_counter() - start:.0f} s; cached in {final}")
        return load(final)
