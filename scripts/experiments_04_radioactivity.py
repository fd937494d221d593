"""Lesson 04's watermark and radioactivity on realistic traffic (issue 17).

    python scripts/experiments_04_radioactivity.py          # 4 single-thread processes, ~45 min
    python scripts/experiments_04_radioactivity.py --part shipped   # only 5. (about 25 min)
    python scripts/experiments_04_radioactivity.py --quick --out /tmp/r.json   # a smoke test

Everything is measured on the teacher's *natural* short answers (no ``min_tokens``):

1. **The delta table** (a worker process). The teacher answers every test skill prompt with a
   Kirchenbauer et al. (2023) watermark of strength delta (0 = none), greedy and sampled at
   temperature 1, with the ``generate`` call its API makes
   (:func:`utils.watermark.chat_generations`). For each delta: the teacher's exact match (the
   cost to every honest user), the share of answers the watermark changed, and the detection
   over all answers pooled (each (context, token) tuple once) and one answer at a time.
2. **The attacker's harvest, through the real API.** Skill prompts new to the teacher (the
   test split's, all 980 by default), each asked ``--repeats`` times (request seed = repeat),
   natural answers sampled at ``--temperature`` (1, the API's default) up to 128 tokens, text
   only, from the course's OpenAI-compatible server (:mod:`utils.serve`) with the watermark
   switched on server-side (``Defences(watermark=...)``, ``--delta``) and, for the control,
   off. ``--concurrency`` client threads (the official ``openai`` client) query at once and
   the server batches them (``ServerConfig(max_batch_size=...)``). The check: the first
   ``--api-check`` prompts asked again of an unbatched server, one at a time (the same
   answers, seeded sampling included, and its rate), and greedy API answers against the
   batched ``generate`` call the delta table uses (:func:`utils.watermark.chat_generations`).
3. **Suspects.** ``student-xs`` (1/10.6 of the teacher) trained by sequence-level KD
   (:func:`utils.train.train_lm`) on a harvest of which ``fraction`` came from the watermarked
   API (the first ``fraction * queries`` prompts of the shuffled list, the rest from the clean
   one); fraction 0 is the control: same prompts, budget, steps and seed. The shipped extracted
   student (clean traffic, every prompt) is a second control.
4. **Radioactivity** (Sander et al. 2024, closed model): every suspect answers **fresh**
   prompts it never saw (the validation split's skill prompts: never harvested, never trained
   on), greedy and ``--samples`` times sampled; each (context window, token) tuple counts once;
   one exact binomial test per suspect and mode.
5. **The shipped watermarked student** (``--part shipped``): lesson 04's shipped text
   student (``student-xs-extracted-text-skills``: every training skill prompt asked once,
   greedy, 3000 steps) rebuilt with one change, the watermark switched on in the API
   (:func:`utils.recipes.blackbox_recipe` with ``watermark=True``), harvested through the
   batched API, shipped as ``student-xs-extracted-text-skills-watermarked`` (model card,
   sha256 manifest, ``load_model`` by name), and tested on the fresh prompts against the
   shipped unwatermarked student as control (same recipe but for the watermark): p, z, scored
   tuples, and the exact match each keeps (what the watermark costs the attacker).

The JSON (``results/04_radioactivity.json``) holds the table, the harvest's cost, every
suspect's scores and exact match, the headline ``radioactivity_realistic``, the provenance with
wall-clock and CPU time (all processes), and for the first ``STORE_PROMPTS`` fresh prompts each
suspect's greedy answers as token ids (lesson 04 re-scores them and regenerates the shipped
students' live). ``--part main`` redoes 1-4 and keeps 5 from the file; ``--part shipped``
redoes 5 and keeps the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

SHIPPED_CONTROL = "student-xs-extracted-text-skills"
SHIPPED_WATERMARKED = "student-xs-extracted-text-skills-watermarked"
SHIP_SETTINGS = {"size": "student-xs", "top_k": 10, "max_tokens": 128, "batch_size": 32,
                 "lr": 3e-3, "granularity": "text", "mix": "skills", "seed": 0}  # the control's
API_CHECK = 64  # prompts also sent to an unbatched API, to check the batched harvest
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
    p.add_argument("--concurrency", type=int, default=32,
                   help="client threads querying the API at once = the server's batch size")
    p.add_argument("--api-check", type=int, default=API_CHECK,
                   help="prompts asked again of an unbatched API to check the batched answers")
    p.add_argument("--part", choices=("all", "main", "shipped"), default="all",
                   help="main: phases 1-4, keep the shipped student's key from --out; "
                        "shipped: phase 5 only, keep the rest of --out; all: both")
    p.add_argument("--ship-steps", type=int, default=3000,
                   help="training steps of the shipped watermarked student (as its control)")
    p.add_argument("--ship-dir", default=None,
                   help="ship the watermarked student here (default data/models/students/; "
                        "--quick: beside --out)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 24 queries, 4 steps, 24 prompts per set (numbers mean "
                        "nothing)")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.steps, args.deltas, args.samples = 24, 4, [0.0, 8.0], 1
        args.ship_steps, args.api_check = 4, min(args.api_check, 8)
        if args.ship_dir is None:
            args.ship_dir = str(Path(args.out).resolve().parent / "students")
    args.limit = 24 if args.quick else None
    if min(args.queries or 1, args.repeats, args.steps, args.threads, args.jobs,
           args.concurrency, args.api_check, args.ship_steps) <= 0 or args.samples < 0:
        p.error("--queries, --repeats, --steps, --threads, --jobs, --concurrency, --api-check "
                "and --ship-steps must be positive, --samples >= 0")
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


def api_harvest(teacher, tok, prompts: list[str], *, defences, temperature: float, seed: int,
                concurrency: int, top_logprobs: int | None = None,
                max_tokens: int = 128) -> tuple[list, dict]:
    """Every prompt asked once of the real OpenAI-compatible API (:mod:`utils.serve`), with the
    official ``openai`` client (:func:`utils.extraction.harvest`) from ``concurrency`` threads
    at once; the server batches up to ``concurrency`` requests (``concurrency=1``: one at a
    time, unbatched). Every request carries ``seed``. Returns the records in prompt order and
    the cost: seconds, requests per second and the server's batches."""
    from concurrent.futures import ThreadPoolExecutor

    from utils.extraction import harvest
    from utils.serve import ServerConfig, start_server

    config = ServerConfig(api_keys={"sk-attacker": None}, defences=defences,
                          max_tokens_limit=max(256, max_tokens), max_batch_size=concurrency)
    with start_server(teacher, tok, config) as server:
        def ask(shard: int) -> list:
            mine = prompts[shard::concurrency]
            return harvest(server.client("sk-attacker"), mine, budget=len(mine),
                           top_logprobs=top_logprobs, max_tokens=max_tokens,
                           temperature=temperature, seed=seed, model=server.model_name)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="attacker") as pool:
            parts = list(pool.map(ask, range(concurrency)))
        seconds = time.perf_counter() - start
        stats = server.batch_stats() or {"batches": len(prompts), "requests": len(prompts),
                                         "largest": 1}
    records: list = [None] * len(prompts)
    for shard, part in enumerate(parts):
        if len(part) != len(prompts[shard::concurrency]):
            raise RuntimeError(f"the API answered {len(part)} of "
                               f"{len(prompts[shard::concurrency])} prompts of shard {shard}")
        records[shard::concurrency] = part
    return records, {"queries": len(prompts), "seconds": round(seconds, 2),
                     "requests_per_second": len(prompts) / seconds if seconds else None,
                     "concurrency": concurrency, "batches": stats["batches"],
                     "mean_batch": stats["requests"] / max(stats["batches"], 1),
                     "largest_batch": stats["largest"]}


def _row(record) -> dict:
    return {"messages": record.messages, "text": record.text,
            "finish_reason": record.finish_reason, "completion_tokens": record.completion_tokens}


def harvest_pair(teacher, tok, prompts: list[str], args) -> tuple[dict[str, list[dict]], dict]:
    """The attacker's harvest: the real API with the watermark switched on server-side, and
    the same prompts and seeds with it off (the control), each prompt ``repeats`` times
    (request seed = repeat). Returns the rows and the API's cost per harvest."""
    from utils.extraction import watermark_config
    from utils.serve import Defences

    out: dict[str, list[dict]] = {}
    cost: dict[str, list[dict]] = {}
    for label, wm in (("watermarked", watermark_config(args.delta)), ("clean", None)):
        out[label], cost[label] = [], []
        for rep in range(args.repeats):  # each prompt asked ``repeats`` times (new samples)
            records, info = api_harvest(teacher, tok, prompts, defences=Defences(watermark=wm),
                                        temperature=args.temperature, seed=rep,
                                        concurrency=args.concurrency)
            out[label] += [_row(r) for r in records]
            cost[label].append(info)
    return out, cost


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
    """The first prompts asked again, one at a time, of an unbatched API (the server's
    default): the share of answers identical to the batched harvest (seeded sampling
    included) and the unbatched rate; and greedy watermarked API answers against the batched
    ``generate`` call the delta table uses (:func:`utils.watermark.chat_generations`)."""
    from utils.extraction import watermark_config
    from utils.serve import Defences
    from utils.watermark import chat_generations

    out: dict = {"prompts": len(prompts), "seed": 0, "temperature": args.temperature}
    for label, wm in (("watermarked", watermark_config(args.delta)), ("clean", None)):
        records, info = api_harvest(teacher, tok, prompts, defences=Defences(watermark=wm),
                                    temperature=args.temperature, seed=0, concurrency=1)
        out[f"{label}_seconds_per_query"] = info["seconds"] / len(prompts)
        out[f"{label}_identical_share"] = statistics.mean(  # harvest rows: repeat 0 first
            r.text == h["text"] for r, h in zip(records, harvest[label], strict=False))
    wm = watermark_config(args.delta)
    api, _ = api_harvest(teacher, tok, prompts, defences=Defences(watermark=wm),
                         temperature=0.0, seed=0, concurrency=args.concurrency)
    gens = chat_generations(teacher, tok, prompts, max_new_tokens=128, temperature=0.0,
                            watermark_config=wm)
    out["greedy_watermarked_api_vs_generate_identical_share"] = statistics.mean(
        r.text == tok.decode(g.ids, skip_special_tokens=True)
        for r, g in zip(api, gens, strict=True))
    out["note"] = ("identical shares: the batched API's answers against the same requests "
                   "sent one at a time to an unbatched API (seed 0); the greedy share compares "
                   "the API with utils.watermark.chat_generations")
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
    from utils.watermark import fresh_skill_records

    validation = fresh_skill_records(limit)
    return validation, [r["messages"][0]["content"] for r in validation]


def score_suspect(model, tok, settings: dict) -> dict:
    """A suspect's answers to fresh prompts, de-duplicated tuples, one exact test per mode
    (:func:`utils.watermark.radioactivity_on_fresh_prompts`, which refuses any prompt of the
    teacher's training split or of the attacker's harvests)."""
    from utils.evaluate import score_records
    from utils.extraction import watermark_config
    from utils.watermark import harvested_prompts, radioactivity_on_fresh_prompts

    test, fresh = fresh_sets(settings["limit"])
    seen = harvested_prompts()
    start = time.perf_counter()
    found = radioactivity_on_fresh_prompts(model, tok, fresh, watermark_config(settings["delta"]),
                                           training_prompts=seen, samples=settings["samples"],
                                           seed=1000, vocab_size=model.config.vocab_size)
    greedy, sampled = found.greedy, found.sampled
    texts = [tok.decode(g.ids, skip_special_tokens=True) for g in greedy[:len(test)]]
    em = statistics.mean(r["correct"] for r in score_records(test, texts))
    return {"exact_match_test": em, "scores": {k: score_row(v) for k, v in found.scores.items()},
            "answer_tokens": sum(len(g.ids) for g in greedy + sampled),
            "stored_greedy_ids": [list(g.ids) for g in greedy[:STORE_PROMPTS]],
            "score_seconds": round(time.perf_counter() - start, 1)}


def watermarked_recipe(delta: float, steps: int, limit: int | None, *, watermark: bool = True):
    """The shipped watermarked student's recipe: the shipped text student's (``SHIP_SETTINGS``,
    every training skill prompt, greedy) with the watermark on; ``watermark=False`` is the
    control's recipe (``student-xs-extracted-text-skills``, same key)."""
    from utils.recipes import blackbox_recipe

    s = SHIP_SETTINGS
    return blackbox_recipe(queries=limit, granularity=s["granularity"], seed=s["seed"],
                           watermark=watermark, watermark_bias=delta, size=s["size"],
                           steps=steps, batch_size=s["batch_size"], lr=s["lr"],
                           top_k=s["top_k"], max_tokens=s["max_tokens"], temperature=0.0,
                           mix=s["mix"])


def stored_subset_score(tok, prompts: list[str], ids: list[list[int]], vocab: int,
                        detector) -> dict:
    """The test on the stored greedy answers (the first ``STORE_PROMPTS`` fresh prompts)
    alone: what lesson 04 reruns live in seconds, regenerating them from the shipped model."""
    from utils.watermark import Generation, _prompt_ids, radioactivity_of_generations

    gens = [Generation(tuple(_prompt_ids(p, tok)), tuple(x), True)
            for p, x in zip(prompts, ids, strict=True)]
    return score_row(radioactivity_of_generations(gens, vocab, detector))


def shipped_part(teacher, tok, args, prov: dict) -> dict:
    """Phase 5: harvest through the batched API, build, ship and test the watermarked student
    against the shipped unwatermarked one."""
    from utils.extraction import (
        as_messages,
        cached_harvest,
        harvest_cache_path,
        mix_prompts,
        watermark_config,
    )
    from utils.models import count_parameters, load_model, student_card, teacher_card
    from utils.serve import Defences
    from utils.students import ship_recipe
    from utils.watermark import chat_generations

    s = SHIP_SETTINGS
    recipe = watermarked_recipe(args.delta, args.ship_steps, args.limit)
    control_recipe = watermarked_recipe(args.delta, args.ship_steps, args.limit, watermark=False)
    prompts = mix_prompts(s["mix"], "train", seed=0)[:args.limit]  # what the recipe asks
    defences = Defences(watermark=watermark_config(args.delta))
    query = dict(top_logprobs=s["top_k"], max_tokens=s["max_tokens"], temperature=0.0, seed=0)
    path, _ = harvest_cache_path(**query, defences=defences)
    known = json.loads(path.read_text())["records"] if path.is_file() else {}
    cached = sum(json.dumps(as_messages(p), sort_keys=True) in known for p in set(prompts))
    print(f"shipped watermarked student: harvest of {len(prompts)} prompts through the API "
          f"({args.concurrency} at once, {cached} cached)", flush=True)
    start = time.perf_counter()
    records = cached_harvest(prompts, budget=len(prompts), **query, defences=defences,
                             model=teacher, tokenizer=tok, progress=False,
                             concurrency=args.concurrency)
    seconds = time.perf_counter() - start
    harvest = {"queries": len(records), "distinct_prompts": len(set(prompts)),
               "prompts": "skills, train split (every one, once)", "temperature": 0.0,
               "top_logprobs": s["top_k"], "max_tokens": s["max_tokens"],
               "concurrency": args.concurrency, "cached_before": cached,
               "seconds": round(seconds, 1),
               "requests_per_second": (len(set(prompts)) - cached) / seconds
               if cached < len(set(prompts)) else None,
               "completion_tokens": sum(r.completion_tokens for r in records),
               "stopped_share": statistics.mean(r.finish_reason == "stop" for r in records)}
    # the check: the same requests, one at a time, to an unbatched server; and generate
    k = min(args.api_check, len(prompts))
    alone, info = api_harvest(teacher, tok, prompts[:k], defences=defences, temperature=0.0,
                              seed=0, concurrency=1, top_logprobs=s["top_k"],
                              max_tokens=s["max_tokens"])
    gens = chat_generations(teacher, tok, prompts[:k], max_new_tokens=s["max_tokens"],
                            temperature=0.0, watermark_config=defences.watermark)
    harvest["api_check"] = {
        "prompts": k, "unbatched_requests_per_second": k / info["seconds"],
        "batched_vs_unbatched_identical_share": statistics.mean(
            a.text == b.text for a, b in zip(records[:k], alone, strict=True)),
        "batched_vs_unbatched_logprobs_max_abs_diff": max(
            (abs(x - y) for a, b in zip(records[:k], alone, strict=True) if a.text == b.text
             for x, y in zip(a.logprobs, b.logprobs, strict=True)), default=0.0),
        "api_vs_generate_identical_share": statistics.mean(
            a.text == tok.decode(g.ids, skip_special_tokens=True)
            for a, g in zip(records[:k], gens, strict=True))}
    print(f"  {harvest['seconds']:.0f} s; check on {k}: {harvest['api_check']}", flush=True)

    print(f"  training and shipping {SHIPPED_WATERMARKED} ({args.ship_steps} steps)", flush=True)
    start = time.perf_counter()
    folder = ship_recipe(recipe, SHIPPED_WATERMARKED, provenance=prov, threads=args.threads,
                         root=Path(args.ship_dir) if args.ship_dir else None,
                         eval_limit=args.limit)
    ship_seconds = time.perf_counter() - start
    card = json.loads((folder / "model_card.json").read_text())
    control_card = student_card(SHIPPED_CONTROL)
    model, _ = load_model(recipe, progress=False, verbose=False)  # the shipped weights
    control, _ = load_model(SHIPPED_CONTROL, verbose=False)
    settings = {"delta": args.delta, "samples": args.samples, "limit": args.limit}
    rows = {}
    for label, m, c in (("watermarked", model, card), ("control", control, control_card)):
        cpu0 = time.process_time()
        scored = score_suspect(m, tok, settings)
        stored = fresh_sets(args.limit)[1][:STORE_PROMPTS]
        rows[label] = {"name": c["name"], "cache_key": c["cache_key"],
                       "parameters": count_parameters(m),
                       "exact_match_test": c["metrics"]["exact_match"]["overall"],
                       "exact_match_validation": scored.pop("exact_match_test"),
                       **scored, "stored_subset": stored_subset_score(
                           tok, stored, scored["stored_greedy_ids"], m.config.vocab_size,
                           watermark_config(args.delta)),
                       "cpu_seconds": round(time.process_time() - cpu0, 1)}
    teacher_em = teacher_card()["metrics"]["exact_match"]["overall"]
    mode = "greedy+sampled"
    wm, ctl = rows["watermarked"], rows["control"]
    training = set(prompts)
    fresh = fresh_sets(args.limit)[1]
    out = {
        "name": SHIPPED_WATERMARKED, "control": SHIPPED_CONTROL, "recipe": recipe.name,
        "cache_key": recipe.key(), "delta": args.delta, "steps": card["steps"],
        "parameters": card["parameters"], "times_smaller": card["times_smaller"],
        "control_is_the_same_recipe_without_the_watermark":
            control_recipe.key() == control_card["cache_key"],
        "harvest": harvest, "ship_seconds": round(ship_seconds, 1),
        "fresh_prompts": len(fresh), "fresh_prompts_in_training": len(set(fresh) & training),
        "mode": mode,
        "p_watermarked": wm["scores"][mode]["p_value"], "p_control": ctl["scores"][mode]["p_value"],
        "z_watermarked": wm["scores"][mode]["z"], "z_control": ctl["scores"][mode]["z"],
        "tuples_watermarked": wm["scores"][mode]["scored_tuples"],
        "tuples_control": ctl["scores"][mode]["scored_tuples"],
        "target_met": (wm["scores"][mode]["p_value"] < 1e-5
                       and ctl["scores"][mode]["p_value"] > 0.01),
        "teacher_exact_match_test": teacher_em,
        "exact_match_test": wm["exact_match_test"],
        "control_exact_match_test": ctl["exact_match_test"],
        "exact_match_cost": ctl["exact_match_test"] - wm["exact_match_test"],
        "exact_match_retained": wm["exact_match_test"] / teacher_em,
        "control_exact_match_retained": ctl["exact_match_test"] / teacher_em,
        "students": rows, "quick": args.quick}
    print(f"  {SHIPPED_WATERMARKED}: exact match {out['exact_match_test']:.3f} (control "
          f"{out['control_exact_match_test']:.3f}); p {out['p_watermarked']:.1e} (z "
          f"{out['z_watermarked']:.1f}, {out['tuples_watermarked']} tuples), control p "
          f"{out['p_control']:.2f}", flush=True)
    return out


def main_part(teacher, tok, args, pool) -> dict:
    """Phases 1-4: the delta table, the API harvest, the suspects, the headline."""
    import tempfile

    from utils.extraction import teacher_fingerprint
    from utils.models import count_parameters

    _, fresh = fresh_sets(args.limit)
    prompts = attacker_prompts(args.queries, args.limit)
    settings = {"queries": len(prompts) * args.repeats, "distinct_prompts": len(prompts),
                "repeats": args.repeats, "delta": args.delta, "temperature": args.temperature,
                "max_tokens": 128, "top_logprobs": None, "prompts": "skills, test split",
                "greenlist_ratio": 0.25, "seeding_scheme": "lefthash", "context_width": 1,
                "steps": args.steps, "size": "student-xs", "seed": 0, "limit": args.limit,
                "samples": args.samples, "concurrency": args.concurrency}
    table_future = pool.submit(table_worker, args.deltas, args.limit, args.threads)

    print(f"the attacker's harvest through the API: {len(prompts)} prompts x {args.repeats}, "
          f"with and without the watermark, {args.concurrency} at once", flush=True)
    start = time.perf_counter()
    harvest, cost = harvest_pair(teacher, tok, prompts, args)
    seconds = time.perf_counter() - start
    queries = sum(c["queries"] for v in cost.values() for c in v)
    harvest_info = {"queries": len(prompts) * args.repeats,
                    "seconds": round(seconds, 1),
                    "mode": "the real OpenAI-compatible API (utils.serve), watermark on the "
                            "server, concurrent clients, server-side batching",
                    "api_requests_per_second": queries / sum(
                        c["seconds"] for v in cost.values() for c in v),
                    "api_cost": cost,
                    **{f"{k}_completion_tokens": sum(r["completion_tokens"] for r in v)
                       for k, v in harvest.items()},
                    **{f"{k}_stopped_share": statistics.mean(r["finish_reason"] == "stop"
                                                             for r in v)
                       for k, v in harvest.items()},
                    "answers_changed_by_the_watermark": statistics.mean(
                        a["text"] != b["text"]
                        for a, b in zip(harvest["watermarked"], harvest["clean"], strict=True)),
                    "training_prompt_contrast": train_prompt_contrast(teacher, tok, args)}
    harvest_info["api_check"] = api_agreement(teacher, tok, prompts[:args.api_check], harvest,
                                              args)
    print(f"  {harvest_info['seconds']:.0f} s ({harvest_info['api_requests_per_second']:.1f} "
          f"requests/s); the check: {harvest_info['api_check']}", flush=True)
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
    return {
        "settings": {**{k: v for k, v in settings.items() if k not in ("limit", "samples")},
                     "fractions": args.fractions, "deltas": args.deltas,
                     "samples_per_prompt": args.samples,
                     "fresh_prompts": "skill prompts of validation",
                     "table_prompts": "skill prompts of test", "z_detect": Z_DETECT},
        "teacher": {**teacher_fingerprint(), "parameters": count_parameters(teacher)},
        "delta_table": table, "harvest": harvest_info, "students": students,
        "radioactivity_realistic": headline,
        "stored": {"prompts": fresh[:STORE_PROMPTS]},
        "_cpu": table_cpu + sum(s["cpu_seconds"] for s in students), "_table_cpu": table_cpu}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from utils.io import atomic_write_json, file_lock
    from utils.models import load_model
    from utils.results import cpu_name, provenance

    wall0, cpu0 = time.perf_counter(), time.process_time()
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if args.part != "all" and not previous:
        raise SystemExit(f"--part {args.part} keeps the other part from {out_path}, which does "
                         "not exist: run with --part all")
    command = "python scripts/experiments_04_radioactivity.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    prov = provenance()
    prov.update({"command": command, "cpu": cpu_name(), "threads": args.threads,
                 "jobs": args.jobs, "quick": args.quick})
    teacher, tok = load_model("teacher", verbose=False)
    payload = dict(previous)
    extra_cpu = 0.0
    if args.part in ("all", "main"):
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            main_payload = main_part(teacher, tok, args, pool)
        extra_cpu = main_payload.pop("_cpu")
        prov["table_cpu_seconds"] = round(main_payload.pop("_table_cpu"), 1)
        payload.update(main_payload)
    if args.part in ("all", "shipped"):
        ship_prov = {**prov, "command": command}
        payload["shipped_watermarked"] = {**shipped_part(teacher, tok, args, ship_prov),
                                          "provenance": {**ship_prov, "wall_seconds": None}}
    cpu = time.process_time() - cpu0 + extra_cpu
    wall = round(time.perf_counter() - wall0, 1)
    if args.part == "shipped":  # the rest of the file keeps its own provenance
        payload["shipped_watermarked"]["provenance"].update(
            wall_seconds=wall, cpu_seconds=round(cpu, 1))
    else:
        prov.update({"wall_seconds": wall, "cpu_seconds": round(cpu, 1)})
        payload["provenance"] = prov
        if "shipped_watermarked" in payload and args.part == "all":
            payload["shipped_watermarked"]["provenance"].update(wall_seconds=wall)
    import tempfile

    with file_lock(Path(tempfile.gettempdir()) / f"dd-{out_path.name}.lock"):
        # the other part may have been rewritten meanwhile (--part main and --part shipped run
        # at the same time): keep its keys from the file as it is now
        latest = json.loads(out_path.read_text()) if out_path.is_file() else {}
        if args.part == "main" and "shipped_watermarked" in latest:
            payload["shipped_watermarked"] = latest["shipped_watermarked"]
        elif args.part == "shipped":
            payload = {**latest, "shipped_watermarked": payload["shipped_watermarked"]}
        out = atomic_write_json(out_path, payload)
    if "radioactivity_realistic" in payload and args.part != "shipped":
        h = payload["radioactivity_realistic"]
        print(f"p watermarked {h['p_watermarked']:.1e} (z {h['z_watermarked']:.2f}), "
              f"p control {h['p_control']:.2f}: target "
              f"{'met' if h['target_met'] else 'MISSED'}")
    if "shipped_watermarked" in payload:
        w = payload["shipped_watermarked"]
        print(f"shipped watermarked student: p {w['p_watermarked']:.1e}, control p "
              f"{w['p_control']:.2f}: target {'met' if w['target_met'] else 'MISSED'}")
    print(f"{cpu / 60:.1f} CPU min, {wall / 60:.1f} min wall -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
