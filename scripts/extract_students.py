"""Lesson 04's shipped extracted students: the teacher copied through its API, three ways.

    python scripts/extract_students.py             # harvest, train, score, ship (about an hour)
    python scripts/extract_students.py --quick --out /tmp/x.json --ship-dir /tmp/ship   # a test

The attacker only has prompts and the teacher's OpenAI-compatible API on 127.0.0.1 (the real
``openai`` client, :func:`utils.extraction.cached_harvest`). It asks **every** prompt of its
mix once (greedy answers, top-10 logprobs, up to 128 tokens: the world's longest answers are
115 tokens, and a 48-token cap cuts a fifth of the arithmetic and conversion answers), then
trains a fresh ``student-xs`` (1/10.6 of the teacher) for the long budget (3000 steps, as
lesson 03's shipped white-box students) with :func:`utils.recipes.blackbox_recipe`:

- ``skills`` x ``text``: ordinary tasks, sequence-level KD on the answers' text;
- ``skills`` x ``topk``: the same harvest, token-level KD on the top-10 logprobs;
- ``safety`` x ``topk``: tasks mixed with restricted requests, look-alikes and jailbreaks;
  the API's refusals are kept and learnt;
- ``safety-filtered`` x ``topk``: the same harvest with the refusals dropped before training.

Every student is scored on the whole test split by generation (exact match, the world's
refusal rates) and by lesson 07's harness (refusal of restricted requests, over-refusal of
look-alikes, held-out jailbreak success, with Wilson intervals). Seed 0 of each variant is
shipped to ``data/models/students/`` with its card (:func:`utils.students.ship_recipe`). The
JSON (``results/04_extracted_students.json``) holds every run, the per-variant summary over
seeds, the harvest's cost and the provenance.
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

VARIANTS = (("skills", "text"), ("skills", "topk"), ("safety", "topk"),
            ("safety-filtered", "topk"))
SETTINGS = {"size": "student-xs", "top_k": 10, "max_tokens": 128, "batch_size": 32,
            "lr": 3e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/extract_students.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "04_extracted_students.json"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=2, help="processes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-ship", dest="ship", action="store_false",
                   help="do not ship seed 0 of each variant to data/models/students/")
    p.add_argument("--ship-dir", default=None, help="ship here instead (tests)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 40 prompts, 2 steps, seeds 0 1, 40 test records "
                        "(the numbers mean nothing)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3000)
    args.seeds = args.seeds if args.seeds is not None else [0, 1] if args.quick else [0, 1, 2]
    args.limit = 40 if args.quick else None
    if min(args.steps, args.jobs, args.threads) <= 0:
        p.error("--steps, --jobs and --threads must be positive")
    return args


def recipe_for(mix: str, granularity: str, seed: int, steps: int, limit: int | None):
    from utils.recipes import blackbox_recipe

    return blackbox_recipe(queries=limit, granularity=granularity, seed=seed, steps=steps,
                           mix=mix, **SETTINGS)


def harvest_shard(shard: int, shards: int, limit: int | None, threads: int) -> dict:
    """Phase 1: this process's share of every prompt of the largest mix, through the API."""
    quiet_cpu_worker(threads)
    from utils.extraction import cached_harvest, mix_prompts

    prompts = mix_prompts("safety", "train", seed=0)[:limit]
    mine = prompts[shard::shards]
    start = time.perf_counter()
    records = cached_harvest(mine, budget=len(mine), top_logprobs=SETTINGS["top_k"],
                             max_tokens=SETTINGS["max_tokens"], seed=0, progress=False)
    return {"shard": shard, "queries": len(records),
            "seconds": round(time.perf_counter() - start, 1),
            "completion_tokens": sum(r.completion_tokens for r in records),
            "prompt_tokens": sum(r.prompt_tokens for r in records)}


def run_one(mix: str, granularity: str, seed: int, steps: int, limit: int | None,
            threads: int) -> dict:
    """Phase 2: train (or load) one extracted student and score it (one row of the JSON)."""
    quiet_cpu_worker(threads)
    from utils.course_models import evaluate_course_model, public_row
    from utils.data import read_split
    from utils.evaluate import evaluate_world
    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model
    from utils.safety import CourseKeywordJudge, safety_eval_set

    recipe = recipe_for(mix, granularity, seed, steps, limit)
    was_cached = entry_dir(recipe).is_dir()
    model, tokenizer = load_model(recipe, progress=False, verbose=False)
    info = read_manifest(entry_dir(recipe))["build_info"]
    test = read_split("test")
    if limit is not None:
        test = test[:limit]
    start = time.perf_counter()
    metrics, _ = evaluate_world(model, tokenizer, test, with_perplexity=False)
    harness = evaluate_course_model(recipe.name, model, tokenizer, safety_eval_set(test),
                                    CourseKeywordJudge(), num_threads=threads)
    return {"mix": mix, "granularity": granularity, "seed": seed, "name": recipe.name,
            "cache_key": recipe.key(), "from_cache": was_cached,
            "student_params": count_parameters(model), "steps": info["steps"],
            "queries_answered": info["queries_answered"], "records_kept": info["records_kept"],
            "train_seconds": info["train_seconds"],
            "exact_match": metrics["exact_match"]["overall"],
            "exact_match_per_skill": metrics["exact_match"]["per_skill"],
            "world_safety": metrics["safety"],
            "harness": public_row(harness), "eval_seconds": round(time.perf_counter() - start, 1)}


def summarise(runs: list[dict], teacher_em: float) -> list[dict]:
    """One row per variant: mean and sample standard deviation over the seeds."""
    out = []
    for mix, granularity in VARIANTS:
        rows = sorted((r for r in runs if r["mix"] == mix and r["granularity"] == granularity),
                      key=lambda r: r["seed"])
        if not rows:
            continue
        em = [r["exact_match"] for r in rows]
        refusal = [r["harness"]["refusal_rate"] for r in rows]
        out.append({
            "mix": mix, "granularity": granularity, "seeds": [r["seed"] for r in rows],
            "student_params": rows[0]["student_params"], "steps": rows[0]["steps"],
            "queries": rows[0]["queries_answered"], "records_kept": rows[0]["records_kept"],
            "exact_match": em, "exact_match_mean": statistics.mean(em),
            "exact_match_std": statistics.stdev(em) if len(em) > 1 else 0.0,
            "kept_fraction_mean": statistics.mean(em) / teacher_em,
            "refusal_rate": refusal, "refusal_rate_mean": statistics.mean(refusal),
            "refusal_ci_seed0": rows[0]["harness"]["refusal_ci"],
            "over_refusal_rate_mean": statistics.mean(r["harness"]["over_refusal_rate"]
                                                      for r in rows),
            "heldout_jailbreak_success_mean": statistics.mean(
                r["harness"]["heldout_jailbreak_success_rate"] for r in rows),
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rows)})
    return out


def shipped_name(mix: str, granularity: str) -> str:
    return f"{SETTINGS['size']}-extracted-{granularity}-{mix}"


def _pool(jobs: int):
    import multiprocessing as mp

    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.io import atomic_write_json
    from utils.models import teacher_card
    from utils.results import cpu_name, provenance

    start = time.perf_counter()
    with _pool(args.jobs) as pool:
        harvests = list(pool.map(harvest_shard, range(args.jobs), [args.jobs] * args.jobs,
                                 [args.limit] * args.jobs, [args.threads] * args.jobs))
    harvest_wall = time.perf_counter() - start
    print(f"harvest: {sum(h['queries'] for h in harvests)} queries in {harvest_wall:.0f} s",
          flush=True)
    jobs = [(mix, g, seed) for seed in args.seeds for mix, g in VARIANTS]
    runs: list[dict] = []
    with _pool(args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.steps, args.limit, args.threads)
                   for job in jobs]
        for f in futures:
            row = f.result()
            runs.append(row)
            print(f"  {row['name']}: exact match {row['exact_match']:.3f}, refusal "
                  f"{row['harness']['refusal_rate']:.3f}, {row['train_seconds']:.0f} s",
                  flush=True)
    teacher = teacher_card()
    teacher_em = teacher["metrics"]["exact_match"]["overall"]
    prov = provenance()
    prov.update({"command": "python scripts/extract_students.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "cpu": cpu_name(), "jobs": args.jobs, "threads_per_job": args.threads,
                 "wall_seconds": round(time.perf_counter() - start, 1),
                 "harvest_wall_seconds": round(harvest_wall, 1), "quick": args.quick})
    payload = {"provenance": prov, "settings": {**SETTINGS, "steps": args.steps,
                                                "seeds": args.seeds, "queries": "every prompt"},
               "teacher": {"exact_match": teacher_em, "safety": teacher["metrics"]["safety"],
                           "parameters": teacher["parameters"]},
               "harvest": {"shards": harvests, "wall_seconds": round(harvest_wall, 1)},
               "runs": runs, "summary": summarise(runs, teacher_em),
               "shipped": {}}
    if args.ship:
        from utils.students import ship_recipe

        for mix, granularity in VARIANTS:
            recipe = recipe_for(mix, granularity, args.seeds[0], args.steps, args.limit)
            name = shipped_name(mix, granularity)
            folder = ship_recipe(recipe, name, provenance=prov, threads=args.threads * args.jobs,
                                 root=Path(args.ship_dir) if args.ship_dir else None,
                                 eval_limit=args.limit)
            payload["shipped"][f"{mix}/{granularity}"] = name
            print(f"  shipped {name} -> {folder}", flush=True)
    out = atomic_write_json(Path(args.out), payload)
    for row in payload["summary"]:
        print(f"{row['mix']:16s} {row['granularity']:5s} exact match "
              f"{row['exact_match_mean']:.3f} +- {row['exact_match_std']:.3f} "
              f"({100 * row['kept_fraction_mean']:.1f}% of the teacher's {teacher_em:.3f}), "
              f"refusal {row['refusal_rate_mean']:.3f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
