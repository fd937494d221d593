"""Lesson 04's watermark and radioactivity on realistic traffic (issue 17).

    python scripts/experiments_04_radioactivity.py          # 4 single-thread processes, ~20 min
    python scripts/experiments_04_radioactivity.py --quick --out /tmp/r.json   # a smoke test

Everything is measured on the teacher's *natural* short answers (no ``min_tokens``):

1. **The delta table** (a worker process). The teacher answers every test skill prompt with a
   Kirchenbauer et al. (2023) watermark of strength delta (0 = none), greedy and sampled at
   temperature 1, with the ``generate`` call its API makes
   (:func:`utils.watermark.chat_generations`). For each delta: the teacher's exact match (the
   cost to every honest user), the share of answers the watermark changed, and the detection
   over all answers pooled (each (context, token) tuple once) and one answer at a time.
2. **The attacker's harvest.** Skill prompts new to the teacher (the test split's, all 980 by
   default), each asked ``--repeats`` times, natural answers sampled at ``--temperature`` (1,
   the API's default) up to 128 tokens, text only, once with the watermark (``--delta``) and
   once without: the API's ``generate`` call, batched (the API serves one request at a time,
   about 10x slower here). The first ``API_CHECK`` prompts go to the real OpenAI-compatible API
   too (:func:`utils.extraction.cached_harvest`): its time per query, and the share of identical
   answers (all of them for greedy harvests; sampled ones share only the distribution).
3. **Suspects.** ``student-xs`` (1/10.6 of the teacher) trained by sequence-level KD
   (:func:`utils.train.train_lm`) on a harvest of which ``fraction`` came from the watermarked
   API (the first ``fraction * queries`` prompts of the shuffled list, the rest from the clean
   one); fraction 0 is the control: same prompts, budget, steps and seed. The shipped extracted
   student (clean traffic, every prompt) is a second control.
4. **Radioactivity** (Sander et al. 2024, closed model): every suspect answers **fresh**
   prompts it never saw (the validation split's skill prompts: never harvested, never trained
   on), greedy and ``--samples`` times sampled; each (context window, token) tuple counts once;
   one exact binomial test per suspect and mode.

The JSON (``results/04_radioactivity.json``) holds the table, the harvest's cost, every
suspect's scores and exact match, the headline ``radioactivity_realistic``, the provenance with
wall-clock and CPU time (all processes), and for the first ``STORE_PROMPTS`` fresh prompts each
suspect's greedy answers as token ids (lesson 04 re-scores them and regenerates the shipped
student's live).
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

from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

SHIPPED_CONTROL = "student-xs-extracted-text-skills"
API_CHECK = 16  # prompts also sent to the real API, to check the batched harvest against it
STORE_PROMPTS = 64  # fresh prompts whose greedy answers are stored for the notebook
Z_DETECT = 4.0  # per-answer detection threshold of the table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_04_radioactivity.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "04_radioactivity.json"))
    p.add_argument("--delta", type=float, default=8.0,
                   help="watermark strength of the attacker's harvest (default 8)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the harvest's temperature (default 1, the API's default)")
    p.add_argument("--queries", type=int, default=None,
                   help="distinct prompts the attacker sends (default: all 980)")
    p.add_argument("--repeats", type=int, default=2,
                   help="times each prompt is asked (sampled answers differ)")
    p.add_argument("--steps", type=int, default=1000, help="training steps of each student")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5],
                   help="shares of the harvest that come from the watermarked API")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.0, 2.0, 5.0, 8.0],
                   help="watermark strengths of the delta table")
    p.add_argument("--samples", type=int, default=2,
                   help="sampled answers per fresh prompt (besides the greedy one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=4,
                   help="worker processes (the table, then the students, in parallel)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 24 queries, 4 steps, 24 prompts per set (numbers mean "
                        "nothing)")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.steps, args.deltas, args.samples = 24, 4, [0.0, 8.0], 1
    args.limit = 24 if args.quick else None
    if min(args.queries or 1, args.repeats, args.steps, args.threads, args.jobs) <= 0 \
            or args.samples < 0:
        p.error("--queries, --repeats, --steps, --threads and --jobs must be positive, "
                "--samples >= 0")
    if not all(0.0 < f <= 1.0 for f in args.fractions):
        p.error("every --fractions value must be in (0, 1]: the control (0) is always run")
    if args.delta <= 0:
        p.error("--delta must be > 0")
    return args


def score_row(score) -> dict:
    """A :class:`utils.watermark.WatermarkScore` as JSON."""
    return {"scored_tuples": score.num_scored, "green": score.num_green,
            "green_fraction": score.green_fraction, "z": score.z_score,
            "p_value": score.p_value}


def delta_table(teacher, tok, records, deltas, *, seed: int) -> list[dict]:
    """Phase 1: the teacher's cost (exact match) and detectability for each delta.

    ``exact_match_eval64`` is the same measure on lesson 04's 64 evaluation records
    (:func:`utils.extraction.fidelity_eval_records`, a subset of ``records``): the notebook
    regenerates the greedy row at its ``WATERMARK_BIAS`` live and compares.
    """
    from utils.evaluate import score_records
    from utils.extraction import fidelity_eval_records, watermark_config
    from utils.watermark import (
        chat_generations,
        radioactivity_of_generations,
        score_pairs,
        scored_pairs,
    )

    vocab = teacher.config.vocab_size
    prompts = [r["messages"][0]["content"] for r in records]
    eval64 = fidelity_eval_records(64)
    sub = [i for i, r in enumerate(records) if r in eval64]
    rows = []
    for decoding, temperature in (("greedy", 0.0), ("sampled T=1", 1.0)):
        base = None
        for delta in deltas:
            start = time.perf_counter()
            wm = watermark_config(delta) if delta > 0 else None
            gens = chat_generations(teacher, tok, prompts, temperature=temperature, seed=seed,
                                    watermark_config=wm)
            texts = [tok.decode(g.ids, skip_special_tokens=True) for g in gens]
            if base is None:
                base = [g.ids for g in gens]
            correct = [r["correct"] for r in score_records(records, texts)]
            em = statistics.mean(correct)
            detector = watermark_config(max(delta, 1.0))  # green lists do not depend on delta
            pooled = radioactivity_of_generations(gens, vocab, detector)
            per = [score_pairs(scored_pairs([*g.prompt_ids, *g.ids], detector,
                                            start=len(g.prompt_ids)), vocab, detector)
                   for g in gens if g.ids]
            rows.append({
                "delta": delta, "decoding": decoding, "answers": len(gens),
                "exact_match": em,
                "exact_match_eval64": statistics.mean(correct[i] for i in sub) if sub else None,
                "changed_share": statistics.mean(
                    g.ids != b for g, b in zip(gens, base, strict=True)),
                "mean_answer_tokens": statistics.mean(len(g.ids) for g in gens),
                "pooled": score_row(pooled),
                "median_answer_z": statistics.median(s.z_score for s in per),
                "answers_detected_share": statistics.mean(s.z_score >= Z_DETECT for s in per),
                "seconds": round(time.perf_counter() - start, 1)})
            print(f"  {decoding:12s} delta {delta:4.1f}: exact match {em:.3f}, pooled z "
                  f"{pooled.z_score:6.2f} over {pooled.num_scored} tuples", flush=True)
    return rows


def table_worker(deltas: list[float], limit: int | None, threads: int) -> tuple[list, float]:
    """The delta table in its own process: ``(rows, CPU seconds)``."""
    quiet_cpu_worker(threads)
    from utils.data import read_split
    from utils.models import load_model

    cpu0 = time.process_time()
    teacher, tok = load_model("teacher", verbose=False)
    test = [r for r in read_split("test") if r["kind"] == "skill"][:limit]
    rows = delta_table(teacher, tok, test, deltas, seed=0)
    return rows, time.process_time() - cpu0


def attacker_prompts(queries: int | None, limit: int | None) -> list[str]:
    """The attacker's prompts: skill prompts the teacher never trained on (the test split's).

    Not the training split's: the teacher answers those from memory, surer of every token, so
    the same bias moves them less (``training_prompt_contrast`` in the JSON measures it; at
    greedy decoding they barely move at all), while a real attacker's prompts are new to the
    model it queries.
    """
    from utils.data import read_split

    prompts = [r["messages"][0]["content"] for r in read_split("test") if r["kind"] == "skill"]
    return prompts[:limit][:queries]


def harvest_pair(teacher, tok, prompts: list[str], args) -> dict[str, list[dict]]:
    """The teacher's answers with and without the watermark: the API's ``generate`` call
    (:func:`utils.watermark.chat_generations`, same settings), batched. Greedy answers are the
    API's answers exactly; :func:`api_agreement` checks a sample through the real API."""
    from utils.extraction import watermark_config
    from utils.watermark import chat_generations

    out = {}
    for label, wm in (("watermarked", watermark_config(args.delta)), ("clean", None)):
        out[label] = []
        for rep in range(args.repeats):  # each prompt asked ``repeats`` times (new samples)
            gens = chat_generations(teacher, tok, prompts, max_new_tokens=128,
                                    temperature=args.temperature, seed=rep, watermark_config=wm)
            out[label] += [{"messages": [{"role": "user", "content": p}],
                            "text": tok.decode(g.ids, skip_special_tokens=True),
                            "finish_reason": "stop" if g.stopped else "length",
                            "completion_tokens": len(g.ids)}
                           for p, g in zip(prompts, gens, strict=True)]
    return out


def train_prompt_contrast(teacher, tok, args, n: int = 256) -> dict:
    """Why the attacker's prompts are new ones: the teacher's own training prompts, answered
    with the same watermark, pooled: a memorised answer barely moves."""
    from utils.extraction import skill_prompts, watermark_config
    from utils.watermark import chat_generations, radioactivity_of_generations

    wm = watermark_config(args.delta)
    out = {}
    for split in ("train", "test"):
        gens = chat_generations(teacher, tok, skill_prompts(split, n, seed=0)[:args.limit],
                                temperature=args.temperature, seed=0, watermark_config=wm)
        out[split] = score_row(radioactivity_of_generations(gens, teacher.config.vocab_size, wm))
    return out


def api_agreement(teacher, tok, prompts: list[str], harvest: dict, args) -> dict:
    """The first prompts sent to the real OpenAI-compatible API (watermarked and clean):
    the share of answers identical to the batched harvest, and the API's time per query."""
    from utils.extraction import cached_harvest, watermark_config
    from utils.serve import Defences

    out = {"prompts": len(prompts)}
    for label, defences in (("watermarked", Defences(watermark=watermark_config(args.delta))),
                            ("clean", Defences())):
        start = time.perf_counter()
        recs = cached_harvest(prompts, budget=len(prompts), top_logprobs=None, max_tokens=128,
                              temperature=args.temperature, seed=0, defences=defences,
                              model=teacher, tokenizer=tok, progress=False)
        out[f"{label}_seconds_per_query"] = (time.perf_counter() - start) / len(prompts)
        out[f"{label}_identical_share"] = statistics.mean(
            r.text == h["text"] for r, h in zip(recs, harvest[label], strict=False))
    return out


def train_and_score(fraction: float, harvest_file: str, settings: dict, threads: int) -> dict:
    """One suspect: ``student-xs`` trained on a harvest ``fraction`` watermarked, then scored.

    The first ``fraction * queries`` prompts (a random subset: the list is shuffled) keep the
    watermarked API's answers, the rest the clean API's; fraction 0 is the control.
    """
    quiet_cpu_worker(threads)
    import json

    from datasets import Dataset

    from utils.extraction import HarvestRecord, sft_examples
    from utils.models import build_model, count_parameters, load_model, zoo_config
    from utils.train import train_lm

    cpu0 = time.process_time()
    harvest = json.loads(Path(harvest_file).read_text())
    _, tok = load_model("teacher", verbose=False)
    n_wm = round(fraction * len(harvest["clean"]))
    rows = harvest["watermarked"][:n_wm] + harvest["clean"][n_wm:]
    records = [HarvestRecord(messages=r["messages"], text=r["text"],
                             finish_reason=r["finish_reason"]) for r in rows]
    student = build_model(zoo_config("student-xs"), seed=settings["seed"])
    result = train_lm(student, tok, Dataset.from_list(sft_examples(records)),
                      max_steps=settings["steps"], batch_size=32, lr=3e-3, seed=settings["seed"],
                      progress=False, max_length=256)
    row = {"label": "control" if fraction == 0 else f"{fraction:.0%} watermarked",
           "fraction": fraction, "name": f"student-xs-radioactive-f{fraction:g}",
           "parameters": count_parameters(student), "steps": result.steps,
           "train_seconds": round(result.train_seconds, 1), "records": len(records),
           "watermarked_records": n_wm,
           **score_suspect(student, tok, settings)}
    row["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    return row


def score_shipped(settings: dict, threads: int) -> dict:
    """The shipped extracted student (clean greedy traffic, every prompt): a second control."""
    quiet_cpu_worker(threads)
    from utils.models import count_parameters, load_model

    cpu0 = time.process_time()
    model, tok = load_model(SHIPPED_CONTROL, verbose=False)
    row = {"label": "shipped extracted (clean, every prompt)", "fraction": 0.0,
           "name": SHIPPED_CONTROL, "parameters": count_parameters(model),
           **score_suspect(model, tok, settings)}
    row["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    return row


def fresh_sets(limit: int | None) -> tuple[list[dict], list[str]]:
    """The suspects' fresh prompts: the validation split's skill records (never harvested,
    never trained on), with their answers for exact match."""
    from utils.data import read_split

    validation = [r for r in read_split("validation") if r["kind"] == "skill"][:limit]
    return validation, [r["messages"][0]["content"] for r in validation]


def score_suspect(model, tok, settings: dict) -> dict:
    """A suspect's answers to fresh prompts, de-duplicated tuples, one exact test per mode."""
    from utils.evaluate import score_records
    from utils.extraction import watermark_config
    from utils.watermark import chat_generations, radioactivity_of_generations

    test, fresh = fresh_sets(settings["limit"])
    detector = watermark_config(settings["delta"])
    vocab = model.config.vocab_size
    start = time.perf_counter()
    greedy = chat_generations(model, tok, fresh, temperature=0.0)
    sampled = [g for s in range(settings["samples"])
               for g in chat_generations(model, tok, fresh, temperature=1.0, seed=1000 + s)]
    texts = [tok.decode(g.ids, skip_special_tokens=True) for g in greedy[:len(test)]]
    em = statistics.mean(r["correct"] for r in score_records(test, texts))
    scores = {"greedy": radioactivity_of_generations(greedy, vocab, detector),
              "sampled": radioactivity_of_generations(sampled, vocab, detector),
              "greedy+sampled": radioactivity_of_generations(greedy + sampled, vocab, detector)}
    return {"exact_match_test": em, "scores": {k: score_row(v) for k, v in scores.items()},
            "answer_tokens": sum(len(g.ids) for g in greedy + sampled),
            "stored_greedy_ids": [list(g.ids) for g in greedy[:STORE_PROMPTS]],
            "score_seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    import json
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from utils.extraction import teacher_fingerprint
    from utils.io import atomic_write_json
    from utils.models import count_parameters, load_model
    from utils.results import cpu_name, provenance

    wall0, cpu0 = time.perf_counter(), time.process_time()
    teacher, tok = load_model("teacher", verbose=False)
    _, fresh = fresh_sets(args.limit)
    prompts = attacker_prompts(args.queries, args.limit)
    settings = {"queries": len(prompts) * args.repeats, "distinct_prompts": len(prompts),
                "repeats": args.repeats, "delta": args.delta, "temperature": args.temperature,
                "max_tokens": 128, "top_logprobs": None, "prompts": "skills, test split",
                "greenlist_ratio": 0.25, "seeding_scheme": "lefthash", "context_width": 1,
                "steps": args.steps, "size": "student-xs", "seed": 0, "limit": args.limit,
                "samples": args.samples}
    pool = ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"))
    table_future = pool.submit(table_worker, args.deltas, args.limit, args.threads)

    print(f"the attacker's harvest: {len(prompts)} prompts x {args.repeats}, with and without "
          "the watermark", flush=True)
    start = time.perf_counter()
    harvest = harvest_pair(teacher, tok, prompts, args)
    harvest_info = {"queries": len(prompts) * args.repeats,
                    "seconds": round(time.perf_counter() - start, 1),
                    "mode": "the API's generate call, batched",
                    **{f"{k}_completion_tokens": sum(r["completion_tokens"] for r in v)
                       for k, v in harvest.items()},
                    **{f"{k}_stopped_share": statistics.mean(r["finish_reason"] == "stop"
                                                             for r in v)
                       for k, v in harvest.items()},
                    "answers_changed_by_the_watermark": statistics.mean(
                        a["text"] != b["text"]
                        for a, b in zip(harvest["watermarked"], harvest["clean"], strict=True)),
                    "training_prompt_contrast": train_prompt_contrast(teacher, tok, args)}
    harvest_info["api_check"] = api_agreement(teacher, tok, prompts[:API_CHECK], harvest, args)
    harvest_info["api_check"]["note"] = ("identical answers are expected for greedy harvests; "
                                         "sampled ones share the distribution, not the draws")
    print(f"  {harvest_info['seconds']:.0f} s; the real API on the first {API_CHECK}: "
          f"{harvest_info['api_check']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dd-radio-") as tmp:
        harvest_file = Path(tmp) / "harvest.json"
        harvest_file.write_text(json.dumps(harvest))
        order = sorted(args.fractions, reverse=True)
        futures = [pool.submit(train_and_score, f, str(harvest_file), settings, args.threads)
                   for f in [order[0], 0.0, *order[1:]]]
        futures.append(pool.submit(score_shipped, settings, args.threads))
        students = []
        for f in futures:
            row = f.result()
            students.append(row)
            print(f"  {row['label']}: exact match {row['exact_match_test']:.3f}, p greedy "
                  f"{row['scores']['greedy']['p_value']:.1e}, p greedy+sampled "
                  f"{row['scores']['greedy+sampled']['p_value']:.1e}", flush=True)
    table, table_cpu = table_future.result()
    pool.shutdown()

    main_wm = next(s for s in students if s["fraction"] == max(args.fractions))
    control = next(s for s in students if s["label"] == "control")
    mode = "greedy+sampled"
    headline = {
        "delta": args.delta, "temperature": args.temperature, "queries": settings["queries"],
        "fraction": main_wm["fraction"], "mode": mode,
        "p_watermarked": main_wm["scores"][mode]["p_value"],
        "p_control": control["scores"][mode]["p_value"],
        "z_watermarked": main_wm["scores"][mode]["z"], "z_control": control["scores"][mode]["z"],
        "tokens_scored_watermarked": main_wm["scores"][mode]["scored_tuples"],
        "tokens_scored_control": control["scores"][mode]["scored_tuples"],
        "fresh_prompts": len(fresh),
        "per_fraction": {s["label"]: s["scores"][mode]["p_value"] for s in students},
        "target_met": (main_wm["scores"][mode]["p_value"] < 1e-5
                       and control["scores"][mode]["p_value"] > 0.01)}
    prov = provenance()
    cpu = time.process_time() - cpu0 + table_cpu + sum(s["cpu_seconds"] for s in students)
    prov.update({"command": "python scripts/experiments_04_radioactivity.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "cpu": cpu_name(), "threads": args.threads, "jobs": args.jobs,
                 "quick": args.quick, "wall_seconds": round(time.perf_counter() - wall0, 1),
                 "cpu_seconds": round(cpu, 1), "table_cpu_seconds": round(table_cpu, 1)})
    payload = {
        "provenance": prov,
        "settings": {**{k: v for k, v in settings.items() if k not in ("limit", "samples")},
                     "fractions": args.fractions, "deltas": args.deltas,
                     "samples_per_prompt": args.samples,
                     "fresh_prompts": "skill prompts of validation",
                     "table_prompts": "skill prompts of test", "z_detect": Z_DETECT},
        "teacher": {**teacher_fingerprint(), "parameters": count_parameters(teacher)},
        "delta_table": table, "harvest": harvest_info, "students": students,
        "radioactivity_realistic": headline,
        "stored": {"prompts": fresh[:STORE_PROMPTS]}}
    out = atomic_write_json(Path(args.out), payload)
    print(f"p watermarked {headline['p_watermarked']:.1e} (z {headline['z_watermarked']:.2f}), "
          f"p control {headline['p_control']:.2f}: target "
          f"{'met' if headline['target_met'] else 'MISSED'}; "
          f"{prov['cpu_seconds'] / 60:.1f} CPU min, {prov['wall_seconds'] / 60:.1f} min wall")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
