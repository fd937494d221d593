"""Lesson 03's experiment grid: methods x student sizes x seeds, scored the same way.

    python scripts/experiments_03.py                       # the full grid -> results/03_grid.json
    python scripts/experiments_03.py --quick --out /tmp/g.json   # a few steps, for a test
    make students   # the long budget:
                    # --steps 3000 --sizes student-xs --methods sft forward_kl --ship

Every student is built by :func:`utils.recipes.distill_recipe` (so the notebook's live student
and lesson 07 load the very same cache entries) with the recipe's defaults except ``--steps``
and the seed: the same data, steps, optimiser, schedule and seeds for every method. Grid:

- ``student-xs`` (the lesson's student, about 1/10 of the teacher) trained four ways: ``sft``
  (the data alone), ``forward_kl``, ``reverse_kl``, ``on_policy`` (GKD);
- ``student-s`` and ``student-xxs`` with ``sft`` and ``forward_kl``: the distillation frontier.

Score: **teacher-forced greedy exact match** on a fixed test subset (every k-th skill prompt of
the test split, ``--n-eval`` of them, :func:`utils.evaluate.eval_subset`): a prompt counts when the
model's argmax reproduces every token of the reference response, the condition under which greedy
decoding writes it (lesson 05 uses the same score and cross-checks it against generation). The
teacher is scored on the same subset. ``train_seconds`` is the measured training time of each
build (``--threads`` torch threads per process, ``--jobs`` processes at once).

The JSON is written atomically with its provenance (command, machine, date, git commit, versions).
Runs are cached (``DD_CACHE_DIR``), so an interrupted grid resumes where it stopped; a cached
run keeps the ``train_seconds`` measured when it was built. ``--sizes``/``--methods`` run part of
the grid; ``--cached-only`` trains nothing and summarises the (size, method) configurations whose
every seed is already cached, listing the others under ``missing`` (``provenance.partial``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.paths import display_path  # noqa: E402 - after the sys.path line above
from utils.quiet import quiet_cpu_worker  # noqa: E402
from utils.recipes import DISTILL_DEFAULTS  # noqa: E402 - after the sys.path line above

DEFAULT_STEPS = DISTILL_DEFAULTS["steps"]  # the recipe's default: the notebook's live budget
GRID = (("student-xs", ("sft", "forward_kl", "reverse_kl", "on_policy")),
        ("student-s", ("sft", "forward_kl")),
        ("student-xxs", ("sft", "forward_kl")))
SCORE = ("teacher-forced greedy exact match: the argmax reproduces every token of the reference "
         "response (and its end token)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_03.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "03_grid.json"), help="JSON to write")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--n-eval", type=int, default=None, help="test prompts scored (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one process each)")
    p.add_argument("--sizes", nargs="+", default=[size for size, _ in GRID],
                   choices=[size for size, _ in GRID], help="student sizes to run (default: all)")
    p.add_argument("--methods", nargs="+", default=list(GRID[0][1]), choices=list(GRID[0][1]),
                   help="methods to run where the grid has them (default: all)")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: summarise the configurations whose every seed is cached")
    p.add_argument("--ship", action="store_true",
                   help="copy each configuration's first-seed student to data/models/students/")
    p.add_argument("--ship-dir", default=None,
                   help="where --ship writes (default data/models/students/; "
                        "tests use a temp folder)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 steps, seeds 0 1, 20 prompts (the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else DEFAULT_STEPS
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if args.n_eval is None:
        args.n_eval = 20 if args.quick else 200
    if args.steps <= 0 or args.n_eval <= 0 or args.jobs <= 0 or args.threads <= 0:
        p.error("--steps, --n-eval, --jobs and --threads must be positive")
    if len(set(args.seeds)) < 2:
        p.error("give at least two different seeds: the grid reports the spread across seeds")
    return args


def run_one(size: str, method: str, seed: int, steps: int, n_eval: int, threads: int) -> dict:
    """Build (or load from the cache) one student and score it: one row of the grid."""
    quiet_cpu_worker(threads)
    from utils.evaluate import eval_subset, teacher_forced_exact_match
    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model
    from utils.recipes import distill_recipe

    recipe = distill_recipe(size, method, steps=steps, seed=seed)
    was_cached = entry_dir(recipe).is_dir()
    model, tokenizer = load_model(recipe, progress=False, verbose=False)
    info = read_manifest(entry_dir(recipe))["build_info"]
    scored = teacher_forced_exact_match(model, tokenizer, eval_subset(n_eval))
    return {"size": size, "method": method, "seed": seed, "steps": info["steps"],
            "student_params": count_parameters(model), "score": scored["score"],
            "token_accuracy": scored["token_accuracy"], "perplexity": scored["perplexity"],
            "train_seconds": info["train_seconds"],
            "train_threads": info.get("torch_threads"), "from_cache": was_cached,
            "cache_key": recipe.key()}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (size, method): mean and sample standard deviation over the seeds."""
    out = []
    for size, methods in GRID:
        for method in methods:
            rows = sorted((r for r in runs if r["size"] == size and r["method"] == method),
                          key=lambda r: r["seed"])
            if not rows:
                continue
            scores = [r["score"] for r in rows]
            out.append({"size": size, "method": method, "student_params": rows[0]["student_params"],
                        "steps": rows[0]["steps"], "seeds": [r["seed"] for r in rows],
                        "scores": scores, "score_mean": statistics.mean(scores),
                        "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "token_accuracy_mean": statistics.mean(r["token_accuracy"] for r in rows),
                        "token_accuracy_std": statistics.stdev(r["token_accuracy"] for r in rows)
                        if len(rows) > 1 else 0.0,
                        "perplexity_mean": statistics.mean(r["perplexity"] for r in rows),
                        "train_seconds": statistics.mean(r["train_seconds"] for r in rows)})
    return out


def ship_student(row: dict, payload: dict, *, threads: int, root: Path | None = None,
                 eval_limit: int | None = None) -> Path:
    """Ship the first seed's student of one grid row (:func:`utils.students.ship_recipe`)."""
    from utils.recipes import distill_recipe
    from utils.students import ship_recipe, shipped_name

    size, method, seed = row["size"], row["method"], row["seeds"][0]
    run = next(r for r in payload["runs"]
               if (r["size"], r["method"], r["seed"]) == (size, method, seed))
    grid = {"n_eval": payload["eval_subset"]["n"], "score": run["score"],
            "token_accuracy": run["token_accuracy"], "teacher_score": payload["teacher"]["score"],
            "grid_file": payload["provenance"]["out"]}
    return ship_recipe(distill_recipe(size, method, steps=row["steps"], seed=seed),
                       shipped_name(size, method), provenance=payload["provenance"], grid=grid,
                       threads=threads, root=root, eval_limit=eval_limit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.evaluate import eval_subset, teacher_forced_exact_match
    from utils.io import atomic_write_json
    from utils.models import count_parameters, load_model, teacher_card, teacher_dir
    from utils.progress import run_jobs
    from utils.results import cpu_name, provenance

    start = time.perf_counter()
    teacher, tokenizer = load_model("teacher", verbose=False)
    subset = eval_subset(args.n_eval)
    teacher_scored = teacher_forced_exact_match(teacher, tokenizer, subset)
    jobs = [(size, method, seed) for size, methods in GRID if size in args.sizes
            for method in methods if method in args.methods for seed in args.seeds]
    missing: list[dict] = []
    if args.cached_only:
        from utils.model_cache import entry_dir, verify_folder
        from utils.recipes import distill_recipe

        def cached(size: str, method: str, seed: int) -> bool:
            folder = entry_dir(distill_recipe(size, method, steps=args.steps, seed=seed))
            return folder.is_dir() and verify_folder(folder) is None

        configs = sorted({(size, method) for size, method, _ in jobs},
                         key=lambda c: [j[:2] for j in jobs].index(c))
        keep = [c for c in configs if all(cached(*c, seed) for seed in args.seeds)]
        missing = [{"size": s, "method": m} for s, m in configs if (s, m) not in keep]
        jobs = [j for j in jobs if j[:2] in keep]
    runs = run_jobs(run_one, jobs, workers=args.jobs, desc="grid (size x method x seed)",
                    extra=(args.steps, args.n_eval, args.threads))
    wall = time.perf_counter() - start
    try:
        card_sha = teacher_card().get("tokenizer_sha256")
    except FileNotFoundError:
        card_sha = None
    prov = provenance()
    prov.update({"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
                 if argv is None else "python scripts/experiments_03.py " + " ".join(argv),
                 "cpu": cpu_name(), "jobs": args.jobs, "threads_per_job": args.threads,
                 "wall_seconds": round(wall, 1), "quick": args.quick,
                 "out": display_path(Path(args.out)),
                 "partial": bool(missing) or len(args.sizes) < len(GRID)
                 or len(args.methods) < len(GRID[0][1])})
    payload = {
        "provenance": prov,
        "score": SCORE,
        "eval_subset": {"split": "test", "kind": "skill", "n": len(subset),
                        "rule": "every k-th skill record, k = len(skill records) // n"},
        "teacher": {"params": count_parameters(teacher), "score": teacher_scored["score"],
                    "token_accuracy": teacher_scored["token_accuracy"],
                    "perplexity": teacher_scored["perplexity"],
                    "weights": display_path(teacher_dir()), "tokenizer_sha256": card_sha},
        "settings": {**DISTILL_DEFAULTS, "steps": args.steps, "seeds": args.seeds},
        "runs": runs,
        "summary": summarise(runs),
        "missing": missing,
    }
    out = atomic_write_json(Path(args.out), payload)
    print(f"{len(runs)} runs in {wall / 60:.1f} min -> {out}")
    if args.ship:
        for row in payload["summary"]:
            folder = ship_student(row, payload, threads=args.threads * args.jobs,
                                  root=Path(args.ship_dir) if args.ship_dir else None,
                                  eval_limit=60 if args.quick else None)
            print(f"  shipped {display_path(folder)}")
    if missing:
        print("  not in the cache, left out:",
              ", ".join(f"{m['size']} {m['method']}" for m in missing))
    for row in payload["summary"]:
        print(f"  {row['size']:12s} {row['method']:11s} score {row['score_mean']:.3f} "
              f"+- {row['score_std']:.3f} (teacher {teacher_scored['score']:.3f}), token accuracy "
              f"{row['token_accuracy_mean']:.3f}, "
              f"{row['train_seconds']:.0f} s/run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
