"""Exact tests and intervals for comparing accuracies, with their distributions computed here (the binomial
exactly, Student's t through the regularized incomplete beta function), so that they need nothing beyond
NumPy at run time. :mod:`fastrobust.compare` applies them to evaluations and runs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, check_positive_int

# ---------------------------------------------------------------------------------------- distributions
_TINY = 1e-300


def _log_beta(a: float, b: float) -> float:
    """log B(a, b). For a large argument, lgamma(a + b) - lgamma(a) cancels most of its digits (t with a
    million df loses 1e-9), so that difference comes from Stirling's series, whose terms stay small."""
    small, big = min(a, b), max(a, b)
    if big < 100:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tail = lambda z: 1 / (12 * z) - 1 / (360 * z ** 3) + 1 / (1260 * z ** 5)  # noqa: E731  (< 1e-17 off at z >= 100)
    return (math.lgamma(small) - (big - 0.5) * math.log1p(small / big) - small * math.log(big + small) + small
            + tail(big) - tail(big + small))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method; it converges quickly for
    x < (a + 1) / (a + b + 2), which :func:`betainc` ensures by symmetry."""
    clamp = lambda v: v if abs(v) > _TINY else _TINY  # noqa: E731  (keeps Lentz's ratios finite)
    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 100_000):
        delta = 1.0
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / clamp(1.0 + num * d)
            c = clamp(1.0 + num / c)
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b); ``y`` is 1 - x when the caller knows it more
    precisely than ``1 - x`` (near x = 1 the subtraction would lose the tail)."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)   # from the smaller of the two, which is exact
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    front = math.exp(a * log_x + b * log_y - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return tail if t >= 0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t: Newton steps on the upper tail, kept inside a bisection bracket."""
    if not (0.0 < q < 1.0) or not df > 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    p = min(q, 1.0 - q)   # solve on the smaller tail, where the probability keeps its relative precision
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > p:
        lo, hi = hi, 2.0 * hi
    t = 0.5 * (lo + hi)
    for _ in range(300):
        err = t_sf(t, df) - p
        lo, hi = (t, hi) if err > 0 else (lo, t)
        new = t + err / _t_pdf(t, df)
        new = new if lo < new < hi else 0.5 * (lo + hi)
        done = abs(new - t) <= 1e-15 * max(1.0, t)
        t = new
        if done or hi - lo <= 1e-15 * hi:
            break
    return t if q > 0.5 else -t


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials: min(1, 2 P(X <= min(k, n - k))); in integers up
    to n = 2000 (correctly rounded), beyond that summed in log space, which neither overflows nor underflows."""
    if not (0 <= k <= n) or int(k) != k or int(n) != n:
        raise ValueError(f"binom_two_sided_p needs integers 0 <= k <= n, got k={k}, n={n}")
    m = min(k, n - k)
    if 2 * m + 1 >= n:   # the two tails then cover every outcome: exactly 1, without the sum's rounding
        return 1.0
    if n <= 2000:
        return sum(math.comb(n, i) for i in range(m + 1)) / 2 ** (n - 1)
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(m + 1)])
    log_pmf -= n * math.log(2.0)
    top = log_pmf.max()
    return min(1.0, 2.0 * math.exp(top + math.log(np.exp(log_pmf - top).sum())))


# ---------------------------------------------------------------------------------------- tests
class McNemar(NamedTuple):
    a_only: int   # A right, B wrong (McNemar's b)
    b_only: int   # A wrong, B right (c)
    p: float


class TInterval(NamedTuple):
    mean: float
    low: float
    high: float
    df: float
    t: float
    p: float


def _flag_pair(a_flags, b_flags) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a_flags, dtype=bool), np.asarray(b_flags, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or not len(a):
        raise ConfigError(f"a paired test needs two equally long, non-empty 1-D flag arrays, got shapes {a.shape} "
                          f"and {b.shape}.")
    return a, b


def check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must lie strictly between 0 and 1 (e.g. 0.95), got {level}.")
    return float(level)


def mcnemar_exact(a_flags, b_flags) -> McNemar:
    """The exact McNemar test: the discordant points are fair coin flips under equal accuracy."""
    a, b = _flag_pair(a_flags, b_flags)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(only_a, only_b, binom_two_sided_p(only_a, only_a + only_b))


def paired_bootstrap_ci(a_flags, b_flags, reps: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of acc(A) - acc(B) (fractions) over resampled point indices. A resample is
    determined by how many points of each (A, B) outcome it draws, a multinomial draw; the concordant
    cells do not move the difference, so three cells suffice."""
    a, b = _flag_pair(a_flags, b_flags)
    reps, level, n = check_positive_int(reps, "the bootstrap replicate count"), check_level(level), len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    draws = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, 1.0 - (only_a + only_b) / n], reps)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    low, high = np.quantile(diffs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _t_result(mean: float, se: float, df: float, level: float) -> TInterval:
    if se == 0.0:   # every difference equal: the interval is that value, and any non-zero mean is certain
        return TInterval(mean, mean, mean, df, 0.0 if mean == 0 else math.copysign(math.inf, mean),
                         1.0 if mean == 0 else 0.0)
    half, t = t_quantile(0.5 + check_level(level) / 2.0, df) * se, mean / se
    return TInterval(mean, mean - half, mean + half, df, t, 2.0 * t_sf(abs(t), df))


def _sample(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ConfigError(f"{what} needs at least 2 values per group for an interval (n = {x.size}).")
    return x


def t_interval_paired(x, y, level: float = 0.95) -> TInterval:
    """Mean of x - y over pairs, its t-interval (n - 1 df) and the paired t-test's two-sided p."""
    x, y = _sample(x, "a paired t-interval"), _sample(y, "a paired t-interval")
    if len(x) != len(y):
        raise ConfigError(f"a paired t-interval needs equally many values, got {len(x)} and {len(y)}.")
    d = x - y
    return _t_result(float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1, level)


def t_interval_welch(x, y, level: float = 0.95) -> TInterval:
    """mean(x) - mean(y) with Welch's unequal-variance t-interval (Welch-Satterthwaite df) and p."""
    x, y = _sample(x, "Welch's t-interval"), _sample(y, "Welch's t-interval")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)) if se > 0 else len(x) + len(y) - 2
    return _t_result(float(x.mean() - y.mean()), se, float(df), level)
