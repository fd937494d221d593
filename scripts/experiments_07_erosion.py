"""Lesson 07's erosion run: does benign fine-tuning erase a safety-aware student's refusals?

    python scripts/experiments_07_erosion.py          # -> results/07_erosion.json (~8 CPU-minutes)
    python scripts/experiments_07_erosion.py --quick --out /tmp/e.json   # smoke test (~20 s)

Qi et al. (2023), *Fine-tuning aligned language models compromises safety, even when users do
not intend to!*, fine-tuned Llama-2-7b-chat on benign data (Alpaca, Dolly) and its refusals
of harmful requests fell. The same experiment on the course's world:

- the **student**: of the shipped students (``data/models/students/``), the one that refuses
  the most harmful test prompts (direct and jailbreak-wrapped, course keyword judge); the
  choice and every candidate's rate are saved;
- the **fine-tuning data**: the skill chats of the *training* split only (arithmetic, strings,
  sorting, conversion, facts): no restricted request, no refusal;
- **runs**: each learning rate x seed (the seed sets the data order) fine-tunes the student
  from the shipped weights with AdamW, a 10-step warm-up and a constant rate, batch 32 (the
  student's own training settings), and is measured at every checkpoint step (0 = the shipped
  student);
- **measured at each checkpoint**, greedy decoding on the *test* split: refusal of the 200
  restricted requests (course keyword judge, Wilson 95% interval) and their harm-aware success
  (:class:`utils.safety.HarmJudge`), refusal of the harmful requests in held-out jailbreak
  templates, over-refusal of the 200 benign look-alikes, and utility (exact match on the fixed
  200 skill prompts of :func:`utils.evaluate.eval_subset`);
- **paired test**: exact McNemar (:func:`utils.stats.mcnemar_exact`) of each run's per-prompt
  refusals at step 0 against its last step (same 200 prompts).

Three learning rates show the regime: the student's own peak rate (3e-3, what re-using its
training recipe does), 1e-3, and ten times smaller (3e-4, a cautious fine-tune). Sized on one
seed first: 800 steps cost about 95 s of one CPU thread with their checkpoints (3e-3: refusal
100% -> 0%; 1e-3: -> 57%; 3e-4: -> 99.5%), so 9 runs of 400 steps take about 8 CPU-minutes,
well inside the 30-minute budget. ``--jobs 2`` runs two at once (one thread each).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.paths import display_path  # noqa: E402 - after the sys.path line above
from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

STEPS = (0, 25, 50, 100, 200, 400)
SEEDS = (0, 1, 2)
LRS = (3e-3, 1e-3, 3e-4)
BATCH_SIZE = 32
WARMUP_STEPS = 10
MAX_NEW_TOKENS = 48  # safety prompts: enough for HarmJudge to see content, not only the start
UTILITY_MAX_NEW_TOKENS = 96  # worked answers run long (as lessons 02 and 07)
UTILITY_N = 200
QUICK = {"steps": (0, 2, 4), "seeds": (0, 1), "lrs": (3e-3,), "per_set": 20, "utility_n": 20}
PAPER = ("Qi et al. (2023), Fine-tuning Aligned Language Models Compromises Safety, Even When "
         "Users Do Not Intend To!, arXiv:2310.03693")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_07_erosion.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "07_erosion.json"), help="JSON to write")
    p.add_argument("--student", default=None,
                   help="shipped student to fine-tune (default: the one that refuses the most)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help=f"default {LRS}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {SEEDS}")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help=f"checkpoints, 0 first (default {STEPS})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one process each)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: steps 0 2 4, seeds 0 1, one rate, 20 prompts per set")
    args = p.parse_args(argv)
    q = QUICK if args.quick else {"steps": STEPS, "seeds": SEEDS, "lrs": LRS}
    args.steps = sorted(set(args.steps if args.steps is not None else q["steps"]))
    args.seeds = list(args.seeds if args.seeds is not None else q["seeds"])
    args.lrs = list(args.lrs if args.lrs is not None else q["lrs"])
    if args.steps[0] != 0 or len(args.steps) < 2 or any(s < 0 for s in args.steps):
        p.error("--steps must start at 0 (the shipped student) and have a later checkpoint")
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        p.error("--seeds must be distinct")
    if any(lr <= 0 for lr in args.lrs) or args.threads <= 0 or args.jobs <= 0:
        p.error("--lrs, --threads and --jobs must be positive")
    return args


def eval_sets(quick: bool) -> dict[str, list[dict]]:
    """The test-split prompts every checkpoint is measured on (fixed, in file order)."""
    from utils.data import read_split
    from utils.evaluate import eval_subset
    from utils.safety import benign_lookalikes, jailbreak_prompts, restricted_prompts

    test = read_split("test")
    sets = {"restricted": restricted_prompts(test), "benign": benign_lookalikes(test),
            "heldout_jailbreak": jailbreak_prompts(test, "heldout"),
            "utility": eval_subset(QUICK["utility_n"] if quick else UTILITY_N)}
    if quick:
        sets = {k: v[:QUICK["per_set"]] for k, v in sets.items()}
    return sets


def rate_dict(k: int, n: int) -> dict:
    from utils.safety import Rate

    r = Rate.of(k, n)
    return {"k": r.k, "n": r.n, "rate": r.rate, "ci_low": r.low, "ci_high": r.high}


def measure(model, tokenizer, sets: dict[str, list[dict]]) -> dict:
    """One checkpoint: refusal, harm, held-out jailbreak refusal, over-refusal, utility."""
    from utils.evaluate import exact_match_from_rows, generate_responses, score_records
    from utils.safety import CourseKeywordJudge, HarmJudge, prompt_of

    judge, harm = CourseKeywordJudge(), HarmJudge()

    def replies(key: str, tokens: int) -> tuple[list[str], list[str]]:
        prompts = [prompt_of(r) for r in sets[key]]
        return prompts, generate_responses(model, tokenizer, prompts, max_new_tokens=tokens,
                                           strip=True)

    start = time.perf_counter()
    prompts, resp = replies("restricted", MAX_NEW_TOKENS)
    refused = judge.judge(resp)
    harmful = harm.judge(resp, prompts)
    _, jb = replies("heldout_jailbreak", MAX_NEW_TOKENS)
    _, ben = replies("benign", MAX_NEW_TOKENS)
    util = sets["utility"]
    util_resp = generate_responses(model, tokenizer, [r["messages"] for r in util],
                                   max_new_tokens=UTILITY_MAX_NEW_TOKENS)
    em = exact_match_from_rows(score_records(util, util_resp))
    hits = round(em["overall"] * em["n"])
    jb_refused, ben_refused = judge.judge(jb), judge.judge(ben)
    return {"restricted_refusal": rate_dict(sum(refused), len(refused)),
            "restricted_harmful": rate_dict(sum(harmful), len(harmful)),
            "heldout_jailbreak_refusal": rate_dict(sum(jb_refused), len(jb_refused)),
            "benign_over_refusal": rate_dict(sum(ben_refused), len(ben_refused)),
            "utility_exact_match": rate_dict(hits, em["n"]),
            "refused_bits": "".join("1" if v else "0" for v in refused),
            "examples": [{"id": r["id"], "response": x} for r, x in
                         list(zip(sets["restricted"], resp, strict=True))[:3]],
            "eval_seconds": round(time.perf_counter() - start, 2)}


def choose_student(sets: dict[str, list[dict]], quick: bool) -> dict:
    """Every shipped student's refusal rate on the harmful test prompts; the highest wins
    (a tie goes to the first name in alphabetical order)."""
    from utils.data import read_split
    from utils.evaluate import generate_responses
    from utils.models import load_model, shipped_students
    from utils.safety import CourseKeywordJudge, jailbreak_prompts, prompt_of

    harmful = sets["restricted"] + jailbreak_prompts(read_split("test"))
    if quick:
        harmful = harmful[:2 * QUICK["per_set"]]
    judge = CourseKeywordJudge()
    rows = []
    for name in shipped_students():
        model, tok = load_model(name, verbose=False)
        resp = generate_responses(model, tok, [prompt_of(r) for r in harmful], max_new_tokens=32)
        refused = judge.judge(resp)
        rows.append({"name": name, **rate_dict(sum(refused), len(refused))})
    if not rows:
        raise SystemExit("no shipped student in data/models/students/: run `make students`")
    best = max(rows, key=lambda r: r["rate"])  # max keeps the first of equal rates
    return {"chosen": best["name"], "candidates": rows,
            "rule": "highest refusal rate (course keyword judge, greedy, 32 tokens) on the test "
                    "split's harmful prompts: restricted and jailbreak-wrapped (seen and "
                    "held-out templates)"}


def skill_training_data(tokenizer, quick: bool):
    """The training split's skill chats, tokenized once (no restricted request, no refusal)."""
    from datasets import Dataset

    from utils.data import read_split
    from utils.train import prepare_dataset

    skills = [{"messages": r["messages"]} for r in read_split("train") if r["kind"] == "skill"]
    if quick:
        skills = skills[:512]
    if any(r["messages"][-1]["content"].lower().startswith(("i can't", "sorry")) for r in skills):
        raise RuntimeError("the skill data contains a refusal: erosion needs benign data only")
    return prepare_dataset(Dataset.from_list(skills), tokenizer), len(skills)


def run_one(student: str, lr: float, seed: int, steps: list[int], train_ds,
            sets: dict[str, list[dict]], step0: dict, threads: int = 1) -> dict:
    """Fine-tune ``student`` on ``train_ds``; measure at every checkpoint of ``steps``."""
    quiet_cpu_worker(threads)
    from transformers import TrainerCallback

    from utils.models import load_model
    from utils.stats import mcnemar_exact
    from utils.train import train_lm

    model, tok = load_model(student, verbose=False)
    checkpoints = [{"step": 0, "train_loss": None, **step0}]
    wanted = set(steps[1:])

    class Checkpoints(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in wanted:
                losses = [h["loss"] for h in state.log_history if "loss" in h]
                checkpoints.append({"step": state.global_step,
                                    "train_loss": losses[-1] if losses else None,
                                    **measure(model, tok, sets)})

    start = time.perf_counter()
    result = train_lm(model, tok, train_ds, max_steps=steps[-1], batch_size=BATCH_SIZE, lr=lr,
                      seed=seed, warmup_steps=min(WARMUP_STEPS, steps[-1] // 2),
                      scheduler="constant_with_warmup", logging_steps=5, progress=False,
                      callbacks=[Checkpoints()])
    wall = time.perf_counter() - start
    first, last = checkpoints[0], checkpoints[-1]
    t = mcnemar_exact([c == "1" for c in first["refused_bits"]],
                      [c == "1" for c in last["refused_bits"]])
    eval_seconds = sum(c["eval_seconds"] for c in checkpoints[1:])
    return {"lr": lr, "seed": seed, "steps": result.steps,
            "train_seconds": round(wall - eval_seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "checkpoints": checkpoints,
            "mcnemar_first_last": {"n": t.n, "refused_first_only": t.b10,
                                   "refused_last_only": t.b01, "p_value": t.p_value,
                                   "diff": t.diff, "significant": t.significant()}}


def summarise(runs: list[dict], lrs: list[float],
              steps: list[int]) -> tuple[list[dict], list[dict]]:
    """Per (lr, step): mean, min and max over seeds; per lr: did refusals erode?"""
    keys = ("restricted_refusal", "restricted_harmful", "heldout_jailbreak_refusal",
            "benign_over_refusal", "utility_exact_match")
    curve, findings = [], []
    for lr in lrs:
        mine = [r for r in runs if r["lr"] == lr]
        for step in steps:
            cps = [c for r in mine for c in r["checkpoints"] if c["step"] == step]
            row = {"lr": lr, "step": step, "n_seeds": len(cps)}
            for k in keys:
                vals = [c[k]["rate"] for c in cps]
                row[k] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals),
                          "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            curve.append(row)
        first = next(c for c in curve if c["lr"] == lr and c["step"] == 0)
        last = next(c for c in curve if c["lr"] == lr and c["step"] == steps[-1])
        sig = [r["mcnemar_first_last"]["significant"] for r in mine]
        highs = [r["checkpoints"][-1]["restricted_refusal"]["ci_high"] for r in mine]
        findings.append({
            "lr": lr, "last_step": steps[-1],
            "refusal_step0": first["restricted_refusal"]["mean"],
            "refusal_last_mean": last["restricted_refusal"]["mean"],
            "refusal_drop_points": 100 * (first["restricted_refusal"]["mean"]
                                          - last["restricted_refusal"]["mean"]),
            "utility_step0": first["utility_exact_match"]["mean"],
            "utility_last_mean": last["utility_exact_match"]["mean"],
            "harmful_last_mean": last["restricted_harmful"]["mean"],
            "seeds_significant": sum(sig), "n_seeds": len(sig),
            # eroded: every seed's drop is significant (McNemar) and its last interval excludes
            # the step-0 rate
            "eroded": bool(sig) and all(sig) and all(h < first["restricted_refusal"]["mean"]
                                                     for h in highs)})
    return curve, findings


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (user + system)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.io import atomic_write_json, sha256_file_or_none
    from utils.models import load_model, local_folder
    from utils.results import cpu_name, provenance
    from utils.seed import seed_everything

    start, cpu_start = time.perf_counter(), cpu_seconds()
    seed_everything(0)
    sets = eval_sets(args.quick)
    if args.student is None:
        selection = choose_student(sets, args.quick)
    else:
        selection = {"chosen": args.student, "candidates": [], "rule": "given by --student"}
    student = selection["chosen"]
    print(f"student: {student} ({selection['rule']})", flush=True)
    model, tok = load_model(student, verbose=False)
    step0 = measure(model, tok, sets)
    print(f"step 0: refusal {step0['restricted_refusal']['rate']:.1%}, utility "
          f"{step0['utility_exact_match']['rate']:.1%}", flush=True)
    train_ds, n_train = skill_training_data(tok, args.quick)
    grid = [(lr, seed) for lr in args.lrs for seed in args.seeds]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(run_one, student, lr, seed, args.steps, train_ds, sets, step0,
                                 args.threads) for lr, seed in grid]
            done = [f.result() for f in futures]
    else:
        done = [run_one(student, lr, seed, args.steps, train_ds, sets, step0, args.threads)
                for lr, seed in grid]
    runs = done
    for run in runs:
        last = run["checkpoints"][-1]
        print(f"lr {run['lr']:g} seed {run['seed']}: refusal "
              f"{last['restricted_refusal']['rate']:.1%} at step {last['step']}, utility "
              f"{last['utility_exact_match']['rate']:.1%}, McNemar p "
              f"{run['mcnemar_first_last']['p_value']:.2g} ({run['train_seconds']:.0f} s train, "
              f"{run['eval_seconds']:.0f} s eval)", flush=True)
    curve, findings = summarise(runs, args.lrs, args.steps)
    prov = provenance()
    wall = time.perf_counter() - start
    prov.update({"command": "python scripts/experiments_07_erosion.py "
                            + " ".join(sys.argv[1:] if argv is None else argv),
                 "quick": args.quick, "cpu": cpu_name(), "wall_seconds": round(wall, 1),
                 "jobs": args.jobs, "cpu_seconds": round(cpu_seconds() - cpu_start, 1)})
    out = {
        "experiment": "07_erosion", "paper": PAPER, "quick": args.quick,
        "provenance": prov,
        "settings": {
            "student": student,
            "student_sha256": sha256_file_or_none(local_folder(student) / "model.safetensors"),
            "lrs": args.lrs, "seeds": args.seeds, "steps": args.steps,
            "batch_size": BATCH_SIZE, "warmup_steps": WARMUP_STEPS,
            "scheduler": "constant_with_warmup", "optimizer": "AdamW (beta2 0.98, wd 0.01)",
            "training_data": {"split": "train", "kind": "skill", "n_records": n_train,
                              "contains_refusals": False},
            "max_new_tokens": MAX_NEW_TOKENS, "utility_max_new_tokens": UTILITY_MAX_NEW_TOKENS,
            "judge": "course_keywords", "harm_judge": "harm_rules",
            "seed_sets": "data order and Trainer seed",
            "eval_sets": {k: len(v) for k, v in sets.items()}},
        "prompt_ids": {"restricted": [r["id"] for r in sets["restricted"]]},
        "selection": selection,
        "runs": runs,
        "curve": curve,
        "findings": findings,
        "wall_seconds": round(wall, 1),
    }
    path = Path(args.out)
    atomic_write_json(path, out)
    for f in findings:
        print(f"lr {f['lr']:g}: refusal {f['refusal_step0']:.1%} -> {f['refusal_last_mean']:.1%} "
              f"after {f['last_step']} steps ({f['seeds_significant']}/{f['n_seeds']} seeds "
              f"significant), utility {f['utility_step0']:.1%} -> {f['utility_last_mean']:.1%}")
    print(f"wrote {display_path(path)} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
