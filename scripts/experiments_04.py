"""Lesson 04's fidelity-vs-budget grid: black-box students by query budget, granularity, \
steps and seed.

    python scripts/experiments_04.py                        # the full grid
                                                            # -> results/04_fidelity_grid.json
    python scripts/experiments_04.py --quick --out /tmp/g.json    # a few steps, for a test

Every student is built by :func:`utils.recipes.blackbox_recipe` with the lesson's settings
(``student-xxs``, top-10 harvest, 48-token answers, batch 32, lr 3e-3), so the notebook's live
student is one of the grid's runs and loads the very same cache entry. The attacker harvests
``queries`` answers to skill prompts of the train split from the teacher served on 127.0.0.1
(the seed shuffles which prompts it asks), then trains a fresh student from scratch on the
answers' **text** (sequence-level KD) or on their **top-k logprobs** (token-level KD). One
harvest per seed serves every budget (a budget is a prefix) and both granularities.

Scores (:func:`utils.extraction.blackbox_fidelity`, on ``--n-eval`` held-out test skill prompts,
:func:`utils.extraction.fidelity_eval_records`): top-1 agreement, KL(teacher || student) and
total variation of the next-token distributions, teacher-forced on the teacher's greedy answers;
greedy exact match with the teacher's answers; task score (exact match with the world's answers).

Phase 1 harvests each seed's largest budget (``--jobs`` processes, one API server each); phase 2
trains and scores every (steps, granularity, budget, seed). Harvests and students are cached
(``DD_CACHE_DIR``), so an interrupted grid resumes. The JSON is written atomically with its
provenance (command, machine, date, git commit, versions) and the teacher's fingerprint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

BUDGETS = (32, 96, 192, 512, 2048)
GRANULARITIES = ("text", "topk")
STEPS = (150, 1000)        # the lesson's budget, and one that trains the students to a plateau
SETTINGS = {"size": "student-xxs", "top_k": 10, "max_tokens": 48}  # lesson 04's STUDENT_SIZE,
                                                                   # TOP_K, MAX_TOKENS
METRICS = ("top1_agreement", "kl", "tv", "greedy_exact_match", "score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_04.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "04_fidelity_grid.json"),
                   help="JSON to write")
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help=f"query budgets (default {BUDGETS})")
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help=f"training steps (default {STEPS})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--n-eval", type=int, default=None,
                   help="test skill prompts scored (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="processes at once")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: budgets 4 8, 2 steps, seeds 0 1, 8 prompts "
                        "(the numbers mean nothing)")
    args = p.parse_args(argv)
    args.budgets = args.budgets or ([4, 8] if args.quick else list(BUDGETS))
    args.steps = args.steps or ([2] if args.quick else list(STEPS))
    args.seeds = args.seeds if args.seeds is not None else [0, 1] if args.quick else [0, 1, 2]
    args.n_eval = args.n_eval or (8 if args.quick else 64)
    if min(args.budgets + args.steps) <= 0 or min(args.n_eval, args.jobs, args.threads) <= 0:
        p.error("--budgets, --steps, --n-eval, --jobs and --threads must be positive")
    if len(set(args.seeds)) < 2:
        p.error("give at least two different seeds: the grid reports the spread across seeds")
    return args


def harvest_seed(seed: int, budget: int, threads: int) -> dict:
    """Phase 1: the teacher's answers to the first ``budget`` shuffled skill prompts (cached)."""
    quiet_cpu_worker(threads)
    from utils.extraction import cached_harvest, skill_prompts

    start = time.perf_counter()
    records = cached_harvest(skill_prompts("train", seed=seed), budget=budget,
                             top_logprobs=SETTINGS["top_k"], max_tokens=SETTINGS["max_tokens"],
                             seed=seed, progress=False)  # the arguments blackbox_recipe uses
    return {"seed": seed, "queries": len(records), "seconds": round(time.perf_counter() - start, 1),
            "completion_tokens": sum(r.completion_tokens for r in records)}


_REFERENCE: dict[int, tuple] = {}  # per process: n_eval -> (records, teacher reference)


def run_one(queries: int, granularity: str, seed: int, steps: int, n_eval: int,
            threads: int) -> dict:
    """Phase 2: build (or load from the cache) one black-box student and score it."""
    quiet_cpu_worker(threads)
    from utils.extraction import blackbox_fidelity, fidelity_eval_records, teacher_reference
    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model
    from utils.recipes import blackbox_recipe

    recipe = blackbox_recipe(queries=queries, granularity=granularity, seed=seed, steps=steps,
                             **SETTINGS)
    was_cached = entry_dir(recipe).is_dir()
    student, tok = load_model(recipe, progress=False, verbose=False)
    info = read_manifest(entry_dir(recipe))["build_info"]
    if n_eval not in _REFERENCE:
        teacher, _ = load_model("teacher", verbose=False)
        records = fidelity_eval_records(n_eval)
        _REFERENCE[n_eval] = (records, teacher_reference(teacher, tok, records,
                                                         max_new_tokens=SETTINGS["max_tokens"]))
    records, reference = _REFERENCE[n_eval]
    scores = blackbox_fidelity(student, tok, records, reference,
                               max_new_tokens=SETTINGS["max_tokens"])
    return {"queries": queries, "granularity": granularity, "seed": seed, "steps": steps,
            **{k: float(v) for k, v in scores.items()}, "student_params": count_parameters(student),
            "train_seconds": info["train_seconds"], "completion_tokens": info["completion_tokens"],
            "final_train_loss": info["final_train_loss"], "from_cache": was_cached,
            "cache_key": recipe.key()}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (steps, granularity, queries): mean and sample standard deviation over seeds."""
    out = []
    for steps in sorted({r["steps"] for r in runs}):
        for granularity in GRANULARITIES:
            for queries in sorted({r["queries"] for r in runs}):
                rows = sorted((r for r in runs if (r["steps"], r["granularity"], r["queries"])
                               == (steps, granularity, queries)), key=lambda r: r["seed"])
                if not rows:
                    continue
                row = {"steps": steps, "granularity": granularity, "queries": queries,
                       "seeds": [r["seed"] for r in rows],
                       "train_seconds": statistics.mean(r["train_seconds"] for r in rows)}
                for m in METRICS:
                    values = [r[m] for r in rows]
                    row[f"{m}_mean"] = statistics.mean(values)
                    row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                out.append(row)
    return out


def _map(fn, jobs: list[tuple], n: int, desc: str) -> list:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not sys.stderr.isatty())
    out = []
    if n == 1:
        for job in jobs:
            out.append(fn(*job))
            bar.update(1)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(fn, *job) for job in jobs]:
                out.append(f.result())
                bar.update(1)
    bar.close()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    import numpy as np

    from utils.evaluate import score_records
    from utils.extraction import fidelity_eval_records, teacher_fingerprint, teacher_reference
    from utils.io import atomic_write_json
    from utils.models import count_parameters, load_model
    from utils.results import cpu_name, provenance

    start = time.perf_counter()
    harvests = _map(harvest_seed, [(s, max(args.budgets), args.threads) for s in args.seeds],
                    min(args.jobs, len(args.seeds)), "harvest (one per seed)")
    jobs = [(q, g, s, steps, args.n_eval, args.threads) for steps in args.steps
            for g in args.granularities for q in args.budgets for s in args.seeds]
    jobs.sort(key=lambda j: j[3])  # the short runs first: a partial log is still useful
    runs = _map(run_one, jobs, args.jobs, "students (steps x granularity x budget x seed)")
    wall = time.perf_counter() - start

    teacher, tok = load_model("teacher", verbose=False)
    records = fidelity_eval_records(args.n_eval)
    reference = teacher_reference(teacher, tok, records, max_new_tokens=SETTINGS["max_tokens"])
    teacher_score = float(np.mean([r["correct"]
                                   for r in score_records(records, reference["texts"])]))
    prov = provenance()
    prov.update({"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
                 if argv is None else "python scripts/experiments_04.py " + " ".join(argv),
                 "cpu": cpu_name(), "jobs": args.jobs, "threads_per_job": args.threads,
                 "wall_seconds": round(wall, 1), "quick": args.quick})
    payload = {
        "provenance": prov,
        "teacher": {"params": count_parameters(teacher), "score": teacher_score,
                    **teacher_fingerprint()},
        "student": {"size": SETTINGS["size"],
                    "params": runs[0]["student_params"] if runs else None},
        "settings": {**SETTINGS, "budgets": args.budgets, "granularities": args.granularities,
                     "steps": args.steps, "seeds": args.seeds, "batch_size": 32, "lr": 3e-3},
        "eval": {"split": "test", "kind": "skill", "n": len(records),
                 "rule": "utils.extraction.fidelity_eval_records: every k-th skill record, "
                         "k = len(skill records) // n"},
        "harvests": harvests,
        "runs": runs,
        "summary": summarise(runs),
    }
    out = atomic_write_json(Path(args.out), payload)
    print(f"{len(runs)} runs in {wall / 60:.1f} min -> {out}")
    for row in payload["summary"]:
        print(f"  {row['steps']:5d} steps {row['granularity']:5s} q={row['queries']:5d}: top-1 "
              f"{row['top1_agreement_mean']:.3f} +- {row['top1_agreement_std']:.3f}, KL "
              f"{row['kl_mean']:.3f}, score {row['score_mean']:.3f} +- {row['score_std']:.3f} "
              f"(teacher {teacher_score:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
