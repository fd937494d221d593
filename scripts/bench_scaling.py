"""Where quantization buys speed: decode tokens/s from in-cache to far beyond the cache (lesson 06).

    .venv/bin/python scripts/bench_scaling.py [--quick] [--out results/06_scaling.json]
                                              [--docs docs/BENCHMARKS.md]

The course's Llama architecture (``utils.models.ModelConfig``, the teacher's vocabulary of 768
tokens, head size 64, no grouped-query attention) scaled up with random weights (speed does not
depend on training) from about 2M parameters (8 MB in fp32: inside the L2/L3 caches) to over
200M (0.9 GB: many times the last-level cache). For every size: PyTorch eager fp32 and int8
(``utils.quantize.quantize_dynamic_int8``), ONNX Runtime fp32, int8 (``quantize_dynamic``,
per-channel, as lesson 06 does) and 4-bit (``MatMulNBits``, block 32); decode tokens/s with
the KV cache at batch 1, with one thread and with every core, each runtime in a fresh process
(``utils.deploy.benchmark_runtime``). Each measurement is the median of ``--rounds`` x
``--repeats`` timed runs; before each one the script waits (up to a total of
``--wait-budget-s``) until the 1-minute load average is below ``--max-load``, and it records
``os.getloadavg()`` after every run. The bandwidth bound is the copy bandwidth of
``scripts/bench_bandwidth.py`` (``utils.deploy.memory_bandwidth_gbps``, measured before and
after the grid, median) divided by the bytes a token reads (the model's weights as stored plus
the KV cache at the average context). Writes ``results/06_scaling.json`` with provenance and a
markdown table into ``docs/BENCHMARKS.md``. The full grid takes about 30 minutes here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.deploy import (  # noqa: E402
    SCALING_HEAD_DIM,
    SCALING_VOCAB,
    bandwidth_bound_tokens_per_s,
    benchmark_runtime,
    export_onnx,
    kv_cache_bytes,
    load_onnx_session,
    max_abs_logit_diff,
    memory_bandwidth_gbps,
    ort_logits,
    quantize_onnx_4bit,
    quantize_onnx_int8,
    scaled_model_config,
    scaling_speedups,
    speed_crossover,
    validate_scaling,
)
from utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from utils.paths import repo_root  # noqa: E402

SIZES = {  # name -> (hidden size, layers); parameters about 12 * hidden^2 * layers
    "2M": (128, 8),
    "7M": (256, 8),
    "26M": (512, 8),
    "85M": (768, 12),
    "227M": (1024, 18),
}
QUICK_SIZES = {"2M": (128, 8), "7M": (256, 8)}
VARIANTS = (  # (runtime, precision); benchmark_runtime's runtime kind is derived from it
    ("pytorch", "fp32"),
    ("pytorch", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("onnxruntime", "int4"),
)


def build_scaled(hidden_size: int, num_layers: int, seed: int = 0):
    """A random-weight model of the scaled shape, in eval mode."""
    from utils.models import build_model

    return build_model(scaled_model_config(hidden_size, num_layers), seed=seed).eval()


def prepare(name: str, hidden: int, layers: int, folder: Path, prompt: np.ndarray) -> dict:
    """Build, save, export and quantize one size; returns parameters, files and parity."""
    import torch

    from utils.models import count_parameters

    model = build_scaled(hidden, layers)
    params = count_parameters(model)
    hf_dir = folder / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    t0 = time.perf_counter()
    fp32 = export_onnx(model, folder / "fp32.onnx")
    export_s = time.perf_counter() - t0
    int8 = quantize_onnx_int8(fp32, folder / "int8.onnx", per_channel=True)
    int4 = quantize_onnx_4bit(fp32, folder / "int4.onnx", block_size=32)
    with torch.inference_mode():
        ref = model(input_ids=torch.as_tensor(prompt)).logits.numpy()
    parity = {}
    for precision, path in (("fp32", fp32), ("int8", int8), ("int4", int4)):
        got = ort_logits(load_onnx_session(path, threads=1), prompt)
        parity[precision] = {"max_abs_logit_diff": max_abs_logit_diff(got, ref),
                             "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
    layout = (layers, hidden // SCALING_HEAD_DIM, SCALING_HEAD_DIM)
    del model
    gc.collect()
    print(f"[{name}] {params:,} parameters, exported in {export_s:.0f} s; fp32 ONNX vs PyTorch "
          f"max |logit diff| {parity['fp32']['max_abs_logit_diff']:.1e}", flush=True)
    return {"params": params, "layout": layout, "export_s": export_s, "parity": parity,
            "paths": {("pytorch", "fp32"): hf_dir, ("pytorch", "int8"): hf_dir,
                      ("onnxruntime", "fp32"): fp32, ("onnxruntime", "int8"): int8,
                      ("onnxruntime", "int4"): int4}}


def cpu_busy_share(interval_s: float = 1.0) -> float | None:
    """Share of all CPU time that was busy over ``interval_s`` (``/proc/stat``), or None."""
    def sample():
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class QuietWaiter:
    """Wait until the 1-minute load average is below ``max_load`` (a total budget of waiting)."""

    def __init__(self, max_load: float, budget_s: float, poll_s: float = 15.0) -> None:
        self.max_load, self.budget_s, self.poll_s, self.waited_s = max_load, budget_s, poll_s, 0.0

    def wait(self) -> dict[str, Any]:
        start = time.perf_counter()
        while os.getloadavg()[0] > self.max_load and self.waited_s < self.budget_s:
            time.sleep(self.poll_s)
            self.waited_s += self.poll_s
        return {"loadavg_before": list(os.getloadavg()), "cpu_busy_before": cpu_busy_share(),
                "waited_s": time.perf_counter() - start}


def lscpu_caches() -> dict[str, str]:
    """Cache sizes as ``lscpu`` reports them (L1d, L1i, L2, L3), or what sysfs says."""
    caches: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(L\d\w?) cache:\s*(.+)$", line)
            if m:
                caches[m.group(1)] = m.group(2).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return caches


def bandwidths(repeats: int = 5) -> dict[str, float]:
    cores = os.cpu_count() or 1
    return {"1": memory_bandwidth_gbps(256, repeats, threads=1),
            "all": memory_bandwidth_gbps(256, repeats, threads=cores)}


def markdown_table(result: dict[str, Any]) -> str:
    """The scaling grid as a markdown section (docs/BENCHMARKS.md), every number from ``result``."""
    rows = validate_scaling(result)
    cores = result["cores"]
    bw = result["bandwidth_gbps"]
    prov = result["provenance"]
    lines = [
        "## Decode speed vs model size (lesson 06, `scripts/bench_scaling.py`)",
        "",
        f"Machine: {prov['machine']}, {prov.get('cpu', '')}; caches {result['caches']}. "
        f"Copy bandwidth {bw['1']:.1f} GB/s (1 thread), {bw['all']:.1f} GB/s ({cores} threads). "
        f"Random-weight Llama models, batch 1, {result['settings']['new_tokens']} greedy tokens "
        f"after a {result['settings']['prompt_tokens']}-token prompt, KV cache on; tokens/s is "
        f"the median of {result['settings']['rounds'] * result['settings']['repeats']} runs; "
        "*share* = tokens/s / (bandwidth / bytes read per token). "
        f"Measured {prov['date']} (commit {prov['git_commit']}).",
        "",
        "| size | params | runtime | precision | MB | tok/s 1 thread | share 1 thread "
        f"| tok/s {cores} threads | share {cores} threads | load (1 min) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["size"], r["runtime"], r["precision"], r["threads"]): r for r in rows}
    for r in rows:
        if r["threads"] != 1:
            continue
        allr = by_key.get((r["size"], r["runtime"], r["precision"], cores))
        loads = [v[0] for v in r["loadavg"] + (allr["loadavg"] if allr else []) if v]
        lines.append(
            f"| {r['size']} | {r['num_parameters'] / 1e6:.1f}M | {r['runtime']} | "
            f"{r['precision']} | {r['bytes'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['share_of_bound']:.0%} | "
            + (f"{allr['tokens_per_s']:.1f} | {allr['share_of_bound']:.0%} | " if allr
               else "- | - | ")
            + (f"{np.median(loads):.2f} |" if loads else "- |"))
    lines += ["", "Speed-up of the lower precision inside the same runtime (like with like):", ""]
    for runtime, other in (("onnxruntime", "int8"), ("onnxruntime", "int4"),
                           ("pytorch", "int8")):
        for threads in (1, cores):
            ratios = scaling_speedups(rows, runtime, threads=threads, other=other)
            cross = speed_crossover(rows, runtime, threads=threads, other=other)
            text = ", ".join(f"{n / 1e6:.0f}M: {x:.2f}x" for n, x in ratios)
            where = "never" if cross is None else f"from {cross / 1e6:.1f}M parameters"
            lines.append(f"- {runtime} {other} / fp32, {threads} thread(s): {text} "
                         f"(faster {where})")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> Path:
    """Replace (or add) the scaling section of ``path`` between its markers, atomically."""
    begin, end = "<!-- BEGIN bench_scaling -->", "<!-- END bench_scaling -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else (
        "# Benchmarks\n\nGenerated by scripts; do not edit between the markers.\n\n")
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    return atomic_write_bytes(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes (a smoke test)")
    parser.add_argument("--sizes", nargs="*", help=f"a subset of {list(SIZES)}")
    parser.add_argument("--out", type=Path, default=repo_root() / "results" / "06_scaling.json")
    parser.add_argument("--docs", default=str(repo_root() / "docs" / "BENCHMARKS.md"),
                        help="markdown file that gets the table ('' to skip)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=33, help="decode steps + 1")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per measurement")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs per process")
    parser.add_argument("--optimization", default="all", help="ONNX Runtime graph level")
    parser.add_argument("--max-load", type=float, default=0.8,
                        help="wait until the 1-minute load average is below this")
    parser.add_argument("--wait-budget-s", type=float, default=1200,
                        help="total seconds the script may wait for a quiet machine")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--merge", type=Path, default=None,
                        help="keep this earlier result's rows for the sizes not measured now")
    args = parser.parse_args(argv)

    import torch

    from utils.quiet import silence_library_noise

    silence_library_noise()
    torch.set_num_threads(1)  # exports and quantization; every benchmark sets its own threads
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        unknown = set(args.sizes) - set(SIZES)
        if unknown:
            parser.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
        sizes = {k: SIZES[k] for k in args.sizes}
    cores = os.cpu_count() or 1
    waiter = QuietWaiter(args.max_load, args.wait_budget_s)
    prompt = np.random.default_rng(0).integers(5, SCALING_VOCAB, size=(1, args.prompt_tokens))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dd_scaling_"))
    started = time.perf_counter()
    waiter.wait()
    bw_runs = [bandwidths()]
    print(f"copy bandwidth: {bw_runs[0]['1']:.1f} GB/s (1 thread), "
          f"{bw_runs[0]['all']:.1f} GB/s ({cores})", flush=True)
    raw: list[dict[str, Any]] = []
    sizes_info: dict[str, Any] = {}
    raw_path = args.out.with_suffix(".partial.json")  # every measurement so far
    try:
        for name, (hidden, layers) in sizes.items():
            folder = work / name
            folder.mkdir(parents=True, exist_ok=True)
            info = prepare(name, hidden, layers, folder, prompt)
            sizes_info[name] = info
            waiter.wait()
            bw_runs.append(bandwidths())  # the bandwidth of the moment, before each size
            for round_ in range(args.rounds):
                order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]  # balance drift
                for runtime, precision in order:
                    kind = {("pytorch", "int8"): "pytorch-int8"}.get((runtime, precision),
                                                                      runtime)
                    quiet = waiter.wait()
                    r = benchmark_runtime(f"{runtime} {precision}", kind,
                                          info["paths"][(runtime, precision)], prompt,
                                          max_new_tokens=args.new_tokens, repeats=args.repeats,
                                          optimization=args.optimization, timeout_s=1800)
                    raw.append({**r, **quiet, "size": name, "runtime": runtime,
                                "precision": precision, "round": round_})
                    atomic_write_json(raw_path, {"raw": raw, "sizes_info": _info_json(
                        sizes_info), "bandwidth_runs": bw_runs, "args": {
                        k: str(v) if isinstance(v, Path) else v
                        for k, v in vars(args).items()}})
                    print(f"[{name}] round {round_} {runtime:>11} {precision}: "
                          f"{np.median(r['tokens_per_s_runs_1thread']):8.1f} tok/s (1), "
                          f"{np.median(r['tokens_per_s_runs_all']):8.1f} ({cores}); "
                          f"load {quiet['loadavg_before'][0]:.2f}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # the 227M size is 3 GB of files
        waiter.wait()
        bw_runs.append(bandwidths())
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = summarise(raw, _info_json(sizes_info), bw_runs, args, waiter.waited_s,
                       time.perf_counter() - started, argv)
    if args.merge:
        result = merge_results(json.loads(args.merge.read_text()), result)
    atomic_write_json(args.out, result)
    raw_path.unlink(missing_ok=True)
    print(markdown_table(result))
    if args.docs:
        write_docs(Path(args.docs), markdown_table(result))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s "
          f"(waited {waiter.waited_s:.0f} s for a quiet machine)")
    return 0


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows and sizes of ``old`` that ``new`` did not measure again.

    Each row keeps its own bandwidth and bound; ``provenance["merged"]`` names what came
    from the earlier run.
    """
    kept = [r for r in old["rows"] if r["size"] not in new["sizes"]]
    sizes = {**{n: v for n, v in old["sizes"].items() if n not in new["sizes"]}, **new["sizes"]}
    order = {n: i for i, n in enumerate(SIZES)}
    merged = {**new, "sizes": dict(sorted(sizes.items(), key=lambda kv: order.get(kv[0], 99))),
              "rows": sorted(kept + new["rows"], key=lambda r: order.get(r["size"], 99)),
              "provenance": {**new["provenance"], "merged": {
                  "sizes_from_earlier_run": sorted({r["size"] for r in kept}),
                  "earlier_run": old["provenance"],
                  "earlier_bandwidth_gbps": old["bandwidth_gbps"]}}}
    validate_scaling(merged)
    return merged


def _info_json(sizes_info: dict) -> dict:
    return {n: {"params": int(i["params"]), "layout": list(i["layout"]),
                "export_s": float(i["export_s"]), "parity": i["parity"]}
            for n, i in sizes_info.items()}


def summarise(raw: list[dict], sizes_info: dict, bw_runs: list[dict], args: Any,
              waited_s: float, seconds: float, argv: list[str] | None) -> dict[str, Any]:
    """Median tokens/s per (size, runtime, precision, threads) and its share of the bound."""
    from utils.results import cpu_name, provenance

    cores = os.cpu_count() or 1
    bw = {k: float(np.median([b[k] for b in bw_runs])) for k in ("1", "all")}
    rows = []
    for name, info in sizes_info.items():
        hidden, layers = SIZES[name]
        _, kv_heads, head_dim = info["layout"]
        context = args.prompt_tokens + args.new_tokens // 2  # average cache length
        kv = kv_cache_bytes(layers, kv_heads, head_dim, context)
        for runtime, precision in VARIANTS:
            mine = [r for r in raw if r["size"] == name and r["runtime"] == runtime
                    and r["precision"] == precision]
            nbytes = int(mine[0]["bytes"])
            for threads, suffix, bw_key in ((1, "1thread", "1"), (cores, "all", "all")):
                runs = [v for r in mine for v in r[f"tokens_per_s_runs_{suffix}"]]
                speed = float(np.median(runs))
                bound = bandwidth_bound_tokens_per_s(bw[bw_key], nbytes + kv)
                rows.append({
                    "size": name, "num_parameters": int(info["params"]),
                    "hidden_size": hidden, "num_layers": layers,
                    "runtime": runtime, "precision": precision, "threads": threads,
                    "bytes": nbytes, "kv_cache_bytes": int(kv), "tokens_per_s": speed,
                    "tokens_per_s_runs": runs, "bandwidth_gbps": bw[bw_key],
                    "bandwidth_bound_tokens_per_s": bound, "share_of_bound": speed / bound,
                    "loadavg": [v for r in mine for v in r[f"loadavg_{suffix}"]],
                    "loadavg_before": [r["loadavg_before"] for r in mine],
                    "cpu_busy_before": [r["cpu_busy_before"] for r in mine],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                    "parity_vs_pytorch_fp32": (info["parity"][precision]
                                               if runtime == "onnxruntime" else None),
                })
    result = {
        "provenance": {**provenance(), "cpu": cpu_name(),
                       "command": "scripts/bench_scaling.py " + " ".join(argv or sys.argv[1:]),
                       "seconds": seconds},
        "caches": lscpu_caches(), "cores": cores,
        "bandwidth_gbps": bw, "bandwidth_runs_gbps": bw_runs,
        "bandwidth_method": "utils.deploy.memory_bandwidth_gbps: best of 5 copies of 256 MB "
                            "(2 x bytes / time), before and after the grid, median",
        "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "repeats": args.repeats,
                     "ort_graph_optimization": args.optimization, "max_load": args.max_load,
                     "waited_s": waited_s, "int8": "quantize_dynamic, per-channel",
                     "int4": "MatMulNBits, symmetric, block 32, accuracy_level 4"},
        "sizes": {n: {"hidden_size": SIZES[n][0], "num_layers": SIZES[n][1],
                      "num_parameters": int(i["params"]), "export_s": i["export_s"]}
                  for n, i in sizes_info.items()},
        "rows": rows,
    }
    validate_scaling(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
