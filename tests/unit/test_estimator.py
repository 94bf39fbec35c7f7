# SPDX-License-Identifier: Apache-2.0
"""Tests of `diadm.estimator` against the paper's numbers, simulation, and exact brute-force references."""

import functools
import math
import re
import time
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import gammaln

from diadm.estimator import (
    IRSEstimate,
    _log_stirling2,
    _mle,
    _TailSums,
    _temme_log_stirling2,
    estimate_irs,
    ideal_irs_alpha,
)

# ---------------------------------------------------------------- independent references (Python integers)


@functools.lru_cache(maxsize=1)
def _exact_stirling_rows(n_max: int) -> tuple[tuple[int, ...], ...]:
    """Rows S(n, 0..n) for n = 0..n_max from S(n, j) = j S(n-1, j) + S(n-1, j-1), in exact integers."""
    rows = [(1,)]
    for n in range(1, n_max + 1):
        previous = rows[-1]
        rows.append(tuple([0] + [j * (previous[j] if j < n else 0) + previous[j - 1] for j in range(1, n + 1)]))
    return tuple(rows)


def _log_int(value: int) -> float:
    """math.log of a big integer without overflowing float."""
    shift = max(0, value.bit_length() - 1000)
    return math.log(value >> shift) + shift * math.log(2.0)


@functools.lru_cache(maxsize=4096)
def _exact_pmf(n: int, s: int) -> tuple[Fraction, ...]:
    """P(K = j | n, s) for j = 0..n as exact fractions: S(n, j) s! / ((s-j)! s^n)."""
    row = _exact_stirling_rows(400)[n]
    out = []
    for j in range(n + 1):
        falling = math.perm(s, j) if j <= s else 0
        out.append(Fraction(row[j] * falling, s**n))
    return tuple(out)


def _brute_force(n_train: int, n: int, k: int, alpha_e: Fraction) -> tuple[int, int, int]:
    """(lower, s_hat, upper) by scanning every s in [k, N_train] with exact rational probabilities."""
    likelihood = {s: _exact_pmf(n, s)[k] for s in range(k, n_train + 1)}
    s_hat = max(likelihood, key=lambda s: (likelihood[s], -s))  # first maximiser
    if k == n:  # SPEC.md 2.5: rising (for n = 1 flat) likelihood, s_hat = N_train
        s_hat = n_train
    cdf = {s: sum(_exact_pmf(n, s)[: k + 1]) for s in range(s_hat, n_train + 1)}
    sf = {s: sum(_exact_pmf(n, s)[k:]) for s in range(k, s_hat + 1)}
    upper = max([s for s in cdf if cdf[s] >= alpha_e], default=s_hat)
    lower = min([s for s in sf if sf[s] >= alpha_e], default=s_hat)
    return lower, s_hat, upper


# ---------------------------------------------------------------- the paper's published example


@pytest.mark.parametrize(
    ("n_learned", "expected"),
    [(1159, (0.867, 0.752, 1.000)), (692, (0.1236, 0.1186, 0.1294))],
    ids=["held-out-real", "synthetic"],
)
def test_paper_example(n_learned, expected):
    # Paper Sec. 4.2 (SPEC.md section 2): N_train 7465, 1277 queries.
    est = estimate_irs(7465, 1277, n_learned)
    got = (est.irs_inf, est.irs_inf_lower, est.irs_inf_upper)
    np.testing.assert_allclose(got, expected, atol=5e-4)  # the paper's 3 decimals
    assert est.irs_alpha == n_learned / 7465
    assert (est.n_train, est.n_samples, est.n_learned, est.alpha_e) == (7465, 1277, n_learned, 0.05)


def test_paper_adjusted_score():
    synthetic, real = estimate_irs(7465, 1277, 692), estimate_irs(7465, 1277, 1159)
    assert synthetic.irs_inf / real.irs_inf == pytest.approx(0.1426, abs=5e-4)


# ---------------------------------------------------------------- known truth by simulation

SIMULATIONS = [  # (n_train, s, n)
    (50_000, 10_000, 5_000),
    (50_000, 40_000, 50_000),
    (20_000, 2_000, 2_000),
    (7_465, 1_000, 1_277),
    (50_000, 25_000, 10_000),
]


def test_recovers_simulated_truth(rng):
    # 100 seeded draws per setting of n queries, each hitting one of s producible images uniformly (SPEC.md 2.4).
    covered = {}
    for n_train, s, n in SIMULATIONS:
        ratios, covered[s] = [], 0
        for _ in range(100):
            k = int(np.count_nonzero(np.bincount(rng.integers(0, s, size=n), minlength=s)))
            est = estimate_irs(n_train, n, k)
            ratios.append(est.irs_inf * n_train / s - 1.0)
            covered[s] += est.irs_inf_lower * n_train <= s <= est.irs_inf_upper * n_train
        assert abs(np.mean(ratios)) < 0.01, (n_train, s, n)
    # Two one-sided 5 % bounds: nominal coverage 90 %. 100 draws have a binomial spread of 3 points, so one setting
    # may show 89 by chance (this seed: 91, 91, 89, 91, 94); the pooled 500 draws must reach 90 %, and each setting
    # 85 % (1.7 spreads below nominal). `test_exact_coverage` checks the guarantee itself without sampling noise.
    assert sum(covered.values()) >= 450, covered
    assert min(covered.values()) >= 85, covered


@pytest.mark.parametrize(("n_train", "s", "n"), [(2_000, 300, 250), (1_000, 900, 250)], ids=["s300", "s900"])
def test_exact_coverage(n_train, s, n):
    # Exact miss probabilities of each one-sided bound, summing P(k | n, s) (exact integers) over every k.
    pmf = [float(p) for p in _exact_pmf(n, s)]
    miss_upper = miss_lower = 0.0
    for k in range(1, min(n, s) + 1):
        if pmf[k] < 1e-15:
            continue
        est = estimate_irs(n_train, n, k)
        miss_upper += pmf[k] * (round(est.irs_inf_upper * n_train) < s)
        miss_lower += pmf[k] * (round(est.irs_inf_lower * n_train) > s)
    assert miss_upper <= 0.05
    assert miss_lower <= 0.05
    assert miss_upper + miss_lower >= 0.02  # the bounds are not trivially wide


# ---------------------------------------------------------------- Stirling numbers

_TEMME_GRID = [4, 5, 8, 10, 20, 50, 100, 255, 300, 400]


@pytest.mark.parametrize("n", _TEMME_GRID)
def test_temme_matches_exact_recurrence(n):
    # Measured: |error| of Temme's log S(n, j) peaks at 0.061 to 0.069 / n (largest at n = 5, 6; 6.1e-4 at n = 100,
    # near j = n / 3), so the tolerance is 0.07 / n.
    j = np.arange(2, n - 1)
    exact = np.array([_log_int(v) for v in _exact_stirling_rows(400)[n][2 : n - 1]])
    error = np.abs(_temme_log_stirling2(n, j) - exact)
    assert error.max() <= 0.07 / n
    assert error.max() >= 0.04 / n  # the documented size of the error is real, not an artefact of the test


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 256, 257, 300, 400])
def test_log_stirling2_uses_exact_values(n):
    j = np.arange(1, n + 1)
    exact = np.array([_log_int(v) for v in _exact_stirling_rows(400)[n][1:]])
    got = _log_stirling2(n, j)
    if n <= 256:  # exact float64 recurrence: only rounding
        np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-12)
    else:  # Temme inside, exact S(n, 1), S(n, n-1), S(n, n)
        np.testing.assert_allclose(got, exact, atol=0.07 / n)
        np.testing.assert_allclose(got[[0, -2, -1]], exact[[0, -2, -1]], rtol=1e-13)


def test_temme_near_diagonal_for_huge_n():
    # S(n, n-2) = C(n,3) + 3 C(n,4) and S(n, n-3) = C(n,4) + 10 C(n,5) + 15 C(n,6), n = 10 million: the Newton polish
    # of the Lambert W root keeps these within 1e-7 (without it the error is 1e-3).
    n = 10_000_000
    c = math.comb
    exact = [_log_int(c(n, 3) + 3 * c(n, 4)), _log_int(c(n, 4) + 10 * c(n, 5) + 15 * c(n, 6))]
    np.testing.assert_allclose(_temme_log_stirling2(n, np.array([n - 2, n - 3])), exact, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- MLE and bounds against brute force


def test_mle_matches_float64_argmax():
    # Brute force: f(s) = log(s!/(s-k)!) - n log s over every s in [k, N_train], first maximiser.
    n_train = 150
    for n in (1, 2, 3, 10, 57, 150, 400):
        for k in range(1, min(n, n_train) + 1):
            s = np.arange(k, n_train + 1, dtype=np.float64)
            f = gammaln(s + 1) - gammaln(s - k + 1) - n * np.log(s)
            # k == n: f rises to N_train (is flat for n = 1, where SPEC.md 2.5 also gives N_train).
            expected = n_train if k == n else k + int(np.argmax(f))
            assert _mle(n_train, n, k) == expected, (n, k)


@pytest.mark.parametrize(
    ("n_train", "n", "k"),
    [(1_000_000, 1_000, 999), (1_000_000, 50_000, 48_470), (200_000, 1_000, 997), (10_000_000, 1_000_000, 951_000)],
)
def test_mle_matches_high_precision_argmax(n_train, n, k):
    # Where the likelihood is flat, float64 lgamma differences (values ~1e7 to 1e8) cannot rank neighbouring s, so
    # the reference is a 50-digit mpmath evaluation of f(s) around our s_hat.
    mpmath = pytest.importorskip("mpmath")
    s_hat = _mle(n_train, n, k)
    with mpmath.workdps(50):
        window = range(max(k, s_hat - 25), min(n_train, s_hat + 25) + 1)
        f = {s: mpmath.loggamma(s + 1) - mpmath.loggamma(s - k + 1) - n * mpmath.log(s) for s in window}
    assert max(f, key=f.get) == s_hat


BRUTE_FORCE = [(n_train, n) for n_train in (1, 5, 30, 60) for n in (1, 2, 9, 25, 40) if n_train <= 60]


@pytest.mark.parametrize("alpha_e", [0.0437, 0.1234])
@pytest.mark.parametrize(("n_train", "n"), BRUTE_FORCE, ids=[f"N{a}-n{b}" for a, b in BRUTE_FORCE])
def test_bounds_match_exact_brute_force(n_train, n, alpha_e):
    # Every k: exact rational tail sums over every s, compared with the search in log space. The alpha_e values
    # avoid exact ties with small-denominator probabilities (alpha_e = 0.05 meets P(K <= 1 | 2, 20) = 1/20, which
    # float64 log space cannot order against the binary 0.05 = 1/20 + 2.8e-18).
    for k in range(1, min(n, n_train) + 1):
        lower, s_hat, upper = _brute_force(n_train, n, k, Fraction(alpha_e))
        est = estimate_irs(n_train, n, k, alpha_e=alpha_e)
        got = (est.irs_inf_lower * n_train, est.irs_inf * n_train, est.irs_inf_upper * n_train)
        np.testing.assert_allclose(got, (lower, s_hat, upper), rtol=1e-12, err_msg=f"k={k}")


@pytest.mark.parametrize(
    ("n_train", "n_learned"),
    [(20_000, 2_000), (20_000, 3_500), (20_000, 4_500), (20_000, 4_990), (1_000_000, 4_990), (5_000, 3_100)],
)
def test_tail_window_matches_full_sum(n_train, n_learned):
    # The windowed tail sums against sums over every j in [1, n], n = 5000, at s from k to N_train.
    n = 5_000
    s_hat = _mle(n_train, n, n_learned)
    tails = _TailSums(n_train, n, n_learned, s_hat)
    s = np.unique(np.linspace(n_learned, n_train, 40).round().astype(np.int64))
    j = np.arange(1, n + 1)
    log_falling = gammaln(s[:, None] + 1.0) - gammaln(np.maximum(s[:, None] - j[None, :], 0) + 1.0)
    log_pmf = _log_stirling2(n, j)[None, :] + log_falling - n * np.log(s[:, None])
    log_pmf = np.where(j[None, :] <= s[:, None], log_pmf, -np.inf)
    full_cdf = np.logaddexp.reduce(log_pmf[:, :n_learned], axis=1)
    full_sf = np.logaddexp.reduce(log_pmf[:, n_learned - 1 :], axis=1)
    above, below = s >= s_hat, s <= s_hat  # the ranges each search explores
    # atol: lgamma(s + 1) reaches 1.3e7 at s = 1e6, whose float64 spacing is 1.9e-9; the window itself drops < 1e-13.
    np.testing.assert_allclose(tails.log_cdf(s[above]), full_cdf[above], rtol=0, atol=1e-8)
    np.testing.assert_allclose(tails.log_sf(s[below]), full_sf[below], rtol=0, atol=1e-8)


# ---------------------------------------------------------------- edge cases

EDGE_CASES = [  # (n_train, n, k) -> (irs_inf, lower, upper)
    ("k-equals-n", (1_000, 10, 10), (1.0, None, 1.0)),
    ("k-equals-n-train", (100, 500, 100), (1.0, 1.0, 1.0)),
    ("single-query", (1_000, 1, 1), (1.0, 0.001, 1.0)),
    ("more-queries-than-train", (100, 1_000, 99), (0.99, 0.99, 0.99)),
    ("single-image-learned", (1_000, 50, 1), (0.001, 0.001, 0.001)),
    ("reference-code-hang", (1_000, 1_000, 1_000), (1.0, 1.0, 1.0)),
    ("ten-million-ideal", (10_000_000, 10_000_000, 6_321_206), (1.0, None, 1.0)),
    ("ten-million-half", (10_000_000, 5_000_000, 2_000_000), (None, None, None)),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_edge_cases_answer(args, expected, record_property):
    start = time.perf_counter()
    est = estimate_irs(*args)
    # Goal: under a second (measured 0.2 to 50 ms); recorded, not asserted, as CI machines are shared.
    record_property("seconds", time.perf_counter() - start)
    got = (est.irs_inf, est.irs_inf_lower, est.irs_inf_upper)
    for value, want in zip(got, expected, strict=True):
        if want is not None:
            assert value == pytest.approx(want, abs=1e-6)
    assert 0.0 < est.irs_inf_lower <= est.irs_inf <= est.irs_inf_upper <= 1.0
    assert est.irs_inf >= est.irs_alpha


def test_ten_million_half_is_consistent():
    # k drawn at the ideal count for s = 2.5 million of 10 million images: the estimate lands within 0.1 %.
    n_train, n, s = 10_000_000, 5_000_000, 2_500_000
    k = round(s * -math.expm1(n * math.log1p(-1 / s)))
    est = estimate_irs(n_train, n, k)
    assert est.irs_inf == pytest.approx(0.25, rel=1e-3)
    assert est.irs_inf_lower < 0.25 < est.irs_inf_upper


def test_numpy_integers_are_accepted():
    est = estimate_irs(np.int64(7465), np.int32(1277), np.uint16(692), alpha_e=np.float32(0.05))
    assert est == estimate_irs(7465, 1277, 692, alpha_e=float(np.float32(0.05)))
    assert type(est.n_train) is int
    assert isinstance(est, IRSEstimate)


def test_smaller_alpha_e_widens_bounds():
    wide, narrow = estimate_irs(7465, 1277, 692, alpha_e=0.01), estimate_irs(7465, 1277, 692, alpha_e=0.2)
    assert wide.irs_inf == narrow.irs_inf
    assert wide.irs_inf_lower < narrow.irs_inf_lower < narrow.irs_inf < narrow.irs_inf_upper < wide.irs_inf_upper


# ---------------------------------------------------------------- ideal curve


@pytest.mark.parametrize(("n_train", "n"), [(1, 0), (1, 5), (2, 3), (7, 7), (40, 13)])
def test_ideal_irs_alpha_matches_exact_expectation(n_train, n):
    # E[K] / N = 1 - (1 - 1/N)^n by linearity, in exact fractions.
    exact = 1 - (1 - Fraction(1, n_train)) ** n
    assert ideal_irs_alpha(n_train, n) == pytest.approx(float(exact), rel=1e-14)


def test_ideal_irs_alpha_large():
    assert ideal_irs_alpha(50_000, 50_000) == pytest.approx(1 - math.exp(-1), abs=1e-5)


# ---------------------------------------------------------------- invalid input

INVALID = [
    ("negative-train", (-3, 10, 5), {}, "`n_train` must be a non-negative integer, got -3; pass the number of"),
    ("zero-train", (0, 10, 5), {}, "`n_train` must be at least 1, got 0"),
    ("float-samples", (10, 3.5, 2), {}, "`n_samples` must be an integer, got 3.5 (float)"),
    ("whole-float-samples", (10, 3.0, 2), {}, "`n_samples` must be an integer, got 3.0 (float)"),
    ("bool-learned", (10, 5, True), {}, "`n_learned` must be an integer, got True (bool)"),
    ("string-train", ("10", 5, 2), {}, "`n_train` must be an integer, got '10' (str)"),
    ("negative-learned", (10, 5, -1), {}, "`n_learned` must be a non-negative integer, got -1"),
    ("zero-samples", (10, 0, 0), {}, "`n_samples` must be at least 1, got 0"),
    ("zero-learned", (10, 5, 0), {}, "`n_learned` must lie in [1, min(n_samples, n_train)] = [1, 5], got 0"),
    ("learned-above-samples", (10, 5, 6), {}, "`n_learned` must lie in [1, min(n_samples, n_train)] = [1, 5], got 6"),
    ("learned-above-train", (4, 9, 5), {}, "`n_learned` must lie in [1, min(n_samples, n_train)] = [1, 4], got 5"),
    ("alpha-zero", (10, 5, 3), {"alpha_e": 0.0}, "`alpha_e` must lie in the open interval (0, 0.5), got 0.0"),
    ("alpha-half", (10, 5, 3), {"alpha_e": 0.5}, "`alpha_e` must lie in the open interval (0, 0.5), got 0.5"),
    ("alpha-negative", (10, 5, 3), {"alpha_e": -0.1}, "`alpha_e` must lie in the open interval (0, 0.5), got -0.1"),
    ("alpha-nan", (10, 5, 3), {"alpha_e": math.nan}, "`alpha_e` must lie in the open interval (0, 0.5), got nan"),
    ("alpha-bool", (10, 5, 3), {"alpha_e": True}, "`alpha_e` must be a float in (0, 0.5), got True (bool)"),
    ("alpha-string", (10, 5, 3), {"alpha_e": "0.05"}, "`alpha_e` must be a float in (0, 0.5), got '0.05' (str)"),
]


@pytest.mark.parametrize(("args", "kwargs", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_input_raises(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate_irs(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 5), "`n_train` must be at least 1, got 0"), ((5, -1), "`n_samples` must be a non-negative integer, got -1")],
    ids=["zero-train", "negative-samples"],
)
def test_ideal_irs_alpha_invalid(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ideal_irs_alpha(*args)
