# SPDX-License-Identifier: Apache-2.0
"""Functional Image Retrieval Score: exact retrieval of training images by generated ones, then the IRS estimates."""

import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diadm.estimator import IRSEstimate, check_alpha_e, estimate_irs
from diadm.retrieval import DEFAULT_MAX_MEMORY_BYTES, ExactIndex, validate_features


@dataclass(frozen=True)
class IRSResult:
    """Everything `image_retrieval_score` measured (SPEC.md sections 2 and 4).

    Attributes:
        synthetic: Estimate from all synthetic queries against the training set.
        test: Estimate from the held-out real queries that entered the adjusted score (the subsample when the held-out
            set was larger than the synthetic set), or None without held-out features.
        irs_adjusted: `IRS_inf(synthetic) / IRS_inf(held-out)` at equal query counts, averaged over synthetic subsets
            when there are several; None without held-out features. It can exceed 1.
        irs_adjusted_std: Sample standard deviation of the ratio over the synthetic subsets (0.0 for one subset);
            None without held-out features.
        num_subsets: Number of synthetic subsets averaged into `irs_adjusted` (0 without held-out features).
        nearest_train_index: Index of the nearest training image of every synthetic query, int64, shape
            (num_synthetic,), on the CPU.
        retrieval_counts: How many synthetic queries retrieved each training image, int64, shape (num_train,), on
            the CPU; it sums to num_synthetic, and its non-zero entries number `synthetic.n_learned`.

    Note:
        `==` between two results raises `RuntimeError`, because the generated comparison meets tensor fields
        (whose truth value is ambiguous). Compare the estimates and floats with `==` and the tensors with
        `torch.equal`.
    """

    synthetic: IRSEstimate
    test: IRSEstimate | None
    irs_adjusted: float | None
    irs_adjusted_std: float | None
    num_subsets: int
    nearest_train_index: Tensor
    retrieval_counts: Tensor


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got {seed!r} ({type(seed).__name__}).")
    return int(seed)


def _check_width(name: str, features: Tensor, train: Tensor) -> None:
    if features.shape[1] != train.shape[1]:
        raise ValueError(
            f"`{name}` must have as many features per row as `train_features` ({train.shape[1]}), got shape"
            f" {tuple(features.shape)} against {tuple(train.shape)}; extract both with the same feature extractor."
        )


def _check_index(index: object, train: Tensor) -> None:
    if not isinstance(index, ExactIndex):
        raise TypeError(f"`index` must be an ExactIndex built from `train_features`, got {type(index).__name__}.")
    if (index.num_reference, index.num_features) != tuple(train.shape):
        raise ValueError(
            "`index` must be built from `train_features`, got an index of"
            f" {index.num_reference} x {index.num_features} features for `train_features` of shape"
            f" {tuple(train.shape)}; build it with `ExactIndex(train_features)` or pass `index=None`."
        )


def _num_distinct(indices: Tensor) -> int:
    return int(torch.unique(indices).numel())


def image_retrieval_score(
    train_features: Tensor | np.ndarray,
    synthetic_features: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray | None = None,
    *,
    alpha_e: float = 0.05,
    seed: int = 0,
    backend: Literal["auto", "faiss", "torch"] = "auto",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    index: ExactIndex | None = None,
) -> IRSResult:
    """Compute the Image Retrieval Score of synthetic features against training features.

    Every synthetic query retrieves its nearest training image under squared Euclidean distance, exactly (ties to
    the lowest training index, see `ExactIndex`). A training image is learned when at least one query retrieves it;
    the number of distinct learned images `k` gives `IRS_alpha = k / N_train` and, through the occupancy model,
    the maximum-likelihood `IRS_inf` with its bounds (`diadm.estimate_irs`). `synthetic` is that estimate over all
    synthetic queries.

    With `test_features` (real images held out from training), the same estimate is made with them as queries, and
    the adjusted score `IRS_inf(synthetic) / IRS_inf(held-out)` corrects for the feature extractor's measurement gap
    (SPEC.md section 2.7). Both sides then use the same number of queries:

    - held-out set larger than the synthetic set: a random subset of the held-out rows, of the synthetic size, is
      the held-out side (`num_subsets` is 1, `irs_adjusted_std` 0.0);
    - equal sizes: all rows on both sides;
    - held-out set smaller: the synthetic set is split into `num_subsets = num_synthetic // num_test` disjoint
      random subsets of the held-out size (the remaining `num_synthetic % num_test` rows are left out of the
      adjusted score), each subset is estimated, and `irs_adjusted` is the mean of the ratios
      `IRS_inf(subset) / IRS_inf(held-out)`; `irs_adjusted_std` is their sample standard deviation (ddof 1).

    `test` is the estimate of the held-out queries actually used. The random choices come from
    `torch.Generator().manual_seed(seed)`: `torch.randperm(num_test)[:num_synthetic]` picks the held-out subset,
    `torch.randperm(num_synthetic)` orders the synthetic rows that are cut into consecutive subsets. The same inputs
    and seed give the same result.

    Args:
        train_features: Features of the training images, shape (num_train, num_features), floating point.
        synthetic_features: Features of generated images, shape (num_synthetic, num_features).
        test_features: Features of held-out real images, shape (num_test, num_features), or None.
        alpha_e: Error probability of each one-sided confidence bound, in (0, 0.5).
        seed: Seed of the subsampling and splitting.
        backend: Retrieval backend, "auto", "faiss" or "torch" (see `ExactIndex`); ignored when `index` is given.
        max_memory_bytes: Byte budget of one distance block of the retrieval; ignored when `index` is given.
        index: A prebuilt `ExactIndex` of `train_features` to reuse (its size must match `train_features`).

    Returns:
        An `IRSResult`.

    Raises:
        TypeError: If a feature set is not a floating-point tensor or array, `seed` or `max_memory_bytes` is not an
            integer, or `index` is not an `ExactIndex`.
        ValueError: If a feature set is not 2-D, is empty or holds NaN/inf, the feature widths differ, `index` does
            not match `train_features` in size, or `alpha_e` or a retrieval option is out of range.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> train = torch.randn(200, 16, generator=g)
        >>> # a generator that reproduces only the first 50 training images, with a little noise
        >>> synthetic = train[torch.randint(0, 50, (100,), generator=g)] + 0.01 * torch.randn(100, 16, generator=g)
        >>> held_out = train[torch.randint(0, 200, (100,), generator=g)] + 0.01 * torch.randn(100, 16, generator=g)
        >>> result = image_retrieval_score(train, synthetic, held_out)
        >>> result.synthetic.n_learned, round(result.synthetic.irs_inf, 3), round(result.irs_adjusted, 2)
        (43, 0.245, 0.24)
        >>> int(result.retrieval_counts.sum()), result.num_subsets
        (100, 1)
    """
    check_alpha_e(alpha_e)  # the estimator's own rule, checked before the retrieval runs
    seed = _check_seed(seed)
    train = validate_features("train_features", train_features)
    synthetic = validate_features("synthetic_features", synthetic_features)
    _check_width("synthetic_features", synthetic, train)
    test = None
    if test_features is not None:
        test = validate_features("test_features", test_features)
        _check_width("test_features", test, train)
    if index is None:
        index = ExactIndex(train, backend=backend, max_memory_bytes=max_memory_bytes)
    else:
        _check_index(index, train)
    num_train, num_synthetic = train.shape[0], synthetic.shape[0]

    nearest = index.search(synthetic)[0].cpu()
    counts = torch.bincount(nearest, minlength=num_train)
    synthetic_estimate = estimate_irs(num_train, num_synthetic, int((counts > 0).sum()), alpha_e=alpha_e)
    if test is None:
        return IRSResult(synthetic_estimate, None, None, None, 0, nearest, counts)

    generator = torch.Generator().manual_seed(seed)
    num_test = test.shape[0]
    if num_test > num_synthetic:
        # equal query counts: only the subsample of the held-out set needs retrieving
        subset = torch.randperm(num_test, generator=generator)[:num_synthetic]
        test = test[subset.to(test.device)]
        num_test = num_synthetic
    test_estimate = estimate_irs(num_train, num_test, _num_distinct(index.search(test)[0]), alpha_e=alpha_e)
    if num_test == num_synthetic:
        ratio = synthetic_estimate.irs_inf / test_estimate.irs_inf
        return IRSResult(synthetic_estimate, test_estimate, ratio, 0.0, 1, nearest, counts)

    num_subsets = num_synthetic // num_test
    order = torch.randperm(num_synthetic, generator=generator)[: num_subsets * num_test]
    ratios = [
        estimate_irs(num_train, num_test, _num_distinct(nearest[part]), alpha_e=alpha_e).irs_inf / test_estimate.irs_inf
        for part in order.view(num_subsets, num_test)
    ]
    spread = float(np.std(ratios, ddof=1)) if num_subsets > 1 else 0.0
    return IRSResult(synthetic_estimate, test_estimate, float(np.mean(ratios)), spread, num_subsets, nearest, counts)


def split_train_for_test(train_features: Tensor | np.ndarray, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split a training set in two random halves, for an adjusted score when no held-out set exists.

    SPEC.md section 2.7: without held-out real images, half of the training set serves as the reference and the
    other half as the held-out queries. Rows keep their original order within each half.

    Args:
        train_features: Training features, shape (num_train, num_features), with at least two rows.
        seed: Seed of the split (`torch.randperm` with `torch.Generator().manual_seed(seed)`).

    Returns:
        `(reference, held_out)`, float32 tensors with `num_train - num_train // 2` and `num_train // 2` rows.

    Raises:
        TypeError: If `train_features` is not a floating-point tensor or array, or `seed` is not an integer.
        ValueError: If `train_features` is malformed or has fewer than two rows.

    Example:
        >>> reference, held_out = split_train_for_test(torch.arange(10.0).reshape(5, 2), seed=0)
        >>> reference.shape[0], held_out.shape[0]
        (3, 2)
    """
    seed = _check_seed(seed)
    train = validate_features("train_features", train_features)
    if train.shape[0] < 2:
        raise ValueError(
            f"`train_features` must have at least two rows to split in half, got shape {tuple(train.shape)}."
        )
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed)).to(train.device)
    half = train.shape[0] // 2
    return train[order[half:].sort().values], train[order[:half].sort().values]
