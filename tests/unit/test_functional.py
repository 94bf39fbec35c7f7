# SPDX-License-Identifier: Apache-2.0
"""`image_retrieval_score` against a numpy brute force and a by-hand application of the SPEC.md 2.7 rules."""

import re

import numpy as np
import pytest
import torch

from diadm.estimator import estimate_irs
from diadm.functional import IRSResult, image_retrieval_score, split_train_for_test
from diadm.retrieval import ExactIndex

BACKENDS = ["torch", "faiss"]


def numpy_nearest(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Float64 brute-force nearest training row (first minimum = lowest index)."""
    distances = ((queries[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1)
    return distances.argmin(1)


@pytest.fixture
def features(rng):
    """60 training rows; synthetic rows near only the first 20 of them; held-out rows near any of them."""
    train = rng.standard_normal((60, 8)).astype(np.float32)
    synthetic = train[rng.integers(0, 20, 50)] + 0.05 * rng.standard_normal((50, 8)).astype(np.float32)
    held_out = train[rng.integers(0, 60, 12)] + 0.05 * rng.standard_normal((12, 8)).astype(np.float32)
    return train, synthetic.astype(np.float32), held_out.astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_match_numpy(features, backend):
    train, synthetic, _ = features
    result = image_retrieval_score(train, synthetic, backend=backend)
    expected = numpy_nearest(synthetic, train)
    np.testing.assert_array_equal(result.nearest_train_index.numpy(), expected)
    np.testing.assert_array_equal(result.retrieval_counts.numpy(), np.bincount(expected, minlength=60))
    assert int(result.retrieval_counts.sum()) == 50
    assert result.synthetic == estimate_irs(60, 50, len(np.unique(expected)))
    assert (result.test, result.irs_adjusted, result.irs_adjusted_std, result.num_subsets) == (None, None, None, 0)


def test_identical_sets_learn_every_training_image(rng):
    train = rng.standard_normal((40, 6)).astype(np.float32)
    result = image_retrieval_score(train, train.copy())
    assert result.synthetic.n_learned == 40
    np.testing.assert_array_equal(result.nearest_train_index.numpy(), np.arange(40))
    np.testing.assert_array_equal(result.retrieval_counts.numpy(), np.ones(40, dtype=np.int64))
    # the same set as held-out queries: the adjusted score is exactly 1
    assert image_retrieval_score(train, train, train).irs_adjusted == 1.0


def test_duplicated_training_images_count_once(rng):
    train = rng.standard_normal((30, 4)).astype(np.float32)
    train[10:20] = train[:10]
    result = image_retrieval_score(train, train)
    assert result.synthetic.n_learned == 20
    expected_counts = np.r_[np.full(10, 2), np.zeros(10), np.ones(10)]
    np.testing.assert_array_equal(result.retrieval_counts.numpy(), expected_counts)


def manual_subset_average(train, synthetic, held_out, seed):
    """SPEC.md 2.7 by hand: seeded permutation of the synthetic rows, consecutive subsets of the held-out size."""
    num_test = len(held_out)
    test_inf = estimate_irs(len(train), num_test, len(np.unique(numpy_nearest(held_out, train)))).irs_inf
    nearest = numpy_nearest(synthetic, train)
    order = torch.randperm(len(synthetic), generator=torch.Generator().manual_seed(seed)).numpy()
    ratios = []
    for start in range(0, len(synthetic) - num_test + 1, num_test):
        part = nearest[order[start : start + num_test]]
        ratios.append(estimate_irs(len(train), num_test, len(np.unique(part))).irs_inf / test_inf)
    return ratios


@pytest.mark.parametrize("seed", [0, 7])
def test_smaller_held_out_set_averages_the_subsets(features, seed):
    train, synthetic, held_out = features
    result = image_retrieval_score(train, synthetic, held_out, seed=seed)
    ratios = manual_subset_average(train, synthetic, held_out, seed)
    assert result.num_subsets == len(ratios) == 4  # 50 // 12, two synthetic rows left out
    # the reference code returned the last subset's ratio: the ratios differ, so only the mean passes
    assert len(set(ratios)) > 1
    assert result.irs_adjusted == pytest.approx(np.mean(ratios), rel=1e-12)
    assert result.irs_adjusted != pytest.approx(ratios[-1], rel=1e-6)
    assert result.irs_adjusted_std == pytest.approx(np.std(ratios, ddof=1), rel=1e-12)
    assert result.test == estimate_irs(60, 12, len(np.unique(numpy_nearest(held_out, train))))
    # `synthetic` stays the estimate over all 50 queries
    assert result.synthetic == estimate_irs(60, 50, len(np.unique(numpy_nearest(synthetic, train))))


def test_seeds_pick_different_subsets(features):
    train, synthetic, held_out = features
    first, second = (manual_subset_average(train, synthetic, held_out, seed) for seed in (0, 7))
    assert first != second
    assert image_retrieval_score(train, synthetic, held_out, seed=0).irs_adjusted == pytest.approx(np.mean(first))
    assert image_retrieval_score(train, synthetic, held_out, seed=7).irs_adjusted == pytest.approx(np.mean(second))


@pytest.mark.parametrize("seed", [0, 3])
def test_larger_held_out_set_is_subsampled(rng, features, seed):
    train, synthetic, _ = features
    held_out = (train[rng.integers(0, 60, 80)] + 0.05 * rng.standard_normal((80, 8))).astype(np.float32)
    result = image_retrieval_score(train, synthetic, held_out, seed=seed)
    subset = torch.randperm(80, generator=torch.Generator().manual_seed(seed))[:50].numpy()
    expected_test = estimate_irs(60, 50, len(np.unique(numpy_nearest(held_out[subset], train))))
    assert result.test == expected_test
    assert result.irs_adjusted == result.synthetic.irs_inf / expected_test.irs_inf
    assert (result.irs_adjusted_std, result.num_subsets) == (0.0, 1)


def test_one_subset_has_zero_spread(features):
    train, synthetic, held_out = features
    result = image_retrieval_score(train, synthetic[:20], held_out)  # 20 // 12 = 1 subset
    ratios = manual_subset_average(train, synthetic[:20], held_out, 0)
    assert (result.num_subsets, result.irs_adjusted_std) == (1, 0.0)
    assert result.irs_adjusted == pytest.approx(ratios[0], rel=1e-12)


def test_prebuilt_index_gives_the_same_result(features):
    train, synthetic, held_out = features
    reused = image_retrieval_score(train, synthetic, held_out, index=ExactIndex(train, backend="torch"))
    fresh = image_retrieval_score(train, synthetic, held_out)
    assert (reused.synthetic, reused.test, reused.irs_adjusted) == (fresh.synthetic, fresh.test, fresh.irs_adjusted)
    assert torch.equal(reused.retrieval_counts, fresh.retrieval_counts)


def test_result_is_frozen(features):
    train, synthetic, _ = features
    result = image_retrieval_score(train, synthetic)
    assert isinstance(result, IRSResult)
    with pytest.raises(AttributeError):
        result.num_subsets = 3


def test_result_equality_is_unsupported_as_documented(features):
    train, synthetic, _ = features
    first, second = image_retrieval_score(train, synthetic), image_retrieval_score(train, synthetic)
    with pytest.raises(RuntimeError, match=re.escape("Boolean value of Tensor with more than one value is ambiguous")):
        _ = first == second
    assert first.synthetic == second.synthetic
    assert torch.equal(first.retrieval_counts, second.retrieval_counts)


def test_split_train_for_test(rng):
    train = rng.standard_normal((11, 3)).astype(np.float32)
    reference, held_out = split_train_for_test(train, seed=5)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_array_equal(reference.numpy(), train[np.sort(order[5:])])
    np.testing.assert_array_equal(held_out.numpy(), train[np.sort(order[:5])])


_train = np.ones((6, 4), np.float32)
_nan = np.ones((3, 4), np.float32)
_nan[2, 1] = np.nan

FUNCTIONAL_ERRORS = [
    pytest.param(
        {"synthetic_features": np.ones((3, 5), np.float32)},
        ValueError,
        "`synthetic_features` must have as many features per row as `train_features` (4), got shape (3, 5)"
        " against (6, 4);",
        id="synthetic-width",
    ),
    pytest.param(
        {"test_features": np.ones((3, 2), np.float32)},
        ValueError,
        "`test_features` must have as many features per row as `train_features` (4), got shape (3, 2)",
        id="test-width",
    ),
    pytest.param(
        {"test_features": _nan},
        ValueError,
        "`test_features` must contain only finite values, got NaN or infinite values in 1 of 3 rows (first at row 2)",
        id="test-nan",
    ),
    pytest.param(
        {"train_features": np.ones((0, 4), np.float32)},
        ValueError,
        "`train_features` must hold at least one image with at least one feature, got shape (0, 4).",
        id="train-empty",
    ),
    pytest.param(
        {"synthetic_features": np.ones((3, 4), np.uint8)},
        TypeError,
        "`synthetic_features` must have a floating-point dtype",
        id="synthetic-uint8",
    ),
    pytest.param(
        {"synthetic_features": torch.ones(3, 2, 2)},
        ValueError,
        "`synthetic_features` must be 2-D with shape (num_images, num_features), got 3-D",
        id="synthetic-3-D",
    ),
    pytest.param(
        {"index": ExactIndex(np.ones((5, 4), np.float32), backend="torch")},
        ValueError,
        "`index` must be built from `train_features`, got an index of 5 x 4 features for `train_features` of shape"
        " (6, 4);",
        id="index-size",
    ),
    pytest.param({"index": "faiss"}, TypeError, "`index` must be an ExactIndex built from", id="index-type"),
    pytest.param({"seed": 1.5}, TypeError, "`seed` must be an integer, got 1.5 (float).", id="seed"),
    pytest.param({"alpha_e": 0.7}, ValueError, "`alpha_e` must lie in the open interval (0, 0.5), got 0.7", id="alpha"),
    pytest.param({"backend": "gpu"}, ValueError, "`backend` must be one of ('auto', 'faiss', 'torch')", id="backend"),
    pytest.param(
        {"max_memory_bytes": 2.5e8},
        TypeError,
        "`max_memory_bytes` must be a positive integer, got 250000000.0 (float)",
        id="memory-float",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), FUNCTIONAL_ERRORS)
def test_bad_input(kwargs, error, message):
    arguments = {"train_features": _train, "synthetic_features": np.ones((3, 4), np.float32), **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        image_retrieval_score(**arguments)


def test_split_needs_two_rows():
    message = "`train_features` must have at least two rows to split in half, got shape (1, 3)."
    with pytest.raises(ValueError, match=re.escape(message)):
        split_train_for_test(np.ones((1, 3), np.float32))
