"""utils/stats.py: the paired t-test, sign test, exact McNemar test and bootstrap intervals,
against values computed by hand here."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from utils.stats import (
    BootstrapInterval,
    McNemarTest,
    PairedTest,
    bootstrap_interval,
    cluster_bootstrap,
    mcnemar_exact,
    paired_test,
)

# Student (1908) / Cushny & Peebles: extra hours of sleep of 10 patients under two drugs,
# R's `sleep` data set. R: t.test(extra ~ group, data = sleep, paired = TRUE) prints
# "t = -4.0621, df = 9, p-value = 0.002833" for group 1 - group 2.
SLEEP_DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
# Lesson 01's first five seeds (test errors of 599): the comparison that issue 16 questioned.
ALONE_5 = [13, 20, 25, 18, 24]
DISTILLED_5 = [13, 20, 21, 15, 18]


def t_by_hand(diffs: list[float]) -> float:
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean / (sd / math.sqrt(n))


def two_sided_t_p_by_hand(t: float, df: int) -> float:
    """1 - A(|t| | df), Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df): finite sums."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta)
    if df % 2 == 1:
        # A = 2/pi [theta + sin(theta) (c + 2/3 c^3 + ... + 2.4..(df-3)/1.3..(df-2) c^(df-2))]
        total, coef = 0.0, 1.0
        for k in range(1, df - 1, 2):
            total += coef * c**k
            coef *= (k + 1) / (k + 2)
        a = 2 / math.pi * (theta + math.sin(theta) * total)
    else:  # A = sin(theta) [1 + 1/2 c^2 + 1.3/2.4 c^4 + ... + 1.3..(df-3)/2.4..(df-2) c^(df-2)]
        total, coef = 0.0, 1.0
        for k in range(0, df - 1, 2):
            total += coef * c**k
            coef *= (k + 1) / (k + 2)
        a = math.sin(theta) * total
    return 1 - a


def sign_p_by_hand(wins: int, losses: int) -> float:
    """Exact two-sided binomial p at 1/2: twice the smaller tail, at most 1."""
    m = wins + losses
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1)) / 2**m
    return min(1.0, 2 * tail)


def test_hand_formulas_themselves():
    # df = 1 is the Cauchy distribution: P(|T| > 1) = 1/2; df = 2: p = 1 - |t| / sqrt(2 + t^2)
    assert two_sided_t_p_by_hand(1.0, 1) == pytest.approx(0.5)
    assert two_sided_t_p_by_hand(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6))
    assert sign_p_by_hand(9, 1) == pytest.approx(22 / 1024)


def test_textbook_paired_t_student_sleep_data():
    r = paired_test(SLEEP_DRUG_1, SLEEP_DRUG_2)
    diffs = [a - b for a, b in zip(SLEEP_DRUG_1, SLEEP_DRUG_2, strict=True)]
    t = t_by_hand(diffs)
    assert r.n == 10
    assert r.mean_diff == pytest.approx(-1.58)
    assert r.std_diff == pytest.approx(math.sqrt(sum((d + 1.58) ** 2 for d in diffs) / 9))
    assert r.t == pytest.approx(t, rel=1e-12)
    assert r.t == pytest.approx(-4.0621, abs=5e-5)  # R's printout
    assert r.p_value == pytest.approx(two_sided_t_p_by_hand(t, 9), rel=1e-9)
    assert r.p_value == pytest.approx(0.002833, abs=5e-7)  # R's printout


def test_sign_test_on_the_sleep_data_drops_the_tie():
    # drug 2 gave more sleep to 9 patients, the same to 1: p = 2 / 2^9
    r = paired_test(SLEEP_DRUG_2, SLEEP_DRUG_1)
    assert (r.wins, r.losses, r.ties) == (9, 0, 1)
    assert r.sign_p_value == pytest.approx(2 / 2**9)


def test_lesson01_five_seeds_are_not_significant():
    r = paired_test(ALONE_5, DISTILLED_5)
    diffs = [a - b for a, b in zip(ALONE_5, DISTILLED_5, strict=True)]  # 0, 0, 4, 3, 6
    t = t_by_hand(diffs)
    assert r.mean_diff == pytest.approx(2.6)
    assert r.std_diff == pytest.approx(math.sqrt(6.8))
    assert r.t == pytest.approx(t) and r.t == pytest.approx(2.2294, abs=1e-4)
    assert r.p_value == pytest.approx(two_sided_t_p_by_hand(t, 4), rel=1e-9)
    assert 0.05 < r.p_value < 0.1 and not r.significant()
    assert (r.wins, r.losses, r.ties) == (3, 0, 2)
    assert r.sign_p_value == pytest.approx(2 / 2**3)  # 3 wins of 3: 0.25


def test_sign_test_known_binomial_p():
    a = np.arange(10.0)
    b = a + np.array([-1, -2, -3, -1, -5, -1, -2, 4, 1, 2])  # a > b 7 times, a < b 3 times
    r = paired_test(a, b)
    assert (r.wins, r.losses, r.ties) == (7, 3, 0)
    assert r.sign_p_value == pytest.approx(sign_p_by_hand(7, 3))
    assert r.sign_p_value == pytest.approx(352 / 1024)  # 2 * (1 + 10 + 45 + 120) / 2^10


def test_swapping_a_and_b_flips_the_sign_only():
    r, s = paired_test(ALONE_5, DISTILLED_5), paired_test(DISTILLED_5, ALONE_5)
    assert s.mean_diff == pytest.approx(-r.mean_diff) and s.t == pytest.approx(-r.t)
    assert s.std_diff == pytest.approx(r.std_diff)
    assert s.p_value == pytest.approx(r.p_value)
    assert s.sign_p_value == pytest.approx(r.sign_p_value)
    assert (s.wins, s.losses, s.ties) == (r.losses, r.wins, r.ties)


def test_significance_follows_the_p_value():
    r = paired_test(SLEEP_DRUG_2, SLEEP_DRUG_1)
    assert r.significant() and r.significant(0.01) and not r.significant(0.001)


def test_identical_scores_give_no_evidence():
    r = paired_test([3, 5, 7], [3, 5, 7])
    assert (r.t, r.p_value, r.sign_p_value) == (0.0, 1.0, 1.0)
    assert (r.mean_diff, r.std_diff, r.ties) == (0.0, 0.0, 3)


def test_a_constant_difference_is_the_limit_of_t():
    r = paired_test([2, 3, 4, 5], [1, 2, 3, 4])
    assert r.t == math.inf and r.p_value == 0.0 and r.std_diff == 0.0
    assert r.sign_p_value == pytest.approx(2 / 2**4)
    assert paired_test([1, 2, 3, 4], [2, 3, 4, 5]).t == -math.inf


def test_result_is_frozen_with_the_agreed_fields():
    r = paired_test(ALONE_5, DISTILLED_5)
    assert isinstance(r, PairedTest)
    assert [f.name for f in dataclasses.fields(r)] == [
        "n", "mean_diff", "std_diff", "t", "p_value", "sign_p_value", "wins", "losses", "ties"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p_value = 0.01  # type: ignore[misc]
    assert all(type(v) in (int, float) for v in dataclasses.asdict(r).values())  # JSON-ready


@pytest.mark.parametrize(("a", "b", "message"), [
    ([1, 2, 3], [1, 2], "one b for every a"),
    ([1.0], [2.0], "at least 2 pairs"),
    ([], [], "at least 2 pairs"),
    ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], r"a\[1\] is nan"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], r"b\[2\] is inf"),
    ([[1, 2], [3, 4]], [[1, 2], [3, 4]], "flat sequences"),
    (3.0, 4.0, "flat sequences"),
])
def test_bad_input_is_a_clear_value_error(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_test(a, b)


def test_importing_does_nothing():
    out = subprocess.run([sys.executable, "-c", "import utils.stats"], capture_output=True,
                         text=True, check=True)
    assert out.stdout == "" and out.stderr == ""


# --------------------------------------------------------------------------------------
# McNemar's exact test on paired verdicts
# --------------------------------------------------------------------------------------


def verdict_pairs(b00: int, b01: int, b10: int, b11: int) -> tuple[list[bool], list[bool]]:
    """Verdicts of models a and b on the same prompts, from the 2x2 table of counts."""
    a = [False] * b00 + [False] * b01 + [True] * b10 + [True] * b11
    b = [False] * b00 + [True] * b01 + [False] * b10 + [True] * b11
    return a, b


def mcnemar_p_by_hand(b01: int, b10: int) -> float:
    """Exact two-sided McNemar: twice the smaller binomial tail of the discordant pairs."""
    m = b01 + b10
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, k) for k in range(min(b01, b10) + 1)) / 2**m)


def test_mcnemar_against_a_table_computed_by_hand():
    a, b = verdict_pairs(b00=30, b01=1, b10=9, b11=60)
    r = mcnemar_exact(a, b)
    assert (r.n, r.b01, r.b10, r.discordant) == (100, 1, 9, 10)
    assert r.p_value == pytest.approx(22 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert r.p_value == pytest.approx(mcnemar_p_by_hand(1, 9))
    assert r.diff == pytest.approx((69 - 61) / 100)  # rate(a) - rate(b) = (b10 - b01) / n
    assert r.significant() and not r.significant(0.01)


@pytest.mark.parametrize(("b01", "b10"), [(0, 5), (3, 3), (2, 7), (12, 20), (0, 1), (40, 9)])
def test_mcnemar_matches_the_binomial_tails(b01, b10):
    a, b = verdict_pairs(b00=11, b01=b01, b10=b10, b11=4)
    r = mcnemar_exact(a, b)
    assert r.p_value == pytest.approx(mcnemar_p_by_hand(b01, b10), rel=1e-12)
    assert r.diff == pytest.approx((b10 - b01) / (15 + b01 + b10))


def test_mcnemar_when_the_models_always_agree():
    a, b = verdict_pairs(b00=7, b01=0, b10=0, b11=13)
    r = mcnemar_exact(a, b)
    assert (r.b01, r.b10, r.p_value, r.diff) == (0, 0, 1.0, 0.0)
    assert not r.significant()


def test_mcnemar_is_symmetric_and_order_free():
    a, b = verdict_pairs(b00=5, b01=2, b10=8, b11=5)
    r, s = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (s.b01, s.b10) == (r.b10, r.b01)
    assert s.p_value == pytest.approx(r.p_value) and s.diff == pytest.approx(-r.diff)
    perm = np.random.default_rng(0).permutation(len(a))  # the order of prompts is irrelevant
    t = mcnemar_exact([a[i] for i in perm], [b[i] for i in perm])
    assert (t.b01, t.b10, t.p_value) == (r.b01, r.b10, r.p_value)


def test_mcnemar_takes_numpy_bools_and_zero_one_integers():
    a, b = verdict_pairs(b00=3, b01=1, b10=4, b11=2)
    r = mcnemar_exact(a, b)
    assert mcnemar_exact(np.array(a), np.array(b)) == r
    assert mcnemar_exact([int(v) for v in a], np.array(b, dtype=int)) == r


def test_mcnemar_result_is_frozen_and_json_ready():
    r = mcnemar_exact(*verdict_pairs(1, 2, 3, 4))
    assert isinstance(r, McNemarTest)
    assert [f.name for f in dataclasses.fields(r)] == ["n", "b01", "b10", "p_value", "diff"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p_value = 0.5  # type: ignore[misc]
    assert all(type(v) in (int, float) for v in dataclasses.asdict(r).values())


@pytest.mark.parametrize(("a", "b", "message"), [
    ([True, False], [True], "one verdict of b for every verdict of a"),
    ([], [], "at least one prompt"),
    ([True, 2], [True, False], r"a\[1\] is 2"),
    ([True, False], [0.5, 1], r"b\[0\] is 0.5"),
    (["yes", "no"], [True, False], r"a\[0\] is 'yes'"),
    ([True, None], [True, False], r"a\[1\] is None"),
    ([[True], [False]], [[True], [False]], "flat sequence"),
    ("TF", "FT", "flat sequence"),
])
def test_mcnemar_bad_input_is_a_clear_value_error(a, b, message):
    with pytest.raises(ValueError, match=message):
        mcnemar_exact(a, b)


# --------------------------------------------------------------------------------------
# Bootstrap intervals: prompts only, and clusters then prompts
# --------------------------------------------------------------------------------------

# Five jailbreak templates of 20 prompts each: two always work, three never do.
WILD_CLUSTERS = [c for c in range(5) for _ in range(20)]
WILD_VALUES = [0] * 20 + [1] * 20 + [0] * 20 + [1] * 20 + [0] * 20
# Five templates with the same mix (8 successes in 20 each): the templates do not matter.
SAME_VALUES = ([1] * 8 + [0] * 12) * 5


def width(r: BootstrapInterval) -> float:
    return r.high - r.low


def test_cluster_bootstrap_is_wide_when_clusters_differ_wildly():
    clustered = cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, seed=0)
    prompts = bootstrap_interval(WILD_VALUES, seed=0)
    assert clustered.estimate == prompts.estimate == pytest.approx(0.4)
    assert clustered.low <= 0.4 <= clustered.high and prompts.low <= 0.4 <= prompts.high
    # 100 independent prompts: about +-0.1; 5 templates that succeed or fail as a whole: the
    # rate can be anything from 0/5 to 5/5 templates, about +-0.4
    assert width(prompts) < 0.25
    assert width(clustered) > 2.5 * width(prompts)
    assert (clustered.n, clustered.n_clusters, prompts.n_clusters) == (100, 5, 100)
    whole = cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, seed=0, resample_within=False)
    assert whole.low <= 0.4 <= whole.high and width(whole) > 2.5 * width(prompts)


def test_cluster_bootstrap_matches_prompts_when_clusters_are_identical():
    clustered = cluster_bootstrap(SAME_VALUES, WILD_CLUSTERS, seed=0)
    prompts = bootstrap_interval(SAME_VALUES, seed=0)
    assert clustered.estimate == prompts.estimate == pytest.approx(0.4)
    assert clustered.low <= 0.4 <= clustered.high
    assert width(clustered) == pytest.approx(width(prompts), rel=0.25)
    assert abs(clustered.low - prompts.low) < 0.05 and abs(clustered.high - prompts.high) < 0.05


def test_bootstrap_is_reproducible_given_the_seed():
    a = cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, seed=7, n_boot=500)
    assert cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, seed=7, n_boot=500) == a
    assert bootstrap_interval(WILD_VALUES, seed=7) == bootstrap_interval(WILD_VALUES, seed=7)
    values = np.random.default_rng(3).random(60)
    clusters = [f"template-{i % 6}" for i in range(60)]
    assert cluster_bootstrap(values, clusters, seed=1) != cluster_bootstrap(values, clusters,
                                                                            seed=2)


def test_cluster_names_do_not_matter_only_the_grouping():
    names = ["roleplay", "leet", "spaced", "research", "grandma"]
    by_name = cluster_bootstrap(WILD_VALUES, [names[c] for c in WILD_CLUSTERS], seed=4)
    assert by_name == cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, seed=4)


def test_cluster_bootstrap_by_hand_on_a_tiny_case():
    # two clusters [0, 0] and [1, 1], kept whole: a resample draws 2 clusters with
    # replacement, so its mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    tiny = ([0, 0, 1, 1], ["a", "a", "b", "b"])
    r = cluster_bootstrap(*tiny, n_boot=4000, seed=0, resample_within=False, confidence=0.4)
    assert (r.low, r.high) == (0.5, 0.5)
    r = cluster_bootstrap(*tiny, n_boot=4000, seed=0, resample_within=False, confidence=0.9)
    assert (r.low, r.high) == (0.0, 1.0)


def test_bootstrap_takes_another_statistic():
    values = [1.0, 2.0, 3.0, 4.0, 100.0, 5.0]
    r = bootstrap_interval(values, statistic=lambda x: float(np.median(x)), n_boot=300)
    assert r.estimate == pytest.approx(3.5) and r.high < 100


def test_bootstrap_result_is_frozen_and_json_ready():
    r = cluster_bootstrap(WILD_VALUES, WILD_CLUSTERS, n_boot=200)
    assert [f.name for f in dataclasses.fields(r)] == [
        "estimate", "low", "high", "n", "n_clusters", "n_boot", "confidence"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.low = 0.0  # type: ignore[misc]
    assert all(type(v) in (int, float) for v in dataclasses.asdict(r).values())
    assert "5 clusters" in str(r)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"values": [1, 0, 1], "clusters": [0, 1]}, "one cluster per value"),
    ({"values": [1, 0, 1], "clusters": ["x", "x", "x"]}, "at least 2 clusters"),
    ({"values": [1, 0], "clusters": [0, 1], "confidence": 95}, "confidence must be in"),
    ({"values": [1, 0], "clusters": [0, 1], "confidence": 1.0}, "confidence must be in"),
    ({"values": [1, 0], "clusters": [0, 1], "n_boot": 0}, "n_boot"),
    ({"values": [], "clusters": []}, "at least one value"),
    ({"values": [1, float("nan")], "clusters": [0, 1]}, r"values\[1\] is nan"),
    ({"values": [1, 0], "clusters": "ab"}, "one cluster name per value"),
])
def test_cluster_bootstrap_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster_bootstrap(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"values": []}, "at least one value"),
    ({"values": [[1, 0]]}, "flat sequence"),
    ({"values": [1, 0], "confidence": 0.0}, "confidence must be in"),
])
def test_bootstrap_interval_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(**kwargs)
