"""Lesson 03's regime grid: when do the teacher's outputs beat training alone?

    python scripts/experiments_03_regimes.py            # -> results/03_regimes.json (~90 min)
    python scripts/experiments_03_regimes.py --quick --out /tmp/r.json   # smoke test

The students are ``student-xs`` (about 1/10 of the teacher) on the world's skill chats, built by
:func:`utils.recipes.distill_recipe` with ``transfer="skills"`` (so the notebook's live point
loads the very same cache entries). Regimes (``labelled``: the fraction of training prompts
with a gold answer, drawn by the seed; the same draw for every method of a seed):

- **scarce labels** (5% and 20%): ``sft`` trains on the gold answers alone; ``seq_kd``
  (Kim & Rush 2016) also sees every other prompt with the teacher's greedy answer
  (``data/models/teacher/train_answers.json``); ``forward_kl`` (at 5%) adds the teacher's
  full next-token distribution (white box) on the same sequences;
- **abundant exact labels** (100%): ``sft`` vs ``forward_kl``, the honest case where the
  teacher's near one-hot distribution adds almost nothing to the label;
- the **live** budget: 5% labels at a notebook's budget, the point lesson 03 re-runs;
- **from an SFT'd student** (``sft+500``, as GKD, Agarwal et al. 2024, and MiniLLM, Gu et al.
  2024, run it): each seed's 5% long-budget SFT student trained 500 more steps by SFT on its gold
  answers (the control), forward KL, reverse KL (mode-seeking) or on-policy GKD (a share of the
  batches are the student's own samples scored by the teacher), all on every training prompt.

Every method of a regime has the same steps, batch, optimiser, schedule and seeds (equal
steps); ``train_seconds`` is measured per run (wall-clock: ``forward_kl`` also runs the teacher).
Score: teacher-forced greedy exact match on every skill prompt of the test split
(:func:`utils.evaluate.teacher_forced_exact_match`), and its token accuracy (the finer signal at
the live budget, where whole answers are still rare). Each distillation method is compared with
``sft`` seed by seed (same seed = same gold subset, initialisation and batch order):
:func:`utils.stats.paired_test` (paired t and exact sign test). The teacher's mean next-token
entropy per skill (:func:`utils.evaluate.assistant_entropy`) says how much its soft targets
carry beyond the label. Runs are cached (``DD_CACHE_DIR``), so an interrupted grid resumes.
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
from utils.progress import paired_grid_parser, parse_paired_grid_args  # noqa: E402
from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

SIZE = "student-xs"
# (regime name, budget name, labelled fraction, methods); the budget's steps come from BUDGETS
# (forward_kl at 20% is left out: at ~3x SFT's wall-clock per run it did not fit the session's
# compute; `--regimes` style additions go at the end so earlier runs stay cached)
REGIMES = (("scarce-5%", "live", 0.05, ("sft", "seq_kd")),
           ("scarce-5%", "long", 0.05, ("sft", "seq_kd", "forward_kl")),
           ("abundant", "long", 1.0, ("sft", "forward_kl")),
           ("scarce-20%", "long", 0.2, ("sft", "seq_kd")),
           ("scarce-5%", "sft+500", 0.05, ("sft", "forward_kl", "reverse_kl", "on_policy")))
BUDGETS = {"live": 300, "long": 1500, "sft+500": 500}
# Budgets that continue from the same seed's long-budget SFT student (GKD and MiniLLM start
# from a student fine-tuned on the data): their "sft" row is SFT continued for as many steps.
WARM_STARTS = {"sft+500": "long"}
SCORE = ("teacher-forced greedy exact match on every skill prompt of the test split: the argmax "
         "reproduces every token of the gold response (and its end token)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = paired_grid_parser("scripts/experiments_03_regimes.py", __doc__.splitlines()[0],
                           str(ROOT / "results" / "03_regimes.json"))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 steps, seeds 0 1, 40 prompts (the numbers mean nothing)")
    return parse_paired_grid_args(p, argv)


def budgets(quick: bool) -> dict[str, int]:
    return {k: 3 for k in BUDGETS} if quick else dict(BUDGETS)


def recipe(method: str, labelled: float, steps: int, seed: int, budget: str = "long",
           quick: bool = False):
    """One run's recipe; a warm-started budget starts from that seed's SFT student."""
    from utils.recipes import distill_recipe

    init = None
    if budget in WARM_STARTS:
        init = recipe("sft", labelled, budgets(quick)[WARM_STARTS[budget]], seed,
                      WARM_STARTS[budget], quick)
    return distill_recipe(SIZE, method, steps=steps, seed=seed, transfer="skills",
                          labelled=labelled, init=init)


def test_records(quick: bool) -> list[dict]:
    from utils.evaluate import eval_subset

    skills = [r for r in eval_subset(980) if r["kind"] == "skill"]
    return skills[:40] if quick else skills


def run_one(regime: str, budget: str, labelled: float, method: str, steps: int, seed: int,
            threads: int, quick: bool) -> dict:
    """Build (or load from the cache) one student and score it: one row of the grid."""
    quiet_cpu_worker(threads)
    from utils.evaluate import teacher_forced_exact_match
    from utils.model_cache import entry_dir, read_manifest
    from utils.models import count_parameters, load_model

    r = recipe(method, labelled, steps, seed, budget, quick)
    was_cached = entry_dir(r).is_dir()
    model, tokenizer = load_model(r, progress=False, verbose=False)
    info = read_manifest(entry_dir(r))["build_info"]
    records = test_records(quick)
    scored = teacher_forced_exact_match(model, tokenizer, records)
    per_skill: dict[str, list[bool]] = {}
    for rec, hit in zip(records, scored["hits"], strict=True):
        per_skill.setdefault(rec["skill"], []).append(hit)
    return {"regime": regime, "budget": budget, "labelled": labelled, "method": method,
            "seed": seed, "steps": info["steps"], "student_params": count_parameters(model),
            "score": scored["score"], "token_accuracy": scored["token_accuracy"],
            "score_per_skill": {k: sum(v) / len(v) for k, v in sorted(per_skill.items())},
            "train_seconds": info["train_seconds"], "train_threads": info.get("torch_threads"),
            "tokens_seen": info.get("tokens_seen"), "from_cache": was_cached,
            "init": r.extra.get("init"), "name": r.name, "cache_key": r.key()}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (regime, budget, method), and each method's paired test against ``sft``."""
    from utils.stats import paired_test

    out = []
    for regime, budget, labelled, methods in REGIMES:
        rows = {m: sorted((r for r in runs if (r["regime"], r["budget"], r["method"])
                           == (regime, budget, m)), key=lambda r: r["seed"]) for m in methods}
        for method in methods:
            mine = rows[method]
            if not mine:
                continue
            scores = [r["score"] for r in mine]
            row = {"regime": regime, "budget": budget, "labelled": labelled, "method": method,
                   "steps": mine[0]["steps"], "seeds": [r["seed"] for r in mine],
                   "scores": scores, "mean": statistics.mean(scores),
                   "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                   "token_accuracy_mean": statistics.mean(r["token_accuracy"] for r in mine),
                   "token_accuracy_std": statistics.stdev(r["token_accuracy"] for r in mine)
                   if len(mine) > 1 else 0.0,
                   "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
                   "student_params": mine[0]["student_params"], "vs_sft": None}
            row["token_accuracy_vs_sft"] = None
            for metric, key in (("score", "vs_sft"), ("token_accuracy", "token_accuracy_vs_sft")):
                base = {r["seed"]: r[metric] for r in rows.get("sft", [])}
                common = [r for r in mine if r["seed"] in base]
                if method != "sft" and len(common) >= 2:
                    t = paired_test([r[metric] for r in common],
                                    [base[r["seed"]] for r in common])
                    row[key] = {"n": t.n, "mean_diff": t.mean_diff, "std_diff": t.std_diff,
                                "t": t.t, "p_value": t.p_value, "sign_p_value": t.sign_p_value,
                                "wins": t.wins, "losses": t.losses, "ties": t.ties}
            out.append(row)
    return out


def best_regime(summary: list[dict]) -> dict | None:
    """The long-budget comparison where distillation's paired gain over SFT is largest."""
    rows = [r for r in summary if r["budget"] == "long" and r["vs_sft"]]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["vs_sft"]["mean_diff"])
    sft = next(r for r in summary if (r["regime"], r["budget"], r["method"])
               == (best["regime"], best["budget"], "sft"))
    return {"regime": best["regime"], "labelled": best["labelled"], "method": best["method"],
            "mean": best["mean"], "sft_mean": sft["mean"], **best["vs_sft"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.evaluate import assistant_entropy, teacher_forced_exact_match
    from utils.io import atomic_write_json
    from utils.models import count_parameters, load_model
    from utils.progress import run_jobs
    from utils.results import cpu_name, provenance

    start = time.perf_counter()
    steps = budgets(args.quick)
    teacher, tokenizer = load_model("teacher", verbose=False)
    records = test_records(args.quick)
    teacher_scored = teacher_forced_exact_match(teacher, tokenizer, records)
    entropy = assistant_entropy(teacher, tokenizer, records)
    # the order of REGIMES: the live budget, then 5%, abundant, 20%
    jobs = [(regime, budget, labelled, method, steps[budget], seed)
            for regime, budget, labelled, methods in REGIMES for method in methods
            for seed in args.seeds]
    runs = run_jobs(run_one, jobs, workers=args.jobs, desc="regimes (regime x method x seed)",
                    extra=(args.threads, args.quick))
    wall = time.perf_counter() - start
    prov = provenance()
    prov.update({"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
                 if argv is None else "python scripts/experiments_03_regimes.py "
                 + " ".join(argv),
                 "cpu": cpu_name(), "jobs": args.jobs, "threads_per_job": args.threads,
                 "wall_seconds": round(wall, 1), "quick": args.quick,
                 "out": display_path(Path(args.out))})
    summary = summarise(runs)
    payload = {
        "provenance": prov,
        "score": SCORE,
        "size": SIZE,
        "budgets": steps,
        "batch_size": recipe("sft", 0.05, 1, 0).extra["batch_size"],
        "seeds": args.seeds,
        "eval": {"split": "test", "kind": "skill", "n": len(records)},
        "teacher": {"params": count_parameters(teacher), "score": teacher_scored["score"],
                    "token_accuracy": teacher_scored["token_accuracy"]},
        "teacher_entropy_nats": entropy,
        "runs": runs,
        "regimes": summary,
        "kd_vs_sft_best_regime": best_regime(summary),
    }
    out = atomic_write_json(Path(args.out), payload)
    print(f"{len(runs)} runs in {wall / 60:.1f} min -> {out}")
    print(f"teacher {teacher_scored['score']:.3f}; mean next-token entropy on its answers "
          f"{entropy['overall']:.4f} nats")
    for row in summary:
        test = row["vs_sft"]
        vs = (f"  vs sft {test['mean_diff']:+.3f}, paired t p = {test['p_value']:.2g}, "
              f"sign p = {test['sign_p_value']:.2g}" if test else "")
        print(f"  {row['regime']:11s} {row['budget']:5s} {row['method']:11s} "
              f"{row['mean']:.3f} +- {row['std']:.3f}  {row['train_seconds']:.0f} s/run{vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
