"""Measure this machine's memory bandwidth and the decode-speed limit it implies (lesson 06).

    .venv/bin/python scripts/bench_bandwidth.py [--size-mb 256] [--repeats 5] [--json out.json]

Prints GB/s with one thread and with every core, and the bandwidth bound on tokens/s for a
few model sizes at 32, 16, 8 and 4 bits (weights only; the KV cache adds to the bytes read).
``scripts/bench_scaling.py`` measures the same way (``utils.deploy.memory_bandwidth_gbps``)
before and after its grid, for the share of the bound each runtime reaches (lesson 06).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.deploy import (  # noqa: E402
    bandwidth_bound_tokens_per_s,
    memory_bandwidth_gbps,
    weight_bytes,
)
from utils.io import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=256, help="array size (>> L3 cache)")
    parser.add_argument("--repeats", type=int, default=5, help="copies; the best one counts")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    one = memory_bandwidth_gbps(args.size_mb, args.repeats, threads=1)
    every = memory_bandwidth_gbps(args.size_mb, args.repeats, threads=cores)
    print(f"memory bandwidth: {one:.1f} GB/s with 1 thread, {every:.1f} GB/s with {cores} "
          f"(1-minute load average {os.getloadavg()[0]:.2f})")
    bounds = {}
    print(f"{'params':>8} " + " ".join(f"{b:>3}-bit tok/s" for b in (32, 16, 8, 4)))
    for params in (1e6, 1e8, 1e9, 7e9):
        row = {b: bandwidth_bound_tokens_per_s(every, weight_bytes(params, b))
               for b in (32, 16, 8, 4)}
        bounds[f"{params:.0e}"] = row
        print(f"{params:>8.0e} " + " ".join(f"{v:>13.1f}" for v in row.values()))
    if args.json:
        atomic_write_json(args.json, {"bandwidth_gbps_1thread": one, "bandwidth_gbps_all": every,
                                      "cores": cores, "size_mb": args.size_mb,
                                      "machine": platform.platform(), "bounds": bounds,
                                      # a busy machine measures less: say how busy it was
                                      "loadavg": list(os.getloadavg())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
