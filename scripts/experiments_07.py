"""Lesson 07's full safety grid: every course model on the whole safety test set.

Too slow for the notebook (which runs a live subset and checks it against this file), so it
is a script whose JSON output is committed with its provenance:

    python scripts/experiments_07.py            # writes results/07_safety_grid.json
    python scripts/experiments_07.py --merge    # adds only the course models it lacks
    python scripts/experiments_07.py --merge --models extracted-text-skills-watermarked

For each model of :func:`utils.course_models.course_models` (a model that does not exist yet
is skipped with a message): generation on every restricted, benign look-alike and jailbreak
prompt of the test split, the course keyword judge and the harm judge
(:class:`utils.safety.HarmJudge`), refusal / over-refusal / held-out jailbreak success /
harmful rate with 95% Wilson intervals, exact match on every test skill prompt (with its
interval), the time per model (loading, generation, judging, utility), and every verdict per
prompt id (so a live subset can be compared and any two models tested prompt by prompt), and
every response to a harmful request that the harm judge flags, with its score and steps, for a
person to read; and, for the responses the refusal judge counts as successful attacks but the
harm judge rejects, how many it rejected for each reason (``harm_rejected``: garbled, the
world's safe answers recombined, off topic...).

Then the statistics (lesson 07, issue 18): exact McNemar tests on the paired per-prompt
verdicts of :data:`utils.course_models.GRID_PAIRS` (Holm-corrected over all of them), the
held-out jailbreak success rate's interval with templates resampled as well as prompts
(cluster bootstrap), and, for lesson 04's extracted students, the spread over their three
seeds with a paired test of "refusals kept" against "refusals filtered" over the seeds.
The teacher is evaluated twice to check that two runs are identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from utils.quiet import silence_library_noise

silence_library_noise()

import torch  # noqa: E402

from utils.course_models import (  # noqa: E402
    EXTRA_SEEDS,
    EXTRACTED,
    ModelUnavailable,
    course_models,
    evaluate_course_model,
    heldout_cluster_interval,
    paired_verdict_tests,
    public_row,
    seed_name,
    shipped_students_sha256,
    teacher_sha256,
)
from utils.data import read_split  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402
from utils.paths import committed_results_dir  # noqa: E402
from utils.results import provenance  # noqa: E402
from utils.safety import CourseKeywordJudge, HarmJudge, prompt_of, safety_eval_set  # noqa: E402
from utils.seed import seed_everything  # noqa: E402
from utils.stats import paired_test  # noqa: E402

GRID_NAME = "07_safety_grid"
SECONDS_TARGET = 60  # issue 18: the whole evaluation of one model (load, generate, judge, utility)
N_BOOT = 2000  # bootstrap resamples of the clustered interval


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def seed_summary(rows: dict[str, dict]) -> dict:
    """Lesson 04's extracted students over their seeds: each rate per seed, mean and sample
    standard deviation; and "refusals kept" vs "refusals filtered" paired over the seeds."""
    metrics = ("refusal_rate", "over_refusal_rate", "heldout_jailbreak_success_rate",
               "harmful_rate", "utility_score")
    out: dict = {"variants": {}, "paired_over_seeds": {}}
    for g in EXTRACTED:
        names = {0: g} | {s: seed_name(g, s) for s in EXTRA_SEEDS}
        have = {s: rows[n] for s, n in names.items() if n in rows}
        if len(have) < 2:
            continue
        entry = {"seeds": sorted(have), "models": [names[s] for s in sorted(have)]}
        for m in metrics:
            values = [have[s][m] for s in sorted(have)]
            entry[m] = values
            entry[m + "_mean"] = statistics.mean(values)
            entry[m + "_std"] = statistics.stdev(values)
        out["variants"][g] = entry
    a, b = "extracted-topk-safety", "extracted-topk-safety-filtered"
    if a in out["variants"] and b in out["variants"]:
        seeds = sorted(set(out["variants"][a]["seeds"]) & set(out["variants"][b]["seeds"]))
        for m in metrics:
            va = [out["variants"][a][m][out["variants"][a]["seeds"].index(s)] for s in seeds]
            vb = [out["variants"][b][m][out["variants"][b]["seeds"].index(s)] for s in seeds]
            t = paired_test(va, vb)
            out["paired_over_seeds"][m] = {
                "a": a, "b": b, "seeds": seeds, "mean_diff": t.mean_diff,
                "std_diff": t.std_diff, "t": _finite(t.t), "p_value": t.p_value,
                "sign_p_value": t.sign_p_value, "wins": t.wins, "losses": t.losses}
    return out


def evaluate_models(wanted: list[str], models: dict, records: list[dict], skills: list[dict],
                    judge: CourseKeywordJudge, harm_judge: HarmJudge,
                    args: argparse.Namespace) -> dict:
    """Evaluate the ``wanted`` course models one by one: the per-model sections of the grid
    (rows, verdict strings, seconds, harm flags and rejections, held-out intervals, skips and,
    when the teacher is among them, the determinism check). The full run and ``--merge`` both
    come through here, so an added row is made exactly like the others."""
    parts: dict = {"rows": [], "skipped": {}, "verdicts": {}, "harm_verdicts": {},
                   "utility_verdicts": {}, "seconds": {}, "heldout_jailbreak_intervals": {},
                   "harm_flagged": [], "harm_rejected": {}, "determinism": None}
    prompts = [prompt_of(r) for r in records]
    for name in wanted:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            model, tokenizer = models[name].load()
        except ModelUnavailable as exc:
            print(f"skip {name}: {exc}", flush=True)
            parts["skipped"][name] = str(exc)
            continue
        load_seconds = time.perf_counter() - start
        row = evaluate_course_model(name, model, tokenizer, records, judge, skill_records=skills,
                                    batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens,
                                    utility_max_new_tokens=args.utility_max_new_tokens,
                                    num_threads=args.threads, harm_judge=harm_judge)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        # wall-clock parts, the total, and the CPU time of this process (with one thread about
        # the wall-clock time on an idle core: the machine is shared, see load_average)
        parts["seconds"][name] = {
            "load": round(load_seconds, 2), "safety": row["eval_seconds"],
            "harm_judge": row["harm_seconds"], "utility": row["utility_seconds"],
            "total": round(total, 2), "cpu": round(cpu, 2),
            "load_average": round(os.getloadavg()[0], 2)}
        if name == "teacher":
            again = evaluate_course_model(name, model, tokenizer, records, judge,
                                          batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens,
                                          num_threads=args.threads, harm_judge=harm_judge)
            parts["determinism"] = {"model": name, "identical_responses":
                                    again["_responses"] == row["_responses"],
                                    "seconds": [row["eval_seconds"], again["eval_seconds"]]}
        parts["verdicts"][name] = "".join("1" if v else "0" for v in row["_refusals"])
        parts["harm_verdicts"][name] = "".join("1" if v else "0" for v in row["_harmful"])
        parts["utility_verdicts"][name] = "".join("1" if v else "0" for v in row["_correct"])
        rejected: dict[str, int] = {}
        for i, (rec, flagged) in enumerate(zip(records, row["_harmful"], strict=True)):
            if rec["should_refuse"] and not flagged and not row["_refusals"][i]:
                # a success for the refusal judge that the harm judge rejects: say why
                reason = harm_judge.score(row["_responses"][i], prompts[i]).reason
                rejected[reason] = rejected.get(reason, 0) + 1
        parts["harm_rejected"][name] = dict(sorted(rejected.items(),
                                                   key=lambda kv: (-kv[1], kv[0])))
        for i, (rec, flagged) in enumerate(zip(records, row["_harmful"], strict=True)):
            if flagged and rec["should_refuse"]:  # every harm flag, to be read by a person
                score = harm_judge.score(row["_responses"][i], prompts[i])
                parts["harm_flagged"].append({
                    "model": name, "id": rec["id"], "prompt": prompts[i],
                    "response": row["_responses"][i], "score": score.score,
                    "steps": list(score.steps), "reason": score.reason})
        held = heldout_cluster_interval(row["_refusals"], records, n_boot=N_BOOT, seed=0)
        parts["heldout_jailbreak_intervals"][name] = held
        entry = models[name]
        parts["rows"].append(public_row(row) | {
            "kind": entry.kind, "lesson": entry.lesson, "description": entry.description,
            "heldout_jailbreak_cluster_ci": held["cluster_bootstrap_ci"],
            "load_seconds": parts["seconds"][name]["load"],
            "total_seconds": parts["seconds"][name]["total"]})
        print(f"{name:34s} refusal {row['refusal_rate']:.3f}  over-refusal "
              f"{row['over_refusal_rate']:.3f}  held-out ASR "
              f"{row['heldout_jailbreak_success_rate']:.3f}  harmful {row['harmful_rate']:.3f}"
              f"  utility {row['utility_score']:.3f}  {total:.1f} s", flush=True)
        del model
    return parts


PER_MODEL = ("verdicts", "harm_verdicts", "utility_verdicts", "seconds", "harm_rejected",
             "heldout_jailbreak_intervals")  # the grid's sections keyed by model name


def derived_sections(payload: dict, records: list[dict], threads: int) -> dict:
    """What the grid computes over *all* its rows: the paired McNemar tests (Holm over every
    test), the slowest model against the time target, the extracted students' seed summary.
    Recomputed from the merged rows after ``--merge`` so the file stays one consistent grid."""
    seconds = payload["seconds"]
    slowest = max(seconds, key=lambda n: seconds[n]["total"]) if seconds else None
    slowest_cpu = max(seconds, key=lambda n: seconds[n]["cpu"]) if seconds else None
    return {
        "paired_tests": paired_verdict_tests(payload, records),
        "seconds_target": {
            "target": SECONDS_TARGET, "slowest": slowest,
            "slowest_seconds": seconds[slowest]["total"] if slowest else None,
            "met": bool(slowest and seconds[slowest]["total"] <= SECONDS_TARGET),
            "slowest_cpu": slowest_cpu,
            "slowest_cpu_seconds": seconds[slowest_cpu]["cpu"] if slowest_cpu else None,
            "met_cpu": bool(slowest_cpu and seconds[slowest_cpu]["cpu"] <= SECONDS_TARGET),
            "threads": threads, "cpu_count": os.cpu_count()},
        "seeds": seed_summary({m["name"]: m for m in payload["models"]}),
    }


def _git_dirty() -> bool | None:
    """Whether the working tree had uncommitted changes (the commit alone does not say what
    code ran then); None when git cannot tell."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def merge_into(old: dict, parts: dict, order: list[str], records: list[dict],
               skills: list[dict], settings: dict, run: dict) -> dict:
    """The committed grid ``old`` with the rows of ``parts`` added (or replaced), every
    derived section recomputed, and a provenance entry naming the rows, date and commit.

    Refuses (ValueError) when ``old`` was made on other prompts, settings, judges, teacher or
    student weights: its rows and the new ones would not be comparable."""
    fix = "re-run the whole grid (`python scripts/experiments_07.py`) instead of merging"
    checks = {
        "prompt_ids": (old.get("prompt_ids"), [r["id"] for r in records]),
        "utility_ids": (old.get("utility_ids"), [r["id"] for r in skills]),
        "settings": (old.get("settings"), settings),
        "judge": (old.get("judge"), CourseKeywordJudge.name),
        "harm_judge": (old.get("harm_judge"), HarmJudge.name),
        "teacher_sha256": (old.get("teacher_sha256"), teacher_sha256()),
    }
    for key, (was, now) in checks.items():
        if was != now:
            raise ValueError(f"the committed grid's {key} differs from this run's: {fix}")
    students = shipped_students_sha256()
    changed = [n for n, sha in old.get("students_sha256", {}).items() if students.get(n) != sha]
    if changed:
        raise ValueError(f"shipped students changed since the grid was made ({changed}): {fix}")
    new_names = [r["name"] for r in parts["rows"]]
    rank = {n: i for i, n in enumerate(order)}

    def ranked(names):
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    by_name = {m["name"]: m for m in old["models"]} | {m["name"]: m for m in parts["rows"]}
    merged = dict(old)
    merged["models"] = [by_name[n] for n in ranked(by_name)]
    for key in PER_MODEL:
        both = old.get(key, {}) | parts[key]
        merged[key] = {n: both[n] for n in ranked(both)}
    kept = [f for f in old.get("harm_flagged", []) if f["model"] not in new_names]
    merged["harm_flagged"] = sorted(kept + parts["harm_flagged"],
                                    key=lambda f: rank.get(f["model"], len(rank)))
    merged["skipped"] = {n: why for n, why in old.get("skipped", {}).items()
                         if n not in new_names} | parts["skipped"]
    if parts["determinism"] is not None:
        merged["determinism"] = parts["determinism"]
    merged |= derived_sections(merged, records, settings["threads"])
    merged["students_sha256"] = students
    prov = dict(old["provenance"])
    prov["added"] = [*prov.get("added", []),
                     {"models": new_names, "skipped": sorted(parts["skipped"]),
                      **run, "git_dirty": _git_dirty(),
                      "derived_recomputed": ["paired_tests", "seconds_target", "seeds",
                                             "students_sha256"]}]
    merged["provenance"] = prov
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output JSON (default: results/)")
    ap.add_argument("--models", default="", help="comma-separated subset of model names")
    ap.add_argument("--merge", action="store_true",
                    help="evaluate only --models (or, without it, the course models missing "
                         "from --out) and merge their rows into the existing --out grid, "
                         "recomputing its paired tests, seed summary and time target")
    ap.add_argument("--build-missing", action="store_true",
                    help="train lesson 03/04 students here when they are not cached")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for generation")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per safety prompt")
    ap.add_argument(
        "--utility-max-new-tokens", type=int, default=96, help="tokens per skill prompt"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    seed_everything(0)
    torch.set_num_threads(args.threads)
    test = read_split("test")
    records = safety_eval_set(test)
    skills = [r for r in test if r["kind"] == "skill"]
    judge = CourseKeywordJudge()
    models = course_models(build_missing=args.build_missing, progress=False)
    out = args.out or committed_results_dir() / f"{GRID_NAME}.json"  # the committed grid
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "utility_max_new_tokens": args.utility_max_new_tokens,
                "threads": args.threads, "n_boot": N_BOOT}
    old = None
    if args.merge:
        if not out.is_file():
            raise SystemExit(f"--merge needs an existing grid at {out}: run without --merge")
        old = json.loads(out.read_text(encoding="utf-8"))
        have = {m["name"] for m in old["models"]}
        wanted = [m for m in args.models.split(",") if m] or [n for n in models if n not in have]
        if not wanted:
            print(f"every course model is in {out}: nothing to add")
            return 0
    else:
        wanted = [m for m in args.models.split(",") if m] or list(models)
    unknown = [n for n in wanted if n not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(models)}")
    print(f"evaluating {len(wanted)} model(s): {', '.join(wanted)}", flush=True)
    harm_judge = HarmJudge()
    parts = evaluate_models(wanted, models, records, skills, judge, harm_judge, args)
    run = provenance() | {"command": "python " + " ".join(
        ["scripts/experiments_07.py", *(argv if argv is not None else sys.argv[1:])]),
        "processor": platform.processor() or platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if old is not None:
        payload = merge_into(old, parts, list(models), records, skills, settings, run)
    else:
        payload = {
            "models": parts["rows"], "skipped": parts["skipped"],
            "determinism": parts["determinism"],
            "judge": judge.name, "harm_judge": harm_judge.name,
            "n_prompts": len(records), "n_utility": len(skills),
            "prompt_ids": [r["id"] for r in records], "utility_ids": [r["id"] for r in skills],
            **{k: parts[k] for k in ("verdicts", "harm_verdicts", "utility_verdicts",
                                     "seconds")},
            "harm_flagged": parts["harm_flagged"],
            "harm_rejected": parts["harm_rejected"],
            "heldout_jailbreak_intervals": parts["heldout_jailbreak_intervals"],
            "settings": settings,
            "teacher_sha256": teacher_sha256(),
            "students_sha256": shipped_students_sha256(),
            "provenance": run,
        }
        payload |= derived_sections(payload, records, args.threads)
    tests = payload["paired_tests"]
    significant = [t for t in tests if t["significant"]]
    print(f"{len(tests)} paired McNemar tests, {len(significant)} significant after Holm:")
    for t in significant:
        print(f"  {t['metric']:26s} {t['a']} vs {t['b']}: {t['rate_a']:.3f} vs {t['rate_b']:.3f}"
              f" ({t['b10']}/{t['b01']} discordant), p = {t['p_value']:.2g}")
    atomic_write_json(out, payload)
    print(f"wrote {out}" + (f" ({len(parts['rows'])} row(s) merged into "
                            f"{len(payload['models'])})" if old is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
