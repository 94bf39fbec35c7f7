# SPDX-License-Identifier: Apache-2.0
"""Exact nearest-neighbour retrieval under squared Euclidean distance, in bounded memory."""

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from diadm._imports import FAISS_AVAILABLE, require

Backend = Literal["auto", "faiss", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_MAX_MEMORY_BYTES = 256 * 2**20

_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
_FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
# A float32 dot product over D terms, as BLAS sums it, errs by about sqrt(D) * eps * |q| |r|. The factor is a
# safety margin on that model; a query is re-ranked exactly when its two best distances are closer than
# _AMBIGUITY_FACTOR times the resulting bound.
_ROUNDING_FACTOR = 8.0
_AMBIGUITY_FACTOR = 4.0
# Bytes charged per element of a (queries x reference) distance block: the float32 block plus one temporary.
_BYTES_PER_BLOCK_ELEMENT = 8
# Below this many queries per block a matrix product no longer runs at full speed, so the reference is split instead.
_MIN_QUERY_BLOCK = 256


def validate_features(name: str, features: Any) -> Tensor:
    """Check that `features` is a usable (num_images, num_features) feature matrix and return it as float32.

    Features must be a torch tensor or a numpy array, two-dimensional with at least one row and one column, of a
    floating-point dtype (float16, bfloat16, float32 or float64) and finite everywhere. Integer and boolean arrays
    are refused because they are almost always images or labels passed where features were meant.

    Args:
        name: The argument name, used in error messages.
        features: The feature matrix, one row per image.

    Returns:
        A float32 tensor with the same values (rounded to float32), on the device of `features` (CPU for numpy).
        No copy is made when `features` already is a float32 tensor.

    Raises:
        TypeError: If `features` is neither a tensor nor a numpy array, or its dtype is not floating point.
        ValueError: If `features` is not 2-D, has no rows or no columns, or holds NaN or infinite values.

    Example:
        >>> import numpy as np
        >>> validate_features("train_features", np.ones((3, 2), dtype=np.float16)).dtype
        torch.float32
    """
    if isinstance(features, np.ndarray):
        if features.dtype.kind != "f":
            raise TypeError(
                f"`{name}` must have a floating-point dtype (feature vectors are real numbers), got numpy dtype"
                f" {features.dtype}; extract features from the images first, or convert with `.astype(np.float32)`."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(features))
    elif isinstance(features, Tensor):
        if not features.dtype.is_floating_point:
            raise TypeError(
                f"`{name}` must have a floating-point dtype (feature vectors are real numbers), got {features.dtype};"
                " extract features from the images first, or convert with `.float()`."
            )
        tensor = features.detach()
    else:
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a numpy.ndarray of shape (num_images, num_features),"
            f" got {type(features).__name__}."
        )
    if tensor.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D with shape (num_images, num_features), got {tensor.ndim}-D with shape"
            f" {tuple(tensor.shape)}; flatten the features of each image into one row, e.g. `x.reshape(len(x), -1)`."
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(
            f"`{name}` must hold at least one image with at least one feature, got shape {tuple(tensor.shape)}."
        )
    tensor = tensor.to(torch.float32)
    # NaN and inf survive a row sum, so only rows with a non-finite sum (or an overflowing one) need a closer look
    suspects = (~torch.isfinite(tensor.sum(dim=1))).nonzero().flatten()
    bad = suspects[~torch.isfinite(tensor[suspects]).all(dim=1)]
    if bad.numel() > 0:
        raise ValueError(
            f"`{name}` must contain only finite values, got NaN or infinite values in {bad.numel()} of"
            f" {tensor.shape[0]} rows (first at row {int(bad[0])}); drop or repair those images."
        )
    return tensor


def _check_options(backend: Any, max_memory_bytes: Any, num_threads: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    for name, value, default in (
        ("max_memory_bytes", max_memory_bytes, f"the default is {DEFAULT_MAX_MEMORY_BYTES}"),
        ("num_threads", num_threads, "None keeps the current setting"),
    ):
        if value is None and name == "num_threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be a positive integer, got {value!r} ({type(value).__name__}); {default}.")
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}; {default}.")


def _block_shape(num_queries: int, num_reference: int, max_memory_bytes: int) -> tuple[int, int]:
    """Rows of queries and of reference per distance block, so that one block fits in `max_memory_bytes`."""
    budget = max(1, max_memory_bytes // _BYTES_PER_BLOCK_ELEMENT)
    query_block = min(num_queries, budget // num_reference)
    if query_block >= min(num_queries, _MIN_QUERY_BLOCK):
        return query_block, num_reference
    query_block = max(1, min(num_queries, math.isqrt(budget)))
    return query_block, max(1, min(num_reference, budget // query_block))


def _squared_norms(features: Tensor) -> Tensor:
    """Squared L2 norm of every row, without a temporary of the size of `features`."""
    return torch.linalg.vector_norm(features, dim=1).square()


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(total, start + step)


@contextlib.contextmanager
def _search_settings(num_threads: int | None, use_faiss: bool) -> Iterator[None]:
    """Run with full float32 matrix products (no TF32 or bfloat16) and, optionally, a thread count; restore after."""
    precision = torch.get_float32_matmul_precision()
    torch_threads = torch.get_num_threads()
    faiss_threads = None
    if num_threads is not None and use_faiss:
        import faiss

        # read before torch changes it: torch and faiss may share one OpenMP runtime
        faiss_threads = faiss.omp_get_max_threads()
    try:
        torch.set_float32_matmul_precision("highest")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
            if use_faiss:
                faiss.omp_set_num_threads(num_threads)
        yield
    finally:
        if faiss_threads is not None:
            faiss.omp_set_num_threads(faiss_threads)
        if num_threads is not None:
            torch.set_num_threads(torch_threads)
        torch.set_float32_matmul_precision(precision)


class ExactIndex:
    """Exact nearest-neighbour index over a fixed set of reference feature vectors.

    `search` returns, for every query row, the index of the reference row at the smallest squared Euclidean
    distance and that distance. The search is exact (no approximation that could change which image is retrieved,
    and so the number of distinct retrieved images the IRS counts).

    Two backends compute the float32 distances: faiss `IndexFlatL2` (CPU) and a blocked torch matrix product
    followed by a top-2 reduction (CPU or CUDA). `backend="auto"` uses faiss for CPU queries when it is
    installed and torch otherwise, and always torch for CUDA queries. Both keep, per query, the best and the
    second-best candidate; a query whose two distances lie within float32 rounding of each other (duplicate reference
    rows, or near-ties) is re-ranked in float64 over every reference row that could be its nearest, and a tie is
    resolved to the lowest reference index. Hence both backends return the same index for every query, and duplicates
    always go to their first copy. Returned distances are recomputed for the chosen pair as a float32 sum of squared
    differences (relative error about 1e-6, free of the cancellation of the matrix-product form), so they do not
    depend on the backend either.

    Memory: one distance block of the torch path holds at most `max_memory_bytes` (queries and, if needed, the
    reference are split into blocks); it never allocates `num_queries x num_reference` at once.

    Args:
        reference: Reference features, shape (num_reference, num_features), a floating-point torch tensor or numpy
            array (float16 and bfloat16 are upcast to float32).
        backend: "faiss", "torch" or "auto" (see above).
        max_memory_bytes: Byte budget of one distance block.
        num_threads: Threads for the search (torch and faiss); None keeps the current settings. The previous
            thread counts are restored after every search.

    Raises:
        TypeError: If `reference` is not a floating-point tensor or array, or `max_memory_bytes` or `num_threads`
            is not an integer.
        ValueError: If `reference` is malformed (see `validate_features`), `backend` is unknown, or
            `max_memory_bytes` or `num_threads` is below 1.
        ModuleNotFoundError: If `backend="faiss"` and faiss is not installed.

    Note:
        Which queries are re-ranked rests on a rounding model: a float32 distance computed by a matrix product errs
        by at most 8 sqrt(D) eps32 (|q|^2 + max |r|^2). BLAS summation stays well inside it in practice (blocked
        sums err like sqrt(D) eps32). A query whose two best float32 distances differ by more than four times the
        bound is answered from the float32 ranking without re-ranking.

    Note:
        Memory beyond the block budget: the torch path keeps the reference as given (a float32 copy only when it
        arrives in another dtype) plus its squared norms; the faiss backend keeps its own float32 copy of the
        reference (num_reference x num_features x 4 bytes) and a fixed working buffer of about 16 MiB of its own,
        whatever `max_memory_bytes` says.

    Example:
        >>> import torch
        >>> reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> index = ExactIndex(reference, backend="torch")
        >>> indices, distances = index.search(torch.tensor([[0.9, 0.1], [4.0, 4.0]]))
        >>> indices.tolist(), [round(d, 4) for d in distances.tolist()]
        ([1, 3], [0.02, 2.0])
    """

    def __init__(
        self,
        reference: Tensor | np.ndarray,
        *,
        backend: Backend = "auto",
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        num_threads: int | None = None,
    ) -> None:
        _check_options(backend, max_memory_bytes, num_threads)
        if backend == "faiss":
            require(FAISS_AVAILABLE, "faiss-cpu", "faiss", "`ExactIndex(backend='faiss')`")
        self._reference = validate_features("reference", reference)
        self._requested_backend = backend
        self.max_memory_bytes = max_memory_bytes
        self.num_threads = num_threads
        # per device: (reference on that device, squared row norms)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._max_sq_norm = float(self._norms(self._reference.device)[1].max())
        self._faiss_index: Any = None
        if backend == "faiss" or (backend == "auto" and FAISS_AVAILABLE and self._reference.device.type == "cpu"):
            self._faiss_index = self._build_faiss()

    @property
    def num_reference(self) -> int:
        """Number of reference rows."""
        return int(self._reference.shape[0])

    @property
    def num_features(self) -> int:
        """Width of a feature vector."""
        return int(self._reference.shape[1])

    def backend_for(self, device: torch.device | str) -> Literal["faiss", "torch"]:
        """Name the backend that `search` uses for queries on `device`."""
        device = torch.device(device)
        if self._requested_backend == "faiss":
            return "faiss"
        if self._requested_backend == "torch" or device.type != "cpu" or self._faiss_index is None:
            return "torch"
        return "faiss"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_reference={self.num_reference}, num_features={self.num_features},"
            f" backend={self._requested_backend!r}, max_memory_bytes={self.max_memory_bytes})"
        )

    def search(self, queries: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """Find the nearest reference row of every query.

        Args:
            queries: Query features, shape (num_queries, num_features), floating point.

        Returns:
            `(indices, distances)`: int64 indices into the reference, shape (num_queries,), and float32 squared
            Euclidean distances, shape (num_queries,). On the device of `queries` for the torch backend, on the CPU
            for faiss.

        Raises:
            TypeError: If `queries` is not a floating-point tensor or array.
            ValueError: If `queries` is malformed or its width differs from the reference's.
        """
        queries = validate_features("queries", queries)
        if queries.shape[1] != self.num_features:
            raise ValueError(
                f"`queries` must have {self.num_features} features per row like the reference, got shape"
                f" {tuple(queries.shape)}; extract both with the same feature extractor."
            )
        backend = self.backend_for(queries.device)
        device = queries.device if backend == "torch" else torch.device("cpu")
        queries = queries.to(device)
        with _search_settings(self.num_threads, backend == "faiss"):
            if backend == "faiss":
                best, indices, second = self._faiss_top2(queries)
            else:
                best, indices, second = self._torch_top2(queries)
            tolerance = self._tolerance(queries)
            ambiguous = (second - best <= _AMBIGUITY_FACTOR * tolerance).nonzero().flatten()
            if ambiguous.numel() > 0:
                # Re-rank in float64 every reference row within rounding of the best float32 distance.
                threshold = best[ambiguous] + _AMBIGUITY_FACTOR * tolerance[ambiguous]
                refined = self._rerank(queries[ambiguous], threshold)
                # the best float32 row always passes the threshold; the guard only protects against a broken BLAS
                found = refined < self.num_reference
                indices[ambiguous[found]] = refined[found]
            distances = self._exact_distances(queries, indices)
        return indices, distances

    # ----------------------------------------------------------------------------------------------------------------
    # private helpers

    def _norms(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on_device:
            reference = self._reference.to(device)
            self._on_device[device] = (reference, _squared_norms(reference))
        return self._on_device[device]

    def _build_faiss(self) -> Any:
        import faiss

        index = faiss.IndexFlatL2(self.num_features)
        reference = self._reference.cpu()
        rows = max(1, self.max_memory_bytes // (4 * self.num_features))
        for start, stop in _ranges(self.num_reference, rows):
            index.add(np.ascontiguousarray(reference[start:stop].numpy()))
        return index

    def _tolerance(self, queries: Tensor) -> Tensor:
        """Bound on the float32 rounding error of one computed squared distance, per query."""
        scale = _ROUNDING_FACTOR * math.sqrt(self.num_features) * _FLOAT32_EPS
        return scale * (_squared_norms(queries) + self._max_sq_norm)

    def _torch_top2(self, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Best and second-best `|r|^2 - 2 q.r` (the squared distance less `|q|^2`) and the best index per query."""
        reference, sq_norms = self._norms(queries.device)
        num_queries = queries.shape[0]
        query_block, reference_block = _block_shape(num_queries, self.num_reference, self.max_memory_bytes)
        best = torch.empty(num_queries, dtype=torch.float32, device=queries.device)
        second = torch.empty_like(best)
        indices = torch.empty(num_queries, dtype=torch.int64, device=queries.device)
        for q_start, q_stop in _ranges(num_queries, query_block):
            block_queries = queries[q_start:q_stop]
            # running two best candidates of every query in the block, merged over reference blocks
            top_values = torch.full((q_stop - q_start, 2), math.inf, device=queries.device)
            top_indices = torch.zeros((q_stop - q_start, 2), dtype=torch.int64, device=queries.device)
            for r_start, r_stop in _ranges(self.num_reference, reference_block):
                # (query_block, reference_block) partial squared distances
                block = torch.addmm(
                    sq_norms[r_start:r_stop], block_queries, reference[r_start:r_stop].T, beta=1.0, alpha=-2.0
                )
                values, positions = block.topk(min(2, r_stop - r_start), dim=1, largest=False)
                values = torch.cat([top_values, values], dim=1)
                positions = torch.cat([top_indices, positions + r_start], dim=1)
                top_values, order = values.topk(2, dim=1, largest=False)
                top_indices = positions.gather(1, order)
            best[q_start:q_stop] = top_values[:, 0]
            indices[q_start:q_stop] = top_indices[:, 0]
            second[q_start:q_stop] = top_values[:, 1]
        return best, indices, second

    def _faiss_top2(self, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Same contract as `_torch_top2`, computed by faiss on the CPU."""
        k = min(2, self.num_reference)
        rows = max(1, self.max_memory_bytes // (4 * (self.num_features + 2 * k)))
        best = torch.empty(queries.shape[0], dtype=torch.float32)
        second = torch.full_like(best, math.inf)
        indices = torch.empty(queries.shape[0], dtype=torch.int64)
        for start, stop in _ranges(queries.shape[0], rows):
            distances, positions = self._faiss_index.search(np.ascontiguousarray(queries[start:stop].numpy()), k)
            distances = torch.from_numpy(distances)
            best[start:stop] = distances[:, 0]
            indices[start:stop] = torch.from_numpy(positions[:, 0])
            if k > 1:
                second[start:stop] = distances[:, 1]
        # faiss returns full squared distances; subtract |q|^2 to share the torch path's scale
        sq_norms = _squared_norms(queries)
        return best - sq_norms, indices, second - sq_norms

    def _rerank(self, queries: Tensor, threshold: Tensor) -> Tensor:
        """Lowest-index exact (float64) nearest row among rows whose float32 partial distance is below `threshold`."""
        reference, sq_norms = self._norms(queries.device)
        num_queries = queries.shape[0]
        best_distance = torch.full((num_queries,), math.inf, dtype=torch.float64, device=queries.device)
        best_index = torch.full((num_queries,), self.num_reference, dtype=torch.int64, device=queries.device)
        # a third of the budget per block: when most rows tie, the mask and the (query, row) pairs add 17 bytes each
        query_block, reference_block = _block_shape(num_queries, self.num_reference, self.max_memory_bytes // 3)
        pair_block = max(1, self.max_memory_bytes // (16 * self.num_features))
        for q_start, q_stop in _ranges(num_queries, query_block):
            block_queries = queries[q_start:q_stop]
            for r_start, r_stop in _ranges(self.num_reference, reference_block):
                block = torch.addmm(
                    sq_norms[r_start:r_stop], block_queries, reference[r_start:r_stop].T, beta=1.0, alpha=-2.0
                )
                pairs = (block <= threshold[q_start:q_stop, None]).nonzero()
                del block
                # pairs are sorted by query, then reference index, so earlier pairs always have lower indices
                for p_start, p_stop in _ranges(pairs.shape[0], pair_block):
                    query_rows = pairs[p_start:p_stop, 0] + q_start
                    reference_rows = pairs[p_start:p_stop, 1] + r_start
                    difference = queries[query_rows].double() - reference[reference_rows].double()
                    self._merge(best_distance, best_index, query_rows, reference_rows, difference.square().sum(1))
        return best_index

    def _merge(
        self, best_distance: Tensor, best_index: Tensor, query_rows: Tensor, reference_rows: Tensor, distance: Tensor
    ) -> None:
        """Fold float64 candidate distances into the running best, keeping the earliest index among ties."""
        # float64 sums of D squares err by at most D * eps relative; closer than that counts as a tie
        tie_tolerance = 2.0 * self.num_features * _FLOAT64_EPS
        batch_best = torch.full_like(best_distance, math.inf).scatter_reduce(0, query_rows, distance, reduce="amin")
        is_tied = distance <= batch_best[query_rows] * (1.0 + tie_tolerance)
        candidates = torch.where(is_tied, reference_rows, self.num_reference)
        batch_index = torch.full_like(best_index, self.num_reference).scatter_reduce(
            0, query_rows, candidates, reduce="amin"
        )
        improves = batch_best < best_distance * (1.0 - tie_tolerance)
        best_distance[improves] = batch_best[improves]
        best_index[improves] = batch_index[improves]

    def _exact_distances(self, queries: Tensor, indices: Tensor) -> Tensor:
        """Squared distance of every query to its chosen reference row, as a direct sum of squared differences."""
        reference = self._norms(queries.device)[0]
        distances = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
        # small blocks stay in the allocator's cache; float32 suffices, as no cancellation happens in this form
        rows = max(1, min(self.max_memory_bytes, 2**21) // (8 * self.num_features))
        for start, stop in _ranges(queries.shape[0], rows):
            difference = queries[start:stop] - reference[indices[start:stop]]
            distances[start:stop] = difference.square_().sum(dim=1)
        return distances


def nearest_neighbors(
    queries: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    *,
    backend: Backend = "auto",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    num_threads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Find the nearest `reference` row of every `queries` row under squared Euclidean distance, exactly.

    A one-shot shortcut for `ExactIndex(reference, ...).search(queries)`; build an `ExactIndex` instead to search the
    same reference several times. Ties go to the lowest reference index on every backend.

    Args:
        queries: Query features, shape (num_queries, num_features).
        reference: Reference features, shape (num_reference, num_features).
        backend: "faiss", "torch" or "auto" (see `ExactIndex`).
        max_memory_bytes: Byte budget of one distance block.
        num_threads: Threads for the search; None keeps the current settings.

    Returns:
        `(indices, distances)`: int64 nearest reference indices and float32 squared distances, both (num_queries,).

    Raises:
        TypeError: If either input is not a floating-point tensor or array, or an integer option is not an integer.
        ValueError: If either input is malformed, their widths differ, or an option is out of range.
        ModuleNotFoundError: If `backend="faiss"` and faiss is not installed.

    Example:
        >>> import numpy as np
        >>> reference = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 1.0]])
        >>> indices, distances = nearest_neighbors(np.array([[0.0, 0.0], [3.0, 3.0]]), reference)
        >>> indices.tolist(), distances.tolist()
        ([0, 1], [1.0, 2.0])
    """
    index = ExactIndex(reference, backend=backend, max_memory_bytes=max_memory_bytes, num_threads=num_threads)
    return index.search(queries)
