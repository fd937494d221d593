"""Shipping trained students: lesson 03's recipes on a budget too long for a notebook.

A shipped student is a cache entry of :func:`utils.recipes.distill_recipe` copied to
``data/models/students/<name>/`` (:func:`utils.models.students_dir`) with

- ``model_card.json`` / ``model_card.md``: greedy exact match per skill and refusal rates on
  the whole test split (scored like the teacher's card), the teacher's numbers beside them, the
  build settings, and the provenance (command, machine, date, git commit);
- ``test_responses.jsonl``: every test response, so ``tests/test_students.py`` can re-check
  the weights against the card.

``load_model("<name>")`` loads it like the teacher. Built by ``make students``::

    python -m utils.students ship student-xs forward_kl --steps 3000 --transfer skills
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["card_markdown", "ship_recipe", "shipped_name"]


def shipped_name(size: str, method: str, transfer: str = "all") -> str:
    """The folder (and ``load_model`` name) of a shipped student: ``student-xs-forward-kl``."""
    suffix = "" if transfer == "all" else f"-{transfer}-only"
    return f"{size}-{method.replace('_', '-')}{suffix}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.1%}"  # None or NaN (an empty group)


_RECIPE_LESSON = {"distill_recipe": "lesson 03", "blackbox_recipe": "lesson 04"}


def card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable card beside ``model_card.json``."""
    em, safety = card["metrics"]["exact_match"], card["metrics"]["safety"]
    t_em, t_safety = card["teacher"]["exact_match"], card["teacher"]["safety"]
    lines = [f"# Shipped student `{card['name']}` ({card['parameters']:,} parameters, "
             f"{card['times_smaller']:.1f}x smaller than the teacher)", "",
             f"{card['description']}. Built by `{card['provenance']['command']}` "
             f"({_RECIPE_LESSON.get(card.get('recipe_function'), 'lesson 03')}'s recipe, "
             f"`utils.recipes.{card.get('recipe_function', 'distill_recipe')}`); every number "
             "below was measured "
             f"by that command on the **test split** ({card['metrics']['n_records']} records, "
             "greedy decoding; every response is in `test_responses.jsonl`) and is re-checked by "
             "`tests/test_students.py`.", "",
             "| skill | student | teacher | kept |", "|---|---|---|---|"]
    for skill, value in em["per_skill"].items():
        t = t_em["per_skill"].get(skill)
        kept = f"{value / t:.0%}" if t else "n/a"
        lines.append(f"| {skill} | {_pct(value)} | {_pct(t)} | {kept} |")
    lines.append(f"| **overall** | **{_pct(em['overall'])}** | **{_pct(t_em['overall'])}** | "
                 f"**{card['exact_match_retained']:.0%}** |")
    lines += ["", "| safety (simple refusal matcher) | student | teacher |", "|---|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_pct(v)} | {_pct(t_safety.get(k))} |"
              for k, v in safety.items() if isinstance(v, float)]
    lines += ["", f"Perplexity on the test split: {card['metrics']['perplexity']:.3f}."]
    if card.get("api_watermark"):
        w = card["api_watermark"]
        lines += ["", f"The teacher's API watermarked every answer this student was trained on "
                      f"(Kirchenbauer et al. 2023: bias {w['bias']:g}, green list "
                      f"{w['greenlist_ratio']:.0%}, {w['seeding_scheme']}, context "
                      f"{w['context_width']}): `scripts/experiments_04_radioactivity.py` tests "
                      "whether the student carries it (Sander et al. 2024)."]
    if card.get("grid"):
        g = card["grid"]
        lines += ["", f"Teacher-forced exact match on the grid's {g['n_eval']} prompts "
                      f"(`{g['grid_file']}`): {g['score']:.3f} (teacher {g['teacher_score']:.3f})."]
    s = card["settings"]
    lines += ["", "## Build", "",
              f"- {card['steps']} steps x batch {s['batch_size']}, lr {s['lr']}, "
              f"seed {card['seed']}, "
              f"training data: {card['transfer']}; train time {card['train_seconds']:.0f} s "
              f"({s.get('torch_threads', '?')} thread(s))",
              ("- distilled through the teacher's API (prompts only) from the teacher with "
               "weights sha256 " if card.get("recipe_function") == "blackbox_recipe"
               else "- distilled from the teacher with weights sha256 ")
              + f"{str(card['teacher_sha256'])[:16]}..." if card["teacher_sha256"]
              else "- trained on the data alone (no teacher)",
              f"- date {card['provenance']['date']}, "
              f"git commit {card['provenance']['git_commit']}, "
              f"{card['provenance'].get('cpu', card['provenance'].get('machine', ''))}"]
    return "\n".join(lines) + "\n"


def ship_recipe(recipe: Any, name: str, *, provenance: dict[str, Any], grid: dict | None = None,
                threads: int = 1, root: str | os.PathLike | None = None,
                eval_limit: int | None = None) -> Path:
    """Build (or load from the cache) ``recipe``, score it on the test split and copy it, with
    its card and responses, to ``<root or students_dir()>/<name>/`` atomically."""
    import torch

    from utils.data import load_world
    from utils.evaluate import evaluate_world
    from utils.model_cache import entry_dir, read_manifest, verify_folder
    from utils.models import count_parameters, load_model, students_dir, teacher_card

    torch.set_num_threads(threads)
    model, tokenizer = load_model(recipe, progress=False, verbose=False)
    source = entry_dir(recipe)
    problem = verify_folder(source)
    if problem is not None:  # pragma: no cover - load_model just verified or built it
        raise RuntimeError(f"cannot ship {recipe.name}: its cache entry {source} is {problem}")
    test = load_world("test")
    if eval_limit is not None:  # smoke tests only: not a measurement
        test = test.select(range(min(eval_limit, len(test))))
    metrics, rows = evaluate_world(model, tokenizer, test)
    info = read_manifest(source)["build_info"]
    teacher = teacher_card()
    params = count_parameters(model)
    card = {
        "name": name, "size": recipe.size,
        "method": info.get("method"), "transfer": info.get("transfer", "all"),
        "seed": info.get("seed"), "steps": info["steps"],
        "description": recipe.description, "recipe": recipe.name, "cache_key": recipe.key(),
        "recipe_function": "blackbox_recipe" if "granularity" in info else "distill_recipe",
        "parameters": params, "teacher_parameters": teacher["parameters"],
        "times_smaller": teacher["parameters"] / params,
        "train_seconds": info["train_seconds"],
        "settings": {k: v for k, v in info.items() if k != "train_seconds"},
        "metrics": metrics,
        "teacher": {"exact_match": teacher["metrics"]["exact_match"],
                    "safety": teacher["metrics"]["safety"]},
        "exact_match_retained": metrics["exact_match"]["overall"]
        / teacher["metrics"]["exact_match"]["overall"],
        "grid": grid,
        "teacher_sha256": recipe.extra.get("teacher_sha256"),
        "tokenizer_sha256": recipe.extra.get("tokenizer_sha256"),
        "data_manifest_sha256": recipe.extra.get("data_manifest_sha256"),
        "provenance": provenance,
    }
    watermark = (recipe.extra or {}).get("watermark")
    if watermark is not None:  # a student of a watermarked API (lesson 04's radioactivity)
        from utils.extraction import watermark_config

        card["api_watermark"] = watermark_config(watermark).to_dict()
        card["description"] += (f"; every answer watermarked by the API (Kirchenbauer et al. "
                                f"2023, bias {watermark:g})")
    folder = Path(root) if root is not None else students_dir()
    return publish_entry(source, folder / name, {
        "model_card.json": json.dumps(card, indent=1, sort_keys=True) + "\n",
        "model_card.md": card_markdown(card),
        "test_responses.jsonl": "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)})


def publish_entry(source: str | os.PathLike, dest: str | os.PathLike, texts: dict[str, str], *,
                  manifest: dict[str, Any] | None = None) -> Path:
    """Copy the model cache entry ``source`` and the text files ``texts`` (name -> content) to
    ``dest``, readable by everyone, atomically: a temporary folder beside it, then one rename
    (an interrupted copy leaves the old ``dest`` whole).

    ``manifest=None`` keeps the entry's own ``manifest.json`` (it covers the weights; the cards
    beside it are not hashed); otherwise a new manifest with these metadata hashes every file,
    the texts included (:func:`utils.model_cache.write_manifest`).
    """
    from utils.io import replace_dir
    from utils.model_cache import write_manifest

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shipped model is readable by everyone
    try:
        for f in Path(source).iterdir():
            if manifest is None or f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
        for fname, text in texts.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        if manifest is not None:
            write_manifest(tmp, manifest)
        for f in tmp.iterdir():
            f.chmod(0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    from utils.quiet import silence_library_noise
    from utils.recipes import DISTILL_DEFAULTS, METHODS, TRANSFERS, distill_recipe
    from utils.results import provenance

    p = argparse.ArgumentParser(prog="python -m utils.students",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship", help="build one distill_recipe student and ship it with its card")
    s.add_argument("size")
    s.add_argument("method", choices=METHODS)
    s.add_argument("--steps", type=int, default=DISTILL_DEFAULTS["steps"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--transfer", choices=TRANSFERS, default="all")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--root", default=None, help="where to ship (default data/models/students/)")
    s.add_argument("--eval-limit", type=int, default=None, help="smoke tests: score fewer records")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    silence_library_noise()
    import torch

    torch.set_num_threads(args.threads)
    recipe = distill_recipe(args.size, args.method, steps=args.steps, seed=args.seed,
                            transfer=args.transfer)
    prov = provenance()
    prov.update({"command": "python -m utils.students "
                            + " ".join(sys.argv[1:] if argv is None else argv),
                 "quick": args.eval_limit is not None})
    name = shipped_name(args.size, args.method, args.transfer)
    folder = ship_recipe(recipe, name, provenance=prov, threads=args.threads, root=args.root,
                         eval_limit=args.eval_limit)
    print(f"shipped {name} -> {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
