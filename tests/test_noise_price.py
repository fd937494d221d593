"""The price of averaging the noise defence away, paid once (scripts/experiments_04_noise_price.py).

Lesson 04 prices the recovery of logprobs through a noisy API by fitting ``c * n^slope`` on 64
repeated queries. The script sends the priced number of repeats to the real API and measures the
error; this file checks the committed run against the 1/sqrt(n) law it relies on, and the
script's own arithmetic on a small run with a fake API.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRICE = ROOT / "results" / "04_noise_price.json"


def test_committed_noise_price_follows_the_square_root_law():
    from _committed import load_committed

    d = load_committed(PRICE, "run `python scripts/experiments_04_noise_price.py` (minutes)")
    assert {"date", "git_commit", "cpu", "command", "wall_seconds"} <= set(d["provenance"])
    n = d["repeats"]
    assert d["queries"] == n and n >= 1000
    curve = {row["n"]: row for row in d["curve"]}
    assert max(curve) == n and min(curve) == 1
    # averaging works: the error at n is a small fraction of one reading's
    assert curve[n]["rms_error_logprob"] < curve[1]["rms_error_logprob"] / 10
    sigma = d["settings"]["noise_scale"]
    assert d["sqrt_law_difference"] == pytest.approx(sigma * math.sqrt(2 / n))
    for row in d["curve"]:
        if row["n"] >= 64:  # within 50% of sigma sqrt(2/n) (19 tokens: the RMS itself wobbles)
            ratio = row["rms_error_difference"] / (sigma * math.sqrt(2 / row["n"]))
            assert 0.5 < ratio < 1.5, row
    assert d["repeats_for_1e-3_difference_by_sqrt_law"] == math.ceil(2 * (sigma / 1e-3) ** 2)
    assert d["sqrt_law_holds"] == (abs(d["rms_error_difference_at_repeats"]
                                       / d["sqrt_law_difference"] - 1) < 0.25)
    assert d["requests_per_second"] == pytest.approx(d["queries"] / d["seconds"], rel=0.01)
