"""The teacher's own answer to every training skill prompt: data/models/teacher/train_answers.json.

    python scripts/teacher_answers.py            # after `make teacher` (make teacher-answers)

Lesson 03's scarce-label regime gives a student gold answers for only a fraction of the
prompts; sequence-level KD (Kim & Rush 2016) fills the rest with the teacher's greedy answers.
Generating 10,776 answers takes about 15 minutes on two cores, too slow for a notebook, so the
answers ship beside the teacher with the sha256 of the weights that wrote them:
:func:`utils.models.teacher_answers` refuses them when the teacher changed.

They are the very answers lesson 04's attacker harvests through the API (greedy, at most 128
tokens, :func:`utils.extraction.cached_harvest`): one cache serves both, and a white-box
distiller, who owns the teacher, would compute the same text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

SETTINGS = {"top_logprobs": 10, "max_tokens": 128, "temperature": 0.0, "seed": 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/teacher_answers.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=None, help="where to write (default: the teacher's folder)")
    args = p.parse_args(argv)
    quiet_cpu_worker(args.threads)
    from utils.data import read_split
    from utils.extraction import cached_harvest
    from utils.io import atomic_write_json, sha256_file
    from utils.models import TEACHER_ANSWERS, teacher_dir
    from utils.results import provenance

    start = time.perf_counter()
    skills = [r for r in read_split("train") if r["kind"] == "skill"]
    prompts = sorted({r["messages"][0]["content"] for r in skills})
    records = cached_harvest(prompts, budget=len(prompts), progress=sys.stderr.isatty(),
                             **SETTINGS)
    by_prompt = {r.prompt: r for r in records}
    answers = [{"id": r["id"], "text": by_prompt[r["messages"][0]["content"]].text,
                "finish_reason": by_prompt[r["messages"][0]["content"]].finish_reason}
               for r in skills]
    prov = provenance()
    prov.update(command="python scripts/teacher_answers.py", seconds=round(
        time.perf_counter() - start, 1))
    payload = {"description": "the teacher's greedy answer to every training skill prompt "
                              "(lesson 03's sequence-level KD)",
               "teacher_sha256": sha256_file(teacher_dir() / "model.safetensors"),
               "data_manifest_sha256": sha256_file(ROOT / "data" / "world" / "manifest.json"),
               "settings": SETTINGS, "provenance": prov, "answers": answers}
    out = atomic_write_json(Path(args.out) if args.out else teacher_dir() / TEACHER_ANSWERS,
                            payload)
    print(f"{len(answers)} answers ({len(prompts)} distinct prompts) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
