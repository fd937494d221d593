"""Paired comparisons and intervals a reviewer accepts: is a difference more than noise?

When two methods are run on the same seeds (same split, same initialisation, same batches),
each seed gives a *pair* of scores, and the per-seed difference cancels what the seed does to
both. ``paired_test`` reports Student's paired t-test on those differences and, as a check
that assumes nothing about their distribution, the exact sign test. Introduced in lesson 01
(distilled student vs the same student trained alone); used again in lesson 03.

Lesson 07 judges two models on the *same prompts*: ``mcnemar_exact`` tests whether their
per-prompt verdicts differ (only the prompts where they disagree carry evidence), and
``cluster_bootstrap`` gives an interval for a rate whose prompts come in clusters (every
jailbreak template wraps many requests), beside the prompts-only ``bootstrap_interval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["BootstrapInterval", "McNemarTest", "PairedTest", "bootstrap_interval",
           "cluster_bootstrap", "mcnemar_exact", "paired_test"]


@dataclass(frozen=True)
class PairedTest:
    """The paired comparison of ``a`` with ``b``; every difference is ``a - b``."""

    n: int  # number of pairs
    mean_diff: float  # mean of a - b
    std_diff: float  # sample standard deviation of a - b (ddof = 1)
    t: float  # paired t statistic, mean_diff / (std_diff / sqrt(n)); df = n - 1
    p_value: float  # two-sided p-value of the paired t-test
    sign_p_value: float  # exact two-sided sign-test p-value over the non-zero differences
    wins: int  # pairs with a > b
    losses: int  # pairs with a < b
    ties: int  # pairs with a == b (left out of the sign test)

    def significant(self, level: float = 0.05) -> bool:
        """Whether the paired t-test rejects "no difference" at ``level`` (two-sided)."""
        return self.p_value < level


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> PairedTest:
    """Paired t-test (Student 1908; ``scipy.stats.ttest_rel``) and exact sign test of a vs b.

    ``a[i]`` and ``b[i]`` must come from the same seed (or item). The sign test counts the
    pairs where ``a > b`` against those where ``a < b`` with an exact binomial test at 1/2
    (``scipy.stats.binomtest``); ties are dropped from it and counted in ``ties``.
    Degenerate cases: when every difference is zero there is no evidence of a difference
    (``t`` is 0, both p-values 1); when every difference is the same non-zero number, ``t``
    is infinite and the t-test's p-value is 0, its limit. Raises ``ValueError`` for lengths
    that differ, fewer than two pairs, inputs that are not flat sequences, or values that
    are not finite.
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"paired_test needs two flat sequences, got shapes {x.shape} and "
                         f"{y.shape}")
    if len(x) != len(y):
        raise ValueError(f"paired_test needs one b for every a: got {len(x)} values in a and "
                         f"{len(y)} in b")
    if len(x) < 2:
        raise ValueError(f"paired_test needs at least 2 pairs to estimate a spread, got "
                         f"{len(x)}")
    for name, values in (("a", x), ("b", y)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"paired_test: {name}[{int(bad[0])}] is {values[bad[0]]}; every "
                             "value must be finite (a failed run is not a score)")
    diff = x - y
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    ties = len(diff) - wins - losses
    std_diff = float(diff.std(ddof=1))
    if wins + losses == 0:  # identical scores: nothing to test
        t, p_value, sign_p_value = 0.0, 1.0, 1.0
    else:
        if std_diff == 0.0:  # the same non-zero difference every time: the limit of t
            t, p_value = math.copysign(math.inf, float(diff[0])), 0.0
        else:
            result = _scipy_stats.ttest_rel(x, y)
            t, p_value = float(result.statistic), float(result.pvalue)
        sign_p_value = float(_scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue)
    return PairedTest(
        n=len(diff),
        mean_diff=float(diff.mean()),
        std_diff=std_diff,
        t=t,
        p_value=p_value,
        sign_p_value=sign_p_value,
        wins=wins,
        losses=losses,
        ties=ties,
    )



# --------------------------------------------------------------------------------------
# Paired verdicts on the same prompts: McNemar's test
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McNemarTest:
    """Two models' verdicts on the same ``n`` prompts; ``diff`` is rate(a) - rate(b)."""

    n: int  # number of prompts (pairs)
    b01: int  # prompts where a is False and b is True
    b10: int  # prompts where a is True and b is False
    p_value: float  # exact two-sided p-value: binomial test of b10 in b01 + b10 at 1/2
    diff: float  # rate of True in a minus rate of True in b, (b10 - b01) / n

    @property
    def discordant(self) -> int:
        """Prompts where the two verdicts differ (the only ones that carry evidence)."""
        return self.b01 + self.b10

    def significant(self, level: float = 0.05) -> bool:
        """Whether the test rejects "same rate" at ``level`` (two-sided)."""
        return self.p_value < level


def _as_verdicts(name: str, values: Any) -> np.ndarray:
    """A flat bool array from bools, numpy bools or the integers 0/1; else a ValueError."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"mcnemar_exact: {name} must be a flat sequence of verdicts "
                         f"(True/False or 1/0), got {type(values).__name__}")
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"mcnemar_exact: {name} must be a flat sequence of verdicts, got "
                         f"shape {arr.shape}")
    out = np.empty(len(arr), dtype=bool)
    for i, v in enumerate(arr):
        if isinstance(v, (bool, np.bool_)):
            out[i] = bool(v)
        elif isinstance(v, (int, np.integer)) and int(v) in (0, 1):
            out[i] = bool(int(v))
        else:
            raise ValueError(f"mcnemar_exact: {name}[{i}] is {v!r}; every verdict must be "
                             "True/False (or 1/0), e.g. whether the model refused that prompt")
    return out


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemarTest:
    """Exact McNemar test (McNemar 1947) of paired per-prompt verdicts ``a[i]``, ``b[i]``.

    ``a[i]`` and ``b[i]`` are two models' verdicts on the same prompt (refused, say). Prompts
    where they agree say nothing about which rate is higher; under "same rate" each of the
    ``b01 + b10`` discordant prompts is equally likely to go either way, so the exact test is a
    two-sided binomial test of ``b10`` out of ``b01 + b10`` at 1/2 (``scipy.stats.binomtest``;
    the exact conditional test, conservative, Fagerland, Lydersen & Laake 2013). With no
    discordant prompt the p-value is 1. Lesson 07. Raises ``ValueError`` for unequal lengths,
    no prompts, or values that are not True/False (or 1/0).
    """
    x, y = _as_verdicts("a", a), _as_verdicts("b", b)
    if len(x) != len(y):
        raise ValueError(f"mcnemar_exact needs one verdict of b for every verdict of a (the "
                         f"same prompts): got {len(x)} in a and {len(y)} in b")
    if len(x) == 0:
        raise ValueError("mcnemar_exact needs at least one prompt, got none")
    b01 = int((~x & y).sum())
    b10 = int((x & ~y).sum())
    m = b01 + b10
    p_value = 1.0 if m == 0 else float(_scipy_stats.binomtest(b10, m, 0.5).pvalue)
    return McNemarTest(n=len(x), b01=b01, b10=b10, p_value=min(1.0, p_value),
                       diff=(b10 - b01) / len(x))


# --------------------------------------------------------------------------------------
# Bootstrap intervals: prompts only, and clusters (jailbreak templates) then prompts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile bootstrap interval for ``statistic`` of the values (a rate, say)."""

    estimate: float  # the statistic on the data as observed
    low: float  # (1 - confidence) / 2 quantile of the bootstrap statistics
    high: float  # 1 - (1 - confidence) / 2 quantile
    n: int  # number of values (prompts)
    n_clusters: int  # number of clusters (templates); equals n for the prompts-only bootstrap
    n_boot: int  # number of bootstrap resamples
    confidence: float

    def __str__(self) -> str:
        return (f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.n} values, "
                f"{self.n_clusters} clusters, {round(100 * self.confidence)}% percentile "
                f"bootstrap of {self.n_boot})")


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def _check_bootstrap_args(values: Any, n_boot: int, confidence: float, who: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{who} needs a flat sequence of values, got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{who} needs at least one value, got none")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{who}: values[{int(bad[0])}] is {x[bad[0]]}; every value must be "
                         "finite")
    if isinstance(n_boot, bool) or not float(n_boot).is_integer() or n_boot < 1:
        raise ValueError(f"{who}: n_boot must be a positive whole number, got {n_boot!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"{who}: confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    return x


def _interval(estimate: float, stats: np.ndarray, n: int, n_clusters: int, n_boot: int,
              confidence: float) -> BootstrapInterval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return BootstrapInterval(estimate=float(estimate), low=float(low), high=float(high), n=n,
                             n_clusters=n_clusters, n_boot=int(n_boot),
                             confidence=float(confidence))


def bootstrap_interval(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000,
                       confidence: float = 0.95, seed: int = 0,
                       statistic: Callable[[np.ndarray], float] = _mean) -> BootstrapInterval:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) over single values.

    Resamples the ``n`` values (per-prompt 0/1 verdicts, say) with replacement ``n_boot``
    times (``numpy.random.default_rng(seed)``: deterministic given ``seed``) and returns the
    quantiles of ``statistic`` (the mean by default). It treats prompts as independent; when
    they come in clusters use :func:`cluster_bootstrap`. Lesson 07.
    """
    x = _check_bootstrap_args(values, n_boot, confidence, "bootstrap_interval")
    rng = np.random.default_rng(seed)
    n = len(x)
    stats = np.empty(int(n_boot))
    for i in range(int(n_boot)):
        stats[i] = statistic(x[rng.integers(0, n, size=n)])
    return _interval(statistic(x), stats, n, n, int(n_boot), float(confidence))


def cluster_bootstrap(values: Sequence[float] | np.ndarray, clusters: Sequence[Hashable], *,
                      n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                      statistic: Callable[[np.ndarray], float] = _mean,
                      resample_within: bool = True) -> BootstrapInterval:
    """Two-stage percentile bootstrap for clustered values (Davison & Hinkley 1997, sec. 3.8).

    ``clusters[i]`` names the cluster of ``values[i]`` (the jailbreak template that wrapped
    the prompt). Each resample draws as many clusters as there are, with replacement, then
    within each drawn cluster as many values as it holds, with replacement, and computes
    ``statistic`` (the mean by default) on the pooled draw. Prompts of one template succeed
    or fail together, so the interval is wider than :func:`bootstrap_interval`'s when clusters
    differ and about the same when every cluster holds the same mix (Field & Welsh 2007).
    Resampling at both stages counts the within-cluster noise twice, so when clusters differ
    only by chance the interval is conservative (a little wide); ``resample_within=False``
    keeps each drawn cluster whole (Davison & Hinkley's other strategy), which is better when
    there are many clusters. Deterministic given ``seed`` (``numpy.random.default_rng``).
    Lesson 07. Raises ``ValueError`` for lengths that differ, fewer than 2 clusters, or a
    confidence outside (0, 1).
    """
    x = _check_bootstrap_args(values, n_boot, confidence, "cluster_bootstrap")
    if isinstance(clusters, (str, bytes)) or not hasattr(clusters, "__len__"):
        raise ValueError("cluster_bootstrap: clusters must be a sequence with one cluster name "
                         "per value")
    labels = list(clusters)
    if len(labels) != len(x):
        raise ValueError(f"cluster_bootstrap needs one cluster per value: got {len(x)} values "
                         f"and {len(labels)} cluster names")
    groups: dict[Hashable, list[int]] = {}
    for i, c in enumerate(labels):
        groups.setdefault(c, []).append(i)
    n_clusters = len(groups)
    if n_clusters < 2:
        raise ValueError(f"cluster_bootstrap needs at least 2 clusters to resample, got "
                         f"{n_clusters}: with one cluster use bootstrap_interval")
    order = np.concatenate([np.asarray(ix, dtype=int) for ix in groups.values()])
    pooled = x[order]  # values grouped cluster by cluster, in order of first appearance
    sizes = np.array([len(ix) for ix in groups.values()])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    stats = np.empty(int(n_boot))
    for i in range(int(n_boot)):
        picked = rng.integers(0, n_clusters, size=n_clusters)  # stage 1: clusters
        size = sizes[picked]
        if resample_within:  # stage 2: values within each drawn cluster, with replacement
            within = np.floor(rng.random(int(size.sum())) * np.repeat(size, size)).astype(int)
        else:  # each drawn cluster whole
            within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
        stats[i] = statistic(pooled[np.repeat(starts[picked], size) + within])
    return _interval(statistic(x), stats, len(x), n_clusters, int(n_boot), float(confidence))
