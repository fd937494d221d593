"""Is the price of averaging the noise defence away real? (lesson 04, issue 17)

    python scripts/experiments_04_noise_price.py            # ~16k API queries, a few minutes
    python scripts/experiments_04_noise_price.py --repeats 256 --out /tmp/n.json   # a smoke test

Lesson 04 fits ``error = c * n^slope`` on 64 repeated queries to an API that adds Gaussian
noise (0.1 nats) to every returned logprob, and prices the Carlini et al. (2024) recovery at
1e-3 nats: ``repeats_for_1e-3_nats`` repeats per query (``results/04_black_box_distillation.json``,
``defences``). This script pays that price once, at the scale of one query: it sends the same
request that many times to the real API (top-20 logprobs, one token, noise on; concurrent
clients, server-side batching), averages, and measures the error of

- each averaged logprob (tokens 2..20: the top token sits near 0, where the clip at 0 biases
  it), against the model's true log-softmax;
- the difference of two averaged logprobs (what the recovery uses: a logprob is read as the
  difference of two readings), the quantity the price was set for.

The JSON (``results/04_noise_price.json``) holds the curve, the error at the priced number of
repeats, the 1/sqrt(n) prediction, the API's rate and the provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_cpu_worker  # noqa: E402 - after the sys.path line above

TOP = 20  # logprobs per answer (the lesson's TRUNCATE_TOP)
NOISE = 0.1  # nats (the lesson's NOISE_SCALE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/experiments_04_noise_price.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "04_noise_price.json"))
    p.add_argument("--repeats", type=int, default=None,
                   help="identical queries (default: the lesson's repeats_for_1e-3_nats)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="client threads at once = the server's batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 2 or args.concurrency < 1:
        p.error("--repeats must be >= 2 and --concurrency >= 1")
    return args


def priced_repeats() -> tuple[int, dict]:
    """The lesson's price (repeats per query for 1e-3 nats) and the fit it came from."""
    d = json.loads((ROOT / "results" / "04_black_box_distillation.json").read_text())
    avg = next(v for k, v in d["defences"].items() if k.startswith("noise"))["averaged_away"]
    return int(avg["repeats_for_1e-3_nats"]), avg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_cpu_worker(args.threads)
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from utils.extraction import as_messages, harvest, prompt_ids, skill_prompts
    from utils.io import atomic_write_json
    from utils.models import load_model
    from utils.results import cpu_name, provenance
    from utils.serve import Defences, ServerConfig, start_server

    price, fit = priced_repeats()
    repeats = args.repeats or price
    wall0 = time.perf_counter()
    teacher, tok = load_model("teacher", verbose=False)
    prompt = skill_prompts("train", 176, seed=1)[0]  # the lesson's first SVD prompt
    x = torch.tensor([prompt_ids(as_messages(prompt), tok)])
    with torch.no_grad():
        truth_all = torch.log_softmax(teacher(input_ids=x).logits[0, -1].float(), -1).numpy()
    defences = Defences(max_top_logprobs=TOP, noise="gaussian", noise_scale=NOISE)
    config = ServerConfig(api_keys={"sk-avg": None}, defences=defences,
                          max_batch_size=args.concurrency)
    c = args.concurrency
    print(f"{repeats:,} identical queries (top-{TOP} logprobs, noise {NOISE} nats), {c} at once",
          flush=True)
    with start_server(teacher, tok, config) as api:
        def ask(shard: int) -> list:
            n = len(range(shard, repeats, c))
            return harvest(api.client("sk-avg"), [prompt] * n, budget=n, top_logprobs=TOP,
                           max_tokens=1, seed=0, model=api.model_name)

        start = time.perf_counter()
        with ThreadPoolExecutor(c, thread_name_prefix="averager") as pool:
            records = [r for part in pool.map(ask, range(c)) for r in part]
        seconds = time.perf_counter() - start
        stats = api.batch_stats()
    listed = list(records[0].top_logprobs[0])  # in the true order: top token first
    if any(list(r.top_logprobs[0]) != listed for r in records):
        raise RuntimeError("the listed tokens changed between queries: noise must not reorder")
    readings = np.array([[r.top_logprobs[0][t] for t in listed] for r in records])  # (R, k)
    truth = truth_all[[tok.convert_tokens_to_ids(t) for t in listed]]  # (k,)
    rest, t_rest = readings[:, 1:], truth[1:]  # tokens 2..k, far below the clip at 0
    pairs = [(i, j) for i in range(rest.shape[1]) for j in range(i + 1, rest.shape[1])]

    def errors(n: int) -> tuple[float, float]:
        mean = rest[:n].mean(axis=0)
        single = float(np.sqrt(np.mean((mean - t_rest) ** 2)))
        diff = float(np.sqrt(np.mean([((mean[i] - mean[j]) - (t_rest[i] - t_rest[j])) ** 2
                                      for i, j in pairs])))
        return single, diff

    ns = sorted({*(2**i for i in range(int(math.log2(repeats)) + 1)), repeats})
    curve = {n: errors(n) for n in ns}
    single, diff = curve[repeats]
    prov = provenance()
    prov.update({"command": "python scripts/experiments_04_noise_price.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 "cpu": cpu_name(), "threads": args.threads,
                 "wall_seconds": round(time.perf_counter() - wall0, 1)})
    payload = {
        "provenance": prov,
        "settings": {"noise": "gaussian", "noise_scale": NOISE, "top_logprobs": TOP,
                     "max_tokens": 1, "prompt": prompt, "concurrency": c},
        "priced": {"repeats_for_1e-3_nats": price, "fitted_c": fit["fitted_c"],
                   "fitted_slope": fit["fitted_slope"], "fitted_on_repeats": fit["repeats"],
                   "source": "results/04_black_box_distillation.json defences"},
        "repeats": repeats, "queries": len(records), "seconds": round(seconds, 1),
        "requests_per_second": len(records) / seconds,
        "batches": stats["batches"], "largest_batch": stats["largest"],
        "curve": [{"n": n, "rms_error_logprob": s, "rms_error_difference": d}
                  for n, (s, d) in curve.items()],
        "rms_error_logprob_at_repeats": single, "rms_error_difference_at_repeats": diff,
        "sqrt_law_logprob": NOISE / math.sqrt(repeats),
        "sqrt_law_difference": NOISE * math.sqrt(2) / math.sqrt(repeats),
        "repeats_for_1e-3_difference_by_sqrt_law": math.ceil(2 * (NOISE / 1e-3) ** 2),
        "sqrt_law_holds": abs(diff / (NOISE * math.sqrt(2 / repeats)) - 1) < 0.25}
    out = atomic_write_json(Path(args.out), payload)
    print(f"{len(records):,} queries in {seconds:.0f} s ({payload['requests_per_second']:.0f}/s); "
          f"error of one averaged logprob {single:.2e} nats (1/sqrt(n): "
          f"{payload['sqrt_law_logprob']:.2e}), of a difference {diff:.2e} (1/sqrt(n): "
          f"{payload['sqrt_law_difference']:.2e}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
