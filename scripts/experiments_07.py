"""Lesson 07's full safety grid: every course model on the whole safety test set.

Too slow for the notebook (which runs a live subset and checks it against this file), so it
is a script whose JSON output is committed with its provenance:

    python scripts/experiments_07.py            # writes results/07_safety_grid.json

For each model of :func:`utils.course_models.course_models` (a model that does not exist yet
is skipped with a message): generation on every restricted, benign look-alike and jailbreak
prompt of the test split, the course keyword judge, refusal / over-refusal / held-out
jailbreak success with 95% Wilson intervals, exact match on every test skill prompt, the
time per model, and the judge's verdict per prompt id (so a live subset can be compared).
The teacher is evaluated twice to check that two runs are identical.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from utils.quiet import silence_library_noise

silence_library_noise()

import torch  # noqa: E402

from utils.course_models import (  # noqa: E402
    ModelUnavailable,
    course_models,
    evaluate_course_model,
    public_row,
    shipped_students_sha256,
    teacher_sha256,
)
from utils.data import read_split  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402
from utils.paths import committed_results_dir  # noqa: E402
from utils.results import provenance  # noqa: E402
from utils.safety import CourseKeywordJudge, safety_eval_set  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

GRID_NAME = "07_safety_grid"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output JSON (default: results/)")
    ap.add_argument("--models", default="", help="comma-separated subset of model names")
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
    wanted = [m for m in args.models.split(",") if m] or list(models)
    rows, skipped, verdicts = [], {}, {}
    determinism = None
    for name in wanted:
        try:
            model, tokenizer = models[name].load()
        except ModelUnavailable as exc:
            print(f"skip {name}: {exc}", flush=True)
            skipped[name] = str(exc)
            continue
        row = evaluate_course_model(name, model, tokenizer, records, judge, skill_records=skills,
                                    batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens,
                                    utility_max_new_tokens=args.utility_max_new_tokens,
                                    num_threads=args.threads)
        if name == "teacher":
            again = evaluate_course_model(name, model, tokenizer, records, judge,
                                          batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens,
                                          num_threads=args.threads)
            determinism = {"model": name, "identical_responses":
                           again["_responses"] == row["_responses"],
                           "seconds": [row["eval_seconds"], again["eval_seconds"]]}
        verdicts[name] = "".join("1" if v else "0" for v in row["_refusals"])
        rows.append(public_row(row) | {"kind": models[name].kind, "lesson": models[name].lesson,
                                       "description": models[name].description})
        print(f"{name:22s} refusal {row['refusal_rate']:.3f}  over-refusal "
              f"{row['over_refusal_rate']:.3f}  held-out ASR "
              f"{row['heldout_jailbreak_success_rate']:.3f}  utility {row['utility_score']:.3f}"
              f"  {row['eval_seconds']:.1f} s", flush=True)
    out = args.out or committed_results_dir() / f"{GRID_NAME}.json"  # the committed grid
    payload = {
        "models": rows, "skipped": skipped, "determinism": determinism,
        "judge": judge.name, "n_prompts": len(records), "n_utility": len(skills),
        "prompt_ids": [r["id"] for r in records], "verdicts": verdicts,
        "settings": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "utility_max_new_tokens": args.utility_max_new_tokens,
                     "threads": args.threads},
        "teacher_sha256": teacher_sha256(),
        "students_sha256": shipped_students_sha256(),
        "provenance": provenance() | {"command": "python " + " ".join(
            ["scripts/experiments_07.py", *(argv if argv is not None else sys.argv[1:])]),
            "processor": platform.processor() or platform.machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    atomic_write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
