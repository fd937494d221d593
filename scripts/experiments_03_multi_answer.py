"""Lesson 03's any-letter grid: distillation where the teacher's distribution *is* the knowledge.

    python scripts/experiments_03_multi_answer.py               # -> results/03_multi_answer.json
    python scripts/experiments_03_multi_answer.py --teacher-only  # build + commit the teacher
    python scripts/experiments_03_multi_answer.py --quick --out /tmp/m.json  # smoke test

The skill (:mod:`utils.multi_answer`): "Name one letter of b r o u n." Every letter is right; the
true answer distribution picks a position uniformly. A dataset holds one sampled answer per
prompt; the teacher (:func:`utils.recipes.any_letter_teacher_recipe`: the shipped teacher
fine-tuned with several answers per word) holds the distribution. It is built once and
committed to ``data/models/teacher-any-letter/`` (sha256 manifest, model card with provenance),
so lesson 03 loads it instead of spending ten minutes building it.

Students (:func:`utils.recipes.any_letter_student_recipe`) start from the shipped
``student-xs-sft`` (it knows the world, not this skill; about 1/10 of the teacher) and learn the
skill by ``sft`` (the labels), ``seq_kd`` (the teacher's greedy answers), ``forward_kl`` or
``reverse_kl`` (the teacher's distribution) or ``on_policy`` (GKD: reverse KL, half of the
batches the student's own sampled answers) at equal steps, on ``n_words`` training words:

- **scarce prompts** (``SCARCE`` words): many passes over few words, where one label per word is
  memorised;
- **abundant prompts** (``ABUNDANT`` words, about one pass): the honest case where one sampled
  label per prompt, over enough prompts, also teaches the distribution.

Score: :func:`utils.multi_answer.distribution_scores` on the 300 test words (exact, no
sampling): total variation to the true distribution (lower is better), validity, coverage,
entropy. Each method against ``sft`` seed by seed (same words, labels, initialisation and batch
order): :func:`utils.stats.paired_test`. Runs are cached (``DD_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.paths import display_path  # noqa: E402 - after the sys.path line above
from utils.progress import paired_grid_parser, parse_paired_grid_args  # noqa: E402
from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

SCARCE, ABUNDANT = 64, 4000
# (regime, training words, methods): the abundant case runs the two that matter there
REGIMES = (("scarce", SCARCE, ("sft", "seq_kd", "forward_kl", "reverse_kl", "on_policy")),
           ("abundant", ABUNDANT, ("sft", "forward_kl")))
STEPS = 300
METRICS = ("tv", "validity", "coverage", "entropy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = paired_grid_parser("scripts/experiments_03_multi_answer.py", __doc__.splitlines()[0],
                           str(ROOT / "results" / "03_multi_answer.json"))
    p.add_argument("--teacher-only", action="store_true",
                   help="build the any-letter teacher and commit it to data/models/, then stop")
    p.add_argument("--rebuild-teacher", action="store_true",
                   help="replace the committed teacher (then every student is rebuilt)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 steps, seeds 0 1, 20 test words (the numbers mean nothing)")
    return parse_paired_grid_args(p, argv)


def ship_teacher(threads: int, rebuild: bool) -> dict:
    """Build the any-letter teacher (cached) and copy it to data/models/ with its card."""
    import json

    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model
    from utils.multi_answer import distribution_scores, letter_token_ids, next_letter_probs, words
    from utils.recipes import any_letter_teacher_dir, any_letter_teacher_recipe
    from utils.results import cpu_name, provenance
    from utils.students import publish_entry

    final = any_letter_teacher_dir()
    recipe = any_letter_teacher_recipe()
    if (final / "manifest.json").is_file() and not rebuild:
        card = json.loads((final / "model_card.json").read_text(encoding="utf-8"))
        if card.get("cache_key") == recipe.key():
            return card
        print(f"the committed {display_path(final)} was built from another recipe or teacher "
              f"(key {card.get('cache_key')}, now {recipe.key()}): rebuilding it")
    quiet_cpu_worker(threads)
    model, tokenizer = load_model(recipe, verbose=False)
    source = entry_dir(recipe)
    test = words("test")
    scores = distribution_scores(next_letter_probs(model, tokenizer, test), test,
                                 letter_token_ids(tokenizer))
    built = read_manifest(source)
    card = {"name": "teacher-any-letter", "description": recipe.description,
            "recipe": "utils.recipes.any_letter_teacher_recipe", "cache_key": recipe.key(),
            "settings": recipe.extra, "parameters": count_parameters(model),
            "build_seconds": built["build_seconds"], "build_info": built["build_info"],
            "test": {k: v for k, v in scores.items() if k != "per_word"},
            "provenance": {**provenance(), "cpu": cpu_name(),
                           "command": "python scripts/experiments_03_multi_answer.py "
                           + " ".join(sys.argv[1:])}}
    card_text = json.dumps(card, indent=1, sort_keys=True) + "\n"
    # a new manifest over the weights *and* the card (load_any_letter_teacher verifies both)
    publish_entry(source, final, {"model_card.json": card_text},
                  manifest={k: v for k, v in built.items() if k != "files"})
    print(f"any-letter teacher: tv {scores['tv']:.3f}, validity {scores['validity']:.3f}, "
          f"built in {built['build_seconds'] / 60:.1f} min -> {display_path(final)}")
    return card


def test_words(quick: bool) -> list[str]:
    from utils.multi_answer import words

    return words("test")[:20] if quick else words("test")


def run_one(regime: str, n_words: int, method: str, steps: int, seed: int, threads: int,
            quick: bool) -> dict:
    """Build (or load from the cache) one student and score it: one row of the grid."""
    quiet_cpu_worker(threads)
    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model
    from utils.multi_answer import distribution_scores, letter_token_ids, next_letter_probs
    from utils.recipes import any_letter_student_recipe

    r = any_letter_student_recipe(method, n_words=n_words, steps=steps, seed=seed)
    was_cached = entry_dir(r).is_dir()
    model, tokenizer = load_model(r, progress=False, verbose=False)
    info = read_manifest(entry_dir(r))["build_info"]
    test = test_words(quick)
    scores = distribution_scores(next_letter_probs(model, tokenizer, test), test,
                                 letter_token_ids(tokenizer))
    return {"regime": regime, "n_words": n_words, "method": method, "seed": seed,
            "steps": info["steps"], "student_params": count_parameters(model),
            **{k: scores[k] for k in METRICS},
            "train_seconds": info["train_seconds"], "train_threads": info.get("torch_threads"),
            "from_cache": was_cached, "name": r.name, "cache_key": r.key()}


def summarise(runs: list[dict], regimes: tuple = REGIMES) -> list[dict]:
    """One row per (regime, method): means, spreads and the paired test against ``sft``."""
    from utils.stats import paired_test

    out = []
    for regime, n_words, methods in regimes:
        rows = {m: sorted((r for r in runs if (r["regime"], r["method"]) == (regime, m)),
                          key=lambda r: r["seed"]) for m in methods}
        base = {r["seed"]: r for r in rows.get("sft", [])}
        for method in methods:
            mine = rows[method]
            if not mine:
                continue
            row = {"regime": regime, "n_words": n_words, "method": method,
                   "steps": mine[0]["steps"], "seeds": [r["seed"] for r in mine],
                   "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
                   "vs_sft": None}
            for k in METRICS:
                vals = [r[k] for r in mine]
                row[k] = vals
                row[f"{k}_mean"] = statistics.mean(vals)
                row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            common = [r for r in mine if r["seed"] in base]
            if method != "sft" and len(common) >= 2:
                # TV: lower is better, so the difference is sft - method (> 0: method better)
                t = paired_test([base[r["seed"]]["tv"] for r in common],
                                [r["tv"] for r in common])
                row["vs_sft"] = {"metric": "tv (sft - method: > 0 means closer to the truth)",
                                 **asdict(t)}
            out.append(row)
    return out


def kl_directions(runs: list[dict], regime: str = "scarce", a: str = "forward_kl",
                  b: str = "reverse_kl") -> dict | None:
    """Method ``a`` against ``b``, seed by seed, on every metric (``a - b``). Forward against
    reverse KL: mass-covering vs mode-seeking (a mode-seeker has higher validity and lower
    entropy); on-policy against reverse KL: what the student's own samples add."""
    from utils.stats import paired_test

    by = {m: {r["seed"]: r for r in runs if (r["regime"], r["method"]) == (regime, m)}
          for m in (a, b)}
    seeds = sorted(set(by[a]) & set(by[b]))
    if len(seeds) < 2:
        return None
    out = {"regime": regime, "seeds": seeds}
    for k in METRICS:
        t = paired_test([by[a][s][k] for s in seeds], [by[b][s][k] for s in seeds])
        out[k] = {"mean_diff": t.mean_diff, "p_value": t.p_value, "sign_p_value": t.sign_p_value,
                  "wins": t.wins, "losses": t.losses, "n": t.n}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.evaluate import assistant_entropy
    from utils.io import atomic_write_json
    from utils.models import count_parameters
    from utils.multi_answer import (
        SKILL,
        distribution_scores,
        gold_records,
        letter_token_ids,
        next_letter_probs,
        words,
    )
    from utils.progress import run_jobs
    from utils.recipes import ANY_LETTER_START, load_any_letter_teacher
    from utils.results import cpu_name, provenance

    start = time.perf_counter()
    card = ship_teacher(args.threads, args.rebuild_teacher)
    if args.teacher_only:
        return 0
    teacher, tokenizer = load_any_letter_teacher()
    test = test_words(args.quick)
    ids = letter_token_ids(tokenizer)
    teacher_scores = distribution_scores(next_letter_probs(teacher, tokenizer, test), test, ids)
    # the mean next-token entropy on the skill's assistant tokens (Answer, :, the letter, end)
    entropy = assistant_entropy(teacher, tokenizer, gold_records(test, seed=0))
    from utils.models import load_model

    start_model, _ = load_model(ANY_LETTER_START, verbose=False)
    start_scores = distribution_scores(next_letter_probs(start_model, tokenizer, test), test, ids)
    steps = 3 if args.quick else STEPS
    regimes = (tuple((name, n // 8, methods) for name, n, methods in REGIMES) if args.quick
               else REGIMES)
    jobs = [(regime, n, method, steps, seed) for regime, n, methods in regimes
            for method in methods for seed in args.seeds]
    runs = run_jobs(run_one, jobs, workers=args.jobs, desc="any-letter (regime x method x seed)",
                    extra=(args.threads, args.quick))
    wall = time.perf_counter() - start
    prov = provenance()
    prov.update({"command": "python scripts/experiments_03_multi_answer.py "
                 + " ".join(sys.argv[1:] if argv is None else argv),
                 "cpu": cpu_name(), "jobs": args.jobs, "threads_per_job": args.threads,
                 "wall_seconds": round(wall, 1), "quick": args.quick,
                 "out": display_path(Path(args.out))})
    summary = summarise(runs, regimes)
    payload = {
        "provenance": prov,
        "skill": SKILL,
        "score": "utils.multi_answer.distribution_scores on the test words (exact next-token "
                 "distribution after 'Answer:'; tv = total variation to the true distribution)",
        "steps": steps,
        "start": {"name": ANY_LETTER_START, **{k: start_scores[k] for k in METRICS}},
        "seeds": args.seeds,
        "eval": {"words": len(test), "split": "test"},
        "teacher": {"params": count_parameters(teacher), "card": card,
                    **{k: teacher_scores[k] for k in (*METRICS, "truth_entropy")}},
        "teacher_entropy_nats": entropy,
        "runs": runs,
        "regimes": summary,
        "forward_vs_reverse": kl_directions(runs),
        "on_policy_vs_reverse": kl_directions(runs, a="on_policy", b="reverse_kl"),
    }
    out = atomic_write_json(Path(args.out), payload)
    print(f"{len(runs)} runs in {wall / 60:.1f} min -> {out}")
    print(f"teacher tv {teacher_scores['tv']:.3f}, mean entropy on the skill's assistant tokens "
          f"{entropy['overall']:.3f} nats; words: {len(words('train'))} train, {len(test)} test")
    for row in summary:
        t = row["vs_sft"]
        vs = (f"  vs sft {t['mean_diff']:+.3f}, paired t p = {t['p_value']:.2g}, sign p = "
              f"{t['sign_p_value']:.2g}" if t else "")
        print(f"  {row['regime']:8s} {row['method']:10s} tv {row['tv_mean']:.3f} +- "
              f"{row['tv_std']:.3f}  valid {row['validity_mean']:.3f}  cover "
              f"{row['coverage_mean']:.3f}  {row['train_seconds']:.0f} s/run{vs}")
    for key, what in (("forward_vs_reverse", "forward - reverse KL"),
                      ("on_policy_vs_reverse", "on-policy - reverse KL")):
        kl = payload[key]
        if kl:
            print(f"{what} (scarce), paired: " + ", ".join(
                f"{k} {kl[k]['mean_diff']:+.3f} (p = {kl[k]['p_value']:.2g})" for k in METRICS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
