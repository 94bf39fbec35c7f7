# SPDX-License-Identifier: Apache-2.0
"""Maximum-likelihood estimate of how many training images a generator can produce (IRS_inf, SPEC.md section 2)."""

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, lambertw, ndtri

# Rows of log S(n, j) come from the exact recurrence up to this n and from Temme's formula above it. At n = 256
# Temme's error in log S(n, j) is at most 2.4e-4 (0.061 / n to 0.069 / n for n = 4..400; see `_log_stirling2`).
_EXACT_MAX_N = 256
# Candidates per step of the search for the maximum-likelihood s: the bracket shrinks ~64-fold per step.
_MLE_GRID = 64
# Tail sums keep `_WINDOW_SDS` standard deviations of K beyond the mode (a neglected mass below e^-32 for a normal
# shape), plus `_WINDOW_MIN` terms. The occupancy variance s e^-a (1 - (1 + a) e^-a), a = n / s, is unimodal in s
# with its peak (0.112 n) at a = `_PEAK_RATIO`, so its maximum over a range of s is found from three points.
_WINDOW_SDS = 8.0
_WINDOW_MIN = 32
_PEAK_RATIO = 0.6
# Relative offsets (in units of the normal-approximation distance) of the first candidates of a bound search.
_FIRST_STEP = np.array([0.8, 1.0, 1.25, 4.0])


@dataclass(frozen=True)
class IRSEstimate:
    """Coverage estimate of one set of queries against a training set (SPEC.md section 2).

    Attributes:
        n_train: Number of training (reference) images, `N_train`.
        n_samples: Number of queries, `n`.
        n_learned: Number of distinct training images retrieved by the queries, `k`.
        irs_alpha: `k / N_train`, the share of the training set retrieved at this sampling ratio.
        irs_inf: `s_hat / N_train`, the maximum-likelihood share of the training set the queries are drawn from.
        irs_inf_lower: Lower one-sided bound on `irs_inf` at error probability `alpha_e`.
        irs_inf_upper: Upper one-sided bound on `irs_inf` at error probability `alpha_e`.
        alpha_e: Error probability of each one-sided bound.

    Example:
        >>> estimate_irs(7465, 1277, 1159)  # the paper's held-out real frames, Sec. 4.2
        IRSEstimate(n_train=7465, n_samples=1277, n_learned=1159, irs_alpha=0.1553, irs_inf=0.8670,
                    irs_inf_lower=0.7520, irs_inf_upper=1.0, alpha_e=0.05)
    """

    n_train: int
    n_samples: int
    n_learned: int
    irs_alpha: float
    irs_inf: float
    irs_inf_lower: float
    irs_inf_upper: float
    alpha_e: float


def _check_count(name: str, value: object, remedy: str) -> int:
    """Return `value` as an `int` when it is a non-negative integer (numpy integers included, bools excluded)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}); {remedy}.")
    if value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}; {remedy}.")
    return int(value)


def _check_inputs(
    n_train: object, n_samples: object, n_learned: object, alpha_e: object
) -> tuple[int, int, int, float]:
    """Validate the arguments of `estimate_irs` and return them as Python numbers."""
    n_train = _check_count("n_train", n_train, "pass the number of training images")
    n_samples = _check_count("n_samples", n_samples, "pass the number of query images")
    n_learned = _check_count("n_learned", n_learned, "pass the number of distinct training images retrieved")
    if n_train == 0:
        raise ValueError("`n_train` must be at least 1, got 0; the training set must not be empty.")
    if n_samples == 0:
        raise ValueError("`n_samples` must be at least 1, got 0; an estimate needs at least one query.")
    if not 1 <= n_learned <= min(n_samples, n_train):
        raise ValueError(
            f"`n_learned` must lie in [1, min(n_samples, n_train)] = [1, {min(n_samples, n_train)}], got {n_learned};"
            " every query retrieves exactly one training image, so at least one and at most"
            " min(n_samples, n_train) distinct images are learned."
        )
    return n_train, n_samples, n_learned, check_alpha_e(alpha_e)


def check_alpha_e(alpha_e: object) -> float:
    """Return `alpha_e` as a float when it is a valid error probability of a one-sided bound, in (0, 0.5).

    Callers that take `alpha_e` long before they estimate anything (the metric, the callback) use this to fail early.

    Raises:
        ValueError: If `alpha_e` is not a real number in the open interval (0, 0.5).

    Example:
        >>> check_alpha_e(0.05)
        0.05
    """
    if isinstance(alpha_e, bool | np.bool_) or not isinstance(alpha_e, numbers.Real):
        raise ValueError(
            f"`alpha_e` must be a float in (0, 0.5), got {alpha_e!r} ({type(alpha_e).__name__}); the default is 0.05."
        )
    alpha_e = float(alpha_e)
    if not 0.0 < alpha_e < 0.5:
        raise ValueError(f"`alpha_e` must lie in the open interval (0, 0.5), got {alpha_e!r}; the default is 0.05.")
    return alpha_e


@functools.lru_cache(maxsize=_EXACT_MAX_N)
def _exact_log_stirling2_row(n: int) -> np.ndarray:
    """Exact row of log S(n, j), j = 0..n, from S(m, j) = j S(m-1, j) + S(m-1, j-1) in float64 log space."""
    row = np.array([0.0])  # S(0, 0) = 1
    log_j = np.log(np.arange(1, n + 1, dtype=np.float64))
    for m in range(1, n + 1):
        new = np.full(m + 1, -np.inf)
        stay = np.append(row[1:], -np.inf) + log_j[:m]  # j S(m-1, j) for j = 1..m, with S(m-1, m) = 0
        new[1:] = np.logaddexp(stay, row)  # ... + S(m-1, j-1)
        row = new
    row.setflags(write=False)
    return row


def _temme_log_stirling2(n: int, j: np.ndarray) -> np.ndarray:
    """Temme's (1993) uniform asymptotic approximation of log S(n, j) for 1 < j < n (SPEC.md section 2.6).

    With v = n / j and G the root in (0, 1) of G = v e^(G - v), that is G = -W0(-v e^-v):
    S(n, j) ~ sqrt((v-1) / (v (1-G))) ((v-1) / (v-G))^(n-j) j^n / n^j e^(j (1-G)) C(n, j).
    """
    j = j.astype(np.float64)
    v = n / j
    eps = (n - j) / j  # v - 1, without the cancellation of n / j - 1
    # -v e^-v underflows to -0 for large v, where G = 0 to double precision.
    g = -lambertw(-np.exp(np.log(v) - v), 0).real
    delta = 1.0 - g
    # Near v = 1 the argument of W0 sits at its branch point -1/e and 1 - G loses digits, so polish delta = 1 - G
    # with Newton steps on -delta - log(1 - delta) = (v - 1) - log(v), the same root written without cancellation.
    near = delta < 0.5
    if np.any(near):
        d = delta[near]
        q = eps[near] - np.log1p(eps[near])
        for _ in range(3):
            d = d - (-d - np.log1p(-d) - q) * (1.0 - d) / d
        delta[near] = d
    log_binom = gammaln(n + 1.0) - gammaln(j + 1.0) - gammaln(n - j + 1.0)
    return (
        0.5 * np.log(eps / (v * delta))
        + (n - j) * np.log(eps / (eps + delta))
        + n * np.log(j)
        - j * math.log(n)
        + j * delta
        + log_binom
    )


def _log_stirling2(n: int, j: np.ndarray) -> np.ndarray:
    """Logarithm of S(n, j), the Stirling numbers of the second kind, for integers 1 <= j <= n.

    Rows with n <= 256 come from the exact recurrence. Above that, Temme's (1993) formula is used for 1 < j < n - 1
    and the exact values S(n, 1) = S(n, n) = 1 and S(n, n-1) = C(n, 2) elsewhere. Measured against the exact
    recurrence (Python integers), Temme's absolute error in log S(n, j) is at most 1.5e-2 at n = 4, 6.1e-4 at
    n = 100, 2.4e-4 at n = 256 and 1.5e-4 at n = 400, largest near j = n / 3 and between 0.061 / n and
    0.069 / n for every n in 4..400; the Newton polish keeps it below 1e-7 for j = n - 2, n - 3 at n = 10 million.
    """
    if n <= _EXACT_MAX_N:
        return _exact_log_stirling2_row(n)[j]
    out = np.zeros(j.shape, dtype=np.float64)  # S(n, 1) = S(n, n) = 1
    out[j == n - 1] = math.log(n) + math.log(n - 1) - math.log(2.0)
    inner = (j > 1) & (j < n - 1)
    out[inner] = _temme_log_stirling2(n, j[inner])
    return out


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct integers of a short array (`np.unique` costs tens of microseconds on a handful)."""
    return np.array(sorted({int(v) for v in values.tolist()}), dtype=np.int64)


def _log_mean_slope(n: int, k: int, s: np.ndarray) -> np.ndarray:
    """Sign-carrying difference f(s+1) - f(s) of the log-likelihood f(s) = log(s! / (s-k)!) - n log s."""
    # log((s+1) / (s+1-k)) - n log((s+1) / s), both written with log1p to keep digits for large s.
    return -np.log1p(-k / (s + 1.0)) - n * np.log1p(1.0 / s)


def _mle(n_train: int, n_samples: int, n_learned: int) -> int:
    """Integer s in [k, N_train] maximising P(k | n, s), SPEC.md section 2.5 (the first maximiser on ties)."""
    if n_learned == n_samples:
        return n_train  # the likelihood rises all the way to N_train
    # f is unimodal, so s_hat is the first s with f(s+1) <= f(s); every step tests a grid over the bracket at once.
    lo, hi = n_learned, n_train  # the answer lies in [lo, hi]; hi always qualifies (s = N_train by convention)
    while lo < hi:
        candidates = _sorted_unique(np.linspace(lo, hi - 1, min(_MLE_GRID, hi - lo)).round())
        falls = _log_mean_slope(n_samples, n_learned, candidates.astype(np.float64)) <= 0.0
        first = int(np.argmax(falls)) if falls.any() else len(candidates)
        hi = int(candidates[first]) if first < len(candidates) else hi
        lo = int(candidates[first - 1]) + 1 if first > 0 else lo
    return lo


def _occupancy_moments(n: int, s: float) -> tuple[float, float]:
    """Asymptotic mean and standard deviation of the number of distinct images hit by n uniform draws from s."""
    a = n / s
    mean = -s * math.expm1(n * math.log1p(-1.0 / s)) if s > 1 else 1.0
    variance = s * math.exp(-a) * (1.0 - (1.0 + a) * math.exp(-a))
    return mean, math.sqrt(max(variance, 0.0))


def _log_row_sums(terms: np.ndarray) -> np.ndarray:
    """Logarithm of the sum of exp(terms) along the last axis, stable (rows of only -inf give -inf)."""
    peak = terms.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(peak), peak, 0.0)
    return (safe + np.log(np.exp(terms - safe).sum(axis=-1, keepdims=True)))[..., 0]


class _TailSums:
    """log P(K <= k | n, s) and log P(K >= k | n, s) for vectors of s, with log S(n, j) computed once per estimate.

    P(K = j | n, s) = S(n, j) s! / ((s-j)! s^n) (SPEC.md section 2.4). The pmf in j is log-concave and concentrated
    within a few standard deviations of its mode, so each tail keeps the terms from k out to `_WINDOW_SDS` of the
    largest deviations over [k, N_train] beyond the mode at s_hat. The searches only move s away from s_hat, which
    moves the mode away from k and makes the tails lighter, so the window stays wide enough.
    """

    def __init__(self, n_train: int, n_samples: int, n_learned: int, s_hat: int) -> None:
        self.n = n_samples
        self.k = n_learned
        peak = min(max(n_samples / _PEAK_RATIO, n_learned), n_train)
        sd = max(_occupancy_moments(n_samples, float(s))[1] for s in (n_learned, peak, n_train))
        width = math.ceil(_WINDOW_SDS * sd) + _WINDOW_MIN
        mode, _ = _occupancy_moments(n_samples, float(s_hat))
        self.j_lo = max(1, min(n_learned, math.floor(mode)) - width)
        self.j_hi = min(n_samples, s_hat, max(n_learned, math.ceil(mode)) + width)
        self.j = np.arange(self.j_lo, self.j_hi + 1, dtype=np.int64)
        self.log_s2 = _log_stirling2(n_samples, self.j)

    def _log_pmf(self, s: np.ndarray, j: np.ndarray, log_s2: np.ndarray) -> np.ndarray:
        s_col = s.astype(np.float64)[:, None]
        j_row = j.astype(np.float64)[None, :]
        falling = gammaln(s_col + 1.0) - gammaln(np.maximum(s_col - j_row, 0.0) + 1.0)  # log(s! / (s-j)!)
        terms = log_s2[None, :] + falling - self.n * np.log(s_col)
        return np.where(j_row <= s_col, terms, -np.inf)  # no more distinct images than s

    def log_cdf(self, s: np.ndarray) -> np.ndarray:
        """Return log P(K <= k | n, s) for each s (shape (len(s),))."""
        stop = self.k - self.j_lo + 1
        return _log_row_sums(self._log_pmf(s, self.j[:stop], self.log_s2[:stop]))

    def log_sf(self, s: np.ndarray) -> np.ndarray:
        """Return log P(K >= k | n, s) for each s (shape (len(s),))."""
        start = self.k - self.j_lo
        return _log_row_sums(self._log_pmf(s, self.j[start:], self.log_s2[start:]))


def _search_crossing(
    score: Callable[[np.ndarray], np.ndarray],
    inside: int,
    outside: int,
    first_candidates: np.ndarray,
) -> int:
    """Last integer from `inside` towards `outside` where the monotone `score` is >= 0, or `inside` if none is.

    `score` is a log tail probability minus log alpha_e; it falls monotonically from `inside` to `outside`. Each
    step scores a short vector of integer candidates in one call: first `first_candidates` (placed by a normal
    approximation), then the two integers around the linearly interpolated crossing, plus points at +-1 % of the
    bracket and its midpoint while the bracket is wide, so it at least halves each step whatever the shape.
    """
    direction = 1 if outside > inside else -1
    # Sentinels one step outside the range: `good` scores >= 0 and `bad` scores < 0 by convention.
    good, bad = inside - direction, outside + direction
    good_score, bad_score = math.nan, math.nan
    candidates = first_candidates
    while abs(bad - good) > 1:
        low, high = min(good, bad), max(good, bad)
        candidates = _sorted_unique(np.minimum(np.maximum(candidates, low + 1), high - 1))
        values = score(candidates)
        if direction == -1:
            candidates, values = candidates[::-1], values[::-1]
        passing = values >= 0.0  # monotone: the passing candidates come first along the search direction
        count = int(np.argmin(passing)) if not passing.all() else len(passing)
        previous_width = abs(bad - good)
        if count > 0:
            good, good_score = int(candidates[count - 1]), float(values[count - 1])
        if count < len(candidates):
            bad, bad_score = int(candidates[count]), float(values[count])
        width = bad - good
        if math.isfinite(good_score) and math.isfinite(bad_score) and good_score > bad_score:
            crossing = good + width * good_score / (good_score - bad_score)
        else:
            crossing = good + width / 2.0
        picks = [math.floor(crossing), math.floor(crossing) + 1]
        if abs(width) > 8:
            picks += [round(crossing - 0.01 * width), round(crossing + 0.01 * width)]
            if 2 * abs(width) > previous_width:  # slow progress: add the midpoint, which halves the bracket
                picks.append(good + width // 2)
        candidates = np.array(picks, dtype=np.int64)
    return inside if good == inside - direction else good


def _bounds(n_train: int, n_samples: int, n_learned: int, s_hat: int, alpha_e: float) -> tuple[int, int]:
    """One-sided confidence bounds on s around s_hat, SPEC.md section 2.6."""
    tails = _TailSums(n_train, n_samples, n_learned, s_hat)
    log_alpha = math.log(alpha_e)
    # Normal approximation of the distance to each bound, only to place the first candidates: the standard error of
    # s_hat is sd(K) / (d mean / d s), with d mean / d s ~ 1 - (1 + a) e^-a.
    a = n_samples / s_hat
    _, sd = _occupancy_moments(n_samples, float(s_hat))
    slope = -math.expm1(-a) - a * math.exp(-a)
    spread = ndtri(1.0 - alpha_e) * sd / slope if slope > 0 and sd > 0 else float(n_train)
    offsets = max(spread, 1.0) * _FIRST_STEP
    # upper: the largest s >= s_hat (at most N_train) with P(K <= k | n, s) >= alpha_e; s_hat if none.
    upper = s_hat
    if s_hat < n_train:
        first = np.concatenate([[s_hat, n_train], np.round(s_hat + offsets)]).astype(np.int64)
        upper = _search_crossing(lambda s: tails.log_cdf(s) - log_alpha, s_hat, n_train, first)
    # lower: the smallest s <= s_hat (at least k) with P(K >= k | n, s) >= alpha_e; s_hat if none.
    lower = s_hat
    if s_hat > n_learned:
        first = np.concatenate([[s_hat, n_learned], np.round(s_hat - offsets)]).astype(np.int64)
        lower = _search_crossing(lambda s: tails.log_sf(s) - log_alpha, s_hat, n_learned, first)
    return lower, upper


def ideal_irs_alpha(n_train: int, n_samples: int) -> float:
    """Expected `IRS_alpha` of a model that reproduces its training set exactly (SPEC.md section 2.3).

    Each of `n_samples` queries hits one of `n_train` images uniformly, so the expected share of distinct images hit
    is `1 - (1 - 1/n_train)^n_samples`, about `1 - exp(-alpha)`.

    Args:
        n_train: Number of training images (at least 1).
        n_samples: Number of queries (at least 0).

    Returns:
        The expected share of the training set retrieved, in [0, 1].

    Raises:
        ValueError: If a count is not a non-negative integer, or `n_train` is 0.

    Example:
        >>> round(ideal_irs_alpha(50_000, 50_000), 4)
        0.6321
    """
    n_train = _check_count("n_train", n_train, "pass the number of training images")
    n_samples = _check_count("n_samples", n_samples, "pass the number of query images")
    if n_train == 0:
        raise ValueError("`n_train` must be at least 1, got 0; the training set must not be empty.")
    if n_train == 1:
        return 1.0 if n_samples > 0 else 0.0
    return -math.expm1(n_samples * math.log1p(-1.0 / n_train))


def estimate_irs(n_train: int, n_samples: int, n_learned: int, alpha_e: float = 0.05) -> IRSEstimate:
    """Estimate the share of the training set a generator covers from one retrieval count (SPEC.md section 2).

    Under the occupancy model each query hits one of `s` producible training images uniformly, and
    `P(k | n, s) = S(n, k) s! / ((s-k)! s^n)`. `irs_inf` is `s_hat / n_train` with `s_hat` the integer `s` in
    `[k, n_train]` maximising it (the first maximiser on ties); when every query retrieved a different image
    (`k == n`) the likelihood rises all the way and `s_hat = n_train`. The bounds are one-sided at error probability
    `alpha_e` each: the largest `s >= s_hat` with `P(K <= k | n, s) >= alpha_e` and the smallest `s <= s_hat` with
    `P(K >= k | n, s) >= alpha_e`. Tail sums run in log space with `log S(n, j)` from the exact recurrence for
    `n <= 256` and from Temme's (1993) asymptotic formula above (relative error in `S` below 2.4e-4 there).

    Args:
        n_train: Number of training (reference) images, `N_train` (at least 1).
        n_samples: Number of queries, `n` (at least 1); it may exceed `n_train`.
        n_learned: Number of distinct training images the queries retrieved, `k`, in `[1, min(n, N_train)]`.
        alpha_e: Error probability of each one-sided bound, in the open interval (0, 0.5).

    Returns:
        The estimate with `irs_alpha = k / N_train`, `irs_inf` and its bounds, all in [0, 1].

    Raises:
        ValueError: If a count is not an integer (bools and floats such as 3.0 are refused, numpy integers are
            accepted) or is negative; if `n_train` or `n_samples` is 0; if `n_learned` is outside
            `[1, min(n_samples, n_train)]` (0 is impossible: every query retrieves an image); or if `alpha_e` is
            not a real number in (0, 0.5).

    Note:
        `[irs_inf_lower, irs_inf_upper]` covers the true share with probability at least `1 - 2 alpha_e` (90 % by
        default; the discrete bounds are conservative). With a single query (`n == 1`) the likelihood is flat and
        the `k == n` rule gives `irs_inf = 1`. Tail sums keep the terms within eight standard deviations of `K`
        (at most 2.7 sqrt(n)) plus 32 of the count and the mode, dropping a mass of about e^-32 of a normal tail;
        the work therefore grows like sqrt(n): about 1 ms of CPU for 50,000 queries, 18 ms for ten million.

    Example:
        >>> est = estimate_irs(7465, 1277, 692)
        >>> print(f"{est.irs_inf:.4f} [{est.irs_inf_lower:.4f}, {est.irs_inf_upper:.4f}]")
        0.1236 [0.1186, 0.1294]
    """
    n_train, n_samples, n_learned, alpha_e = _check_inputs(n_train, n_samples, n_learned, alpha_e)
    s_hat = _mle(n_train, n_samples, n_learned)
    lower, upper = _bounds(n_train, n_samples, n_learned, s_hat, alpha_e)
    return IRSEstimate(
        n_train=n_train,
        n_samples=n_samples,
        n_learned=n_learned,
        irs_alpha=n_learned / n_train,
        irs_inf=s_hat / n_train,
        irs_inf_lower=lower / n_train,
        irs_inf_upper=upper / n_train,
        alpha_e=alpha_e,
    )
