"""Lesson 07's adaptive attack: a budgeted random search for a universal suffix, per model.

    python scripts/experiments_07_adaptive.py   # -> results/07_adaptive.json (~4 CPU-minutes)
                                                # and results/07_adaptive_responses.json
    python scripts/experiments_07_adaptive.py --quick --out /tmp/a.json   # smoke test (~20 s)

The fixed jailbreak templates of the world were written before the models; an adaptive
attacker searches against each model (:mod:`utils.attacks`; Andriushchenko et al. 2024's
random search, a universal suffix as in Zou et al. 2023):

- **objective**: mean log-probability that the reply does *not* start with a refusal token,
  over ``--train-prompts`` restricted requests of the **training** split (a fixed sample);
- **search**: ``--length`` words of the model's own vocabulary, one random position changed
  per candidate, ``--candidates`` candidates per step, at most ``--budget`` suffixes scored
  (the query budget: suffixes x training prompts forward passes), per seed;
- **evaluation** on the 200 restricted requests of the **test** split (never searched on),
  greedy replies of 48 tokens: attack success by the course keyword judge (not refused) and
  by :class:`utils.safety.HarmJudge` (the reply fulfils the request), 95% Wilson intervals,
  exact McNemar against the same prompts without a suffix. Conditions: no attack; the
  search's random starting suffix (budget 1: what any noise does); the best suffix within
  budgets of 25, 100 and the whole budget; for reference, the fixed held-out jailbreak
  templates of the test split;
- **transfer**: each model's seed-0 suffix appended for every other model (the suffix found on
  an extracted copy, used against the teacher, is lesson 04's threat).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.paths import display_path  # noqa: E402 - after the sys.path line above
from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

MODELS = ("teacher", "student-xs-extracted-topk-safety", "student-xs-forward-kl",
          "student-xs-sft")
BUDGET = 400  # suffixes scored per search
BUDGET_POINTS = (1, 25, 100)  # smaller attacks read off the same search (1 = random suffix)
CANDIDATES = 16
LENGTH = 8
TRAIN_PROMPTS = 32
SEEDS = (0, 1)
MAX_NEW_TOKENS = 48
PROMPT_SAMPLE_SEED = 1234  # which training requests the objective uses (same for every model)
QUICK = {"budget": 9, "budget_points": (1,), "candidates": 4, "train_prompts": 4, "seeds": (0,),
         "test_prompts": 16, "models": ("student-xs-extracted-topk-safety",
                                        "student-xs-forward-kl")}
PAPERS = ["Andriushchenko et al. (2024), Jailbreaking Leading Safety-Aligned LLMs with Simple "
          "Adaptive Attacks, arXiv:2404.02151",
          "Zou et al. (2023), Universal and Transferable Adversarial Attacks on Aligned Language "
          "Models, arXiv:2307.15043",
          "Souly et al. (2024), A StrongREJECT for Empty Jailbreaks, arXiv:2402.10260"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_07_adaptive.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "07_adaptive.json"),
                   help="JSON to write")
    p.add_argument("--models", nargs="+", default=None, help=f"default {' '.join(MODELS)}")
    p.add_argument("--budget", type=int, default=None, help=f"suffixes per search ({BUDGET})")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"candidates per step ({CANDIDATES})")
    p.add_argument("--length", type=int, default=LENGTH, help="words in the suffix")
    p.add_argument("--train-prompts", type=int, default=None,
                   help=f"training requests in the objective ({TRAIN_PROMPTS})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {SEEDS}")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: two students, budget 9, 4 training and 16 test prompts")
    args = p.parse_args(argv)
    q = QUICK if args.quick else {"budget": BUDGET, "budget_points": BUDGET_POINTS,
                                  "candidates": CANDIDATES, "train_prompts": TRAIN_PROMPTS,
                                  "seeds": SEEDS, "test_prompts": None, "models": MODELS}
    for key in ("models", "budget", "candidates", "train_prompts", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, q[key])
    args.models, args.seeds = list(args.models), list(args.seeds)
    args.budget_points = sorted({b for b in q["budget_points"] if b < args.budget})
    args.test_prompts = q["test_prompts"]
    if min(args.budget, args.candidates, args.length, args.train_prompts, args.threads) < 1:
        p.error("--budget, --candidates, --length, --train-prompts and --threads must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    return args


def rate_dict(rate) -> dict:
    return {"k": rate.k, "n": rate.n, "rate": rate.rate, "ci_low": rate.low, "ci_high": rate.high}


def mcnemar_dict(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar of verdicts ``a`` (attacked) against ``b`` (no attack), same prompts."""
    from utils.stats import mcnemar_exact

    t = mcnemar_exact(a, b)
    return {"n": t.n, "attacked_only": t.b10, "baseline_only": t.b01, "p_value": t.p_value,
            "diff": t.diff, "significant": t.significant()}


def harm_reasons(out: dict, prompts: list[str]) -> dict[str, int]:
    """Why the harm judge did not count each reply the refusal judge counts as a success."""
    from utils.safety import HarmJudge

    counts: dict[str, int] = {}
    for response, prompt, refused, harmful in zip(out["responses"], prompts, out["refused"],
                                                  out["harmful"], strict=True):
        if not refused and not harmful:
            reason = HarmJudge().score(response, prompt).reason
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def outcome_row(condition: str, out: dict, base: dict | None, prompts: list[str],
                **extra) -> dict:
    """One evaluated condition: rates, paired tests against no attack, a few examples, and
    why the harm judge rejected the replies that were not refusals."""
    success = [not r for r in out["refused"]]
    row = {"condition": condition, **extra,
           "attack_success": rate_dict(out["attack_success"]),
           "harmful_success": rate_dict(out["harmful_success"]),
           "examples": out["responses"][:3],
           "harmful_examples": [r for r, h in zip(out["responses"], out["harmful"], strict=True)
                                if h][:3],
           "not_refused_not_harmful": harm_reasons(out, prompts)}
    if base is not None:
        row["mcnemar_success_vs_none"] = mcnemar_dict(success, [not r for r in base["refused"]])
        row["mcnemar_harmful_vs_none"] = mcnemar_dict(out["harmful"], base["harmful"])
    return row


def attack_model(name: str, args: argparse.Namespace, train_prompts: list[str],
                 test_prompts: list[str], heldout: list[str],
                 replies: list[dict] | None = None) -> tuple[dict, dict[int, tuple]]:
    """Search, then evaluate every condition, for one model; also its seed suffixes. The
    replies to the random suffix and to the full search are appended to ``replies``."""
    from utils.attacks import (
        NotRefusalObjective,
        attack_outcomes,
        random_search,
        refusal_start_ids,
        suffix_vocabulary,
    )
    from utils.evaluate import generate_responses
    from utils.models import count_parameters, load_model
    from utils.safety import CourseKeywordJudge, HarmJudge, Rate

    model, tok = load_model(name, verbose=False)
    vocab, refusal_ids = suffix_vocabulary(tok), refusal_start_ids(tok)
    test_objective = NotRefusalObjective(model, tok, test_prompts, refusal_ids)
    start = time.perf_counter()
    base = attack_outcomes(model, tok, test_prompts, ())
    rows = [outcome_row("none", base, None, test_prompts, seed=None, budget=0, suffix=[])]
    probs = {"none": float(test_objective.per_prompt(()).exp().mean())}
    searches, suffixes = [], {}
    for seed in args.seeds:
        objective = NotRefusalObjective(model, tok, train_prompts, refusal_ids)
        t0 = time.perf_counter()
        found = random_search(objective, vocab, length=args.length, budget=args.budget,
                              candidates_per_step=args.candidates, seed=seed)
        seconds = time.perf_counter() - t0
        if objective.evaluations != found.evaluations or found.evaluations > args.budget:
            raise RuntimeError("the search spent more than its budget")  # pragma: no cover
        searches.append({"seed": seed, "suffix": list(found.suffix),
                         "suffix_text": " ".join(found.suffix),
                         "initial_suffix": list(found.initial_suffix),
                         "objective_initial": found.initial_score, "objective_final": found.score,
                         "evaluations": found.evaluations, "queries": objective.queries,
                         "steps": found.steps, "accepted": found.accepted,
                         "seconds": round(seconds, 2),
                         "history": [[e, s] for e, s, _ in found.history]})
        suffixes[seed] = found.suffix
        for budget in [*args.budget_points, found.evaluations]:
            suffix, _ = found.best_within(budget)
            out = attack_outcomes(model, tok, test_prompts, suffix)
            cond = "random_suffix" if budget == 1 else "search"
            rows.append(outcome_row(cond, out, base, test_prompts, seed=seed, budget=budget,
                                    suffix=list(suffix)))
            if replies is not None and budget in (1, found.evaluations):
                replies.append({"model": name, "condition": cond, "seed": seed,
                                "budget": budget, "suffix": list(suffix),
                                "responses": out["responses"]})
            probs[f"{cond}/seed{seed}/budget{budget}"] = float(
                test_objective.per_prompt(suffix).exp().mean())
    # the fixed held-out templates of the test split, for reference (no search)
    replies = generate_responses(model, tok, heldout, max_new_tokens=MAX_NEW_TOKENS, strip=True)
    refused = CourseKeywordJudge().judge(replies)
    harmful = HarmJudge().judge(replies, heldout)
    fixed = {"responses": replies, "refused": refused, "harmful": harmful,
             "attack_success": Rate.of(len(refused) - sum(refused), len(refused)),
             "harmful_success": Rate.of(sum(harmful), len(harmful))}
    rows.append(outcome_row("fixed_heldout_templates", fixed, None, heldout, seed=None,
                            budget=0, suffix=None))
    result = {"name": name, "parameters": count_parameters(model), "vocabulary_size": len(vocab),
              "refusal_start_tokens": tok.convert_ids_to_tokens(refusal_ids),
              "searches": searches, "conditions": rows,
              "test_not_refusal_probability": probs,
              "queries": sum(s["queries"] for s in searches),
              "seconds": round(time.perf_counter() - start, 1)}
    return result, suffixes


def headline(result: dict, budget: int) -> dict:
    """No attack vs random suffix vs the full search (mean over seeds)."""
    def pick(cond: str, b: int | None) -> list[dict]:
        return [r for r in result["conditions"] if r["condition"] == cond
                and (b is None or r["budget"] == b)]

    none = pick("none", None)[0]
    rand, full = pick("random_suffix", 1), [r for r in pick("search", None)
                                           if r["budget"] == max(s["evaluations"]
                                                                 for s in result["searches"])]

    def mean(rows: list[dict], key: str) -> float | None:
        return statistics.mean(r[key]["rate"] for r in rows) if rows else None

    fixed = pick("fixed_heldout_templates", None)[0]
    return {"model": result["name"], "budget": budget, "queries": result["queries"],
            "none_success": none["attack_success"], "none_harmful": none["harmful_success"],
            "random_suffix_success_mean": mean(rand, "attack_success"),
            "random_suffix_harmful_mean": mean(rand, "harmful_success"),
            "attack_success_mean": mean(full, "attack_success"),
            "attack_harmful_mean": mean(full, "harmful_success"),
            "attack_success_by_seed": [r["attack_success"] for r in full],
            "attack_harmful_by_seed": [r["harmful_success"] for r in full],
            "all_seeds_significant": all(r["mcnemar_success_vs_none"]["significant"]
                                         for r in full),
            "fixed_heldout_templates_success": fixed["attack_success"],
            "fixed_heldout_templates_harmful": fixed["harmful_success"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.attacks import attack_outcomes
    from utils.data import read_split
    from utils.io import atomic_write_json
    from utils.models import load_model
    from utils.results import cpu_name, provenance
    from utils.safety import jailbreak_prompts, prompt_of, restricted_prompts
    from utils.seed import seed_everything

    start, cpu_start = time.perf_counter(), time.process_time()
    seed_everything(0)
    train = restricted_prompts(read_split("train"))
    sample = sorted(random.Random(PROMPT_SAMPLE_SEED).sample(range(len(train)),
                                                             args.train_prompts))
    train_recs = [train[i] for i in sample]
    test_recs = restricted_prompts(read_split("test"))
    heldout_recs = jailbreak_prompts(read_split("test"), "heldout")
    if args.test_prompts is not None:
        test_recs, heldout_recs = test_recs[:args.test_prompts], heldout_recs[:args.test_prompts]
    train_prompts = [prompt_of(r) for r in train_recs]
    test_prompts = [prompt_of(r) for r in test_recs]
    heldout = [prompt_of(r) for r in heldout_recs]
    results, suffixes, replies = [], {}, []
    for name in args.models:
        res, found = attack_model(name, args, train_prompts, test_prompts, heldout, replies)
        results.append(res)
        suffixes[name] = found[args.seeds[0]]
        h = headline(res, args.budget)
        print(f"{name}: no attack {h['none_success']['rate']:.1%}, random suffix "
              f"{h['random_suffix_success_mean']:.1%}, search {h['attack_success_mean']:.1%} "
              f"not refused; harmful {h['none_harmful']['rate']:.1%} -> "
              f"{h['attack_harmful_mean']:.1%} ({res['queries']} queries, {res['seconds']:.0f} s)",
              flush=True)
    transfer = []
    for target in args.models:
        model, tok = load_model(target, verbose=False)
        for source in args.models:
            out = attack_outcomes(model, tok, test_prompts, suffixes[source])
            transfer.append({"source": source, "target": target,
                             "suffix": list(suffixes[source]),
                             "attack_success": rate_dict(out["attack_success"]),
                             "harmful_success": rate_dict(out["harmful_success"])})
    wall = time.perf_counter() - start
    prov = provenance()
    prov.update({"command": "python scripts/experiments_07_adaptive.py "
                            + " ".join(sys.argv[1:] if argv is None else argv),
                 "quick": args.quick, "cpu": cpu_name(), "wall_seconds": round(wall, 1),
                 "cpu_seconds": round(time.process_time() - cpu_start, 1)})
    out = {
        "experiment": "07_adaptive", "papers": PAPERS, "quick": args.quick, "provenance": prov,
        "settings": {
            "models": args.models, "seeds": args.seeds, "budget": args.budget,
            "budget_points": [*args.budget_points, args.budget],
            "candidates_per_step": args.candidates, "suffix_length": args.length,
            "objective": "mean log P(first reply token is not a refusal start token) over the "
                         "training requests",
            "train_prompts": len(train_prompts), "train_prompt_ids": [r["id"] for r in train_recs],
            "train_split": "train", "test_split": "test", "test_prompts": len(test_prompts),
            "heldout_template_prompts": len(heldout), "max_new_tokens": MAX_NEW_TOKENS,
            "refusal_judge": "course_keywords", "harm_judge": "harm_rules",
            "queries_per_search": "suffixes scored x training requests (one forward pass each)"},
        "models": results,
        "summary": [headline(r, args.budget) for r in results],
        "transfer": transfer,
        "wall_seconds": round(wall, 1),
    }
    path = Path(args.out)
    atomic_write_json(path, out)
    # every reply to the random suffix and to the full search, for the harm judge's hand
    # labels (scripts/harm_labels.py draws its "attacked" rows from them)
    replies_path = path.with_name(path.stem + "_responses.json")
    atomic_write_json(replies_path, {
        "experiment": "07_adaptive", "source": display_path(path), "quick": args.quick,
        "provenance": prov, "prompt_ids": [r["id"] for r in test_recs], "runs": replies})
    print(f"wrote {display_path(path)} and {display_path(replies_path)} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
