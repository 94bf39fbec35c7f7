# SPDX-License-Identifier: Apache-2.0
"""Exact retrieval against a float64 numpy brute force, on both backends."""

import re

import numpy as np
import pytest
import torch

from diadm import _imports
from diadm.retrieval import ExactIndex, _block_shape, nearest_neighbors, validate_features

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not _imports.FAISS_AVAILABLE, reason="faiss is not installed")),
]


def brute_force(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 squared distances by direct differences; argmin returns the first minimum, i.e. the lowest index."""
    queries = np.asarray(queries, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    distances = ((queries[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
    nearest = distances.argmin(1)
    ordered = np.sort(distances, axis=1)
    return nearest, ordered[:, 0], ordered[:, 1] if reference.shape[0] > 1 else np.full(len(queries), np.inf)


def data_with_duplicates(rng: np.random.Generator, num_queries: int = 120, num_reference: int = 300, dim: int = 24):
    """Random reference with repeated rows, and queries of which some sit on or right next to duplicated rows."""
    reference = rng.standard_normal((num_reference, dim)).astype(np.float32)
    reference[50:60] = reference[7]  # ten copies of row 7, all after it
    reference[200] = reference[250]  # a copy placed before its original
    queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
    queries[:5] = reference[7]
    queries[5:10] = reference[7] + 1e-3 * rng.standard_normal((5, dim)).astype(np.float32)
    queries[10] = reference[250]
    return queries, reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_memory_bytes", [256 * 2**20, 3000], ids=["one-block", "tiny-blocks"])
def test_matches_float64_brute_force_with_duplicates(rng, backend, max_memory_bytes):
    queries, reference = data_with_duplicates(rng)
    expected, best, _ = brute_force(queries, reference)
    indices, distances = nearest_neighbors(queries, reference, backend=backend, max_memory_bytes=max_memory_bytes)
    assert indices.dtype == torch.int64
    assert distances.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), expected)
    # ties resolved to the first copy, including the copy that comes before its original
    assert set(indices[:10].tolist()) == {7}
    assert indices[10].item() == 200
    # distances are recomputed as a float32 sum of squared differences: relative error ~sqrt(D) eps32 < 1e-5
    np.testing.assert_allclose(distances.numpy(), best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_reference_rows_identical_goes_to_row_zero(backend):
    reference = np.tile(np.array([[1.0, -2.0, 3.0]], dtype=np.float32), (40, 1))
    queries = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]], dtype=np.float32)
    indices, distances = nearest_neighbors(queries, reference, backend=backend, max_memory_bytes=64)
    assert indices.tolist() == [0, 0]
    assert distances.tolist() == [14.0, 0.0]


@pytest.mark.parametrize(
    ("num_queries", "num_reference", "budget", "expected"),
    [
        pytest.param(20_000, 5_000, 256 * 2**20, (6710, 5000), id="default-budget-splits-queries"),
        pytest.param(100, 50, 256 * 2**20, (100, 50), id="everything-in-one-block"),
        pytest.param(1_000, 1_000_000, 2**20, (362, 362), id="huge-reference-splits-both"),
        pytest.param(3, 7, 1, (1, 1), id="budget-below-one-element"),
    ],
)
def test_block_shape_stays_within_the_byte_budget(num_queries, num_reference, budget, expected):
    # one block costs 8 bytes per element (the float32 distances and one temporary): never more than the budget
    query_block, reference_block = _block_shape(num_queries, num_reference, budget)
    assert (query_block, reference_block) == expected
    assert query_block * reference_block * 8 <= max(budget, 8)


def test_tiny_memory_budget_equals_one_shot(rng):
    queries, reference = data_with_duplicates(rng, num_queries=70, num_reference=260, dim=5)
    one_shot = ExactIndex(reference, backend="torch").search(queries)
    # 8 bytes per block element: 128 elements per block force both queries and reference to be split
    blocked = ExactIndex(reference, backend="torch", max_memory_bytes=1024).search(queries)
    assert torch.equal(blocked[0], one_shot[0])
    assert torch.equal(blocked[1], one_shot[1])


@pytest.mark.skipif(not _imports.FAISS_AVAILABLE, reason="faiss is not installed")
def test_faiss_and_torch_agree_beyond_float32_rounding(rng):
    # clustered data makes many near-ties; the backends must agree wherever the gap exceeds float32 rounding
    centers = rng.standard_normal((10, 32)).astype(np.float32) * 3
    reference = (centers[rng.integers(0, 10, 1000)] + 0.05 * rng.standard_normal((1000, 32))).astype(np.float32)
    reference[900:1000] = reference[:100]
    queries = (centers[rng.integers(0, 10, 400)] + 0.05 * rng.standard_normal((400, 32))).astype(np.float32)
    queries[:100] = reference[:100]
    from_faiss = nearest_neighbors(queries, reference, backend="faiss")
    from_torch = nearest_neighbors(queries, reference, backend="torch", max_memory_bytes=2**16)
    expected, best, second = brute_force(queries, reference)
    norms = (queries.astype(np.float64) ** 2).sum(1) + (reference.astype(np.float64) ** 2).sum(1).max()
    # float32 rounding of a distance is about sqrt(D) eps32 |q|^2 + |r|^2 = 7e-7 relative to the norms
    separated = second - best > 2e-6 * norms
    assert separated.sum() > 200
    np.testing.assert_array_equal(from_faiss[0].numpy()[separated], expected[separated])
    np.testing.assert_array_equal(from_torch[0].numpy()[separated], expected[separated])
    # the exact copies are ties broken to the lowest index on both
    np.testing.assert_array_equal(from_faiss[0][:100].numpy(), np.arange(100))
    np.testing.assert_array_equal(from_torch[0][:100].numpy(), np.arange(100))
    assert torch.equal(from_faiss[1], from_torch[1])


def test_single_reference_row_and_single_query():
    indices, distances = nearest_neighbors(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), backend="torch")
    assert indices.tolist() == [0]
    assert distances.tolist() == [25.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_searched_in_float32(dtype):
    reference = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=dtype)
    queries = torch.tensor([[1.5, 1.5], [0.25, 0.0]], dtype=dtype)
    indices, distances = nearest_neighbors(queries, reference, backend="torch")
    assert indices.tolist() == [1, 0]
    assert distances.tolist() == [0.5, 0.0625]


def test_index_reports_its_shape_and_backend():
    index = ExactIndex(np.zeros((7, 3), dtype=np.float32), backend="torch")
    assert (index.num_reference, index.num_features) == (7, 3)
    assert index.backend_for("cpu") == "torch"
    assert index.backend_for("cuda") == "torch"
    if _imports.FAISS_AVAILABLE:
        auto = ExactIndex(np.zeros((7, 3), dtype=np.float32))
        assert auto.backend_for("cpu") == "faiss"
        assert auto.backend_for("cuda") == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_threads_is_restored(backend):
    before = torch.get_num_threads()
    nearest_neighbors(np.ones((4, 2), np.float32), np.ones((3, 2), np.float32), backend=backend, num_threads=1)
    assert torch.get_num_threads() == before
    if backend == "faiss":
        import faiss

        assert faiss.omp_get_max_threads() == before


def test_matmul_precision_is_restored():
    torch.set_float32_matmul_precision("medium")
    try:
        nearest_neighbors(np.ones((4, 2), np.float32), np.ones((3, 2), np.float32), backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_missing_faiss_names_both_install_commands(monkeypatch):
    import diadm.retrieval

    monkeypatch.setattr(diadm.retrieval, "FAISS_AVAILABLE", False)
    message = "`ExactIndex(backend='faiss')` needs `faiss-cpu`, which is not installed."
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        ExactIndex(np.ones((2, 2), np.float32), backend="faiss")
    assert ExactIndex(np.ones((2, 2), np.float32)).backend_for("cpu") == "torch"


_nan_rows = np.ones((5, 3), dtype=np.float32)
_nan_rows[1, 0] = np.nan
_nan_rows[3, 2] = np.inf

VALIDATION_ERRORS = [
    pytest.param([[1.0, 2.0]], TypeError, "`x` must be a torch.Tensor or a numpy.ndarray", id="list"),
    pytest.param(
        np.ones(3, np.float32),
        ValueError,
        "`x` must be 2-D with shape (num_images, num_features), got 1-D with shape (3,)",
        id="1-D",
    ),
    pytest.param(torch.ones(2, 3, 4), ValueError, "got 3-D with shape (2, 3, 4)", id="3-D"),
    pytest.param(
        np.ones((0, 4), np.float32),
        ValueError,
        "at least one image with at least one feature, got shape (0, 4)",
        id="no-rows",
    ),
    pytest.param(torch.ones(3, 0), ValueError, "got shape (3, 0)", id="no-columns"),
    pytest.param(
        np.ones((2, 2), np.int64),
        TypeError,
        "`x` must have a floating-point dtype (feature vectors are real numbers), got numpy dtype int64",
        id="numpy-int",
    ),
    pytest.param(torch.ones(2, 2, dtype=torch.uint8), TypeError, "got torch.uint8", id="torch-uint8"),
    pytest.param(torch.ones(2, 2, dtype=torch.bool), TypeError, "got torch.bool", id="torch-bool"),
    pytest.param(np.ones((2, 2), bool), TypeError, "got numpy dtype bool", id="numpy-bool"),
    pytest.param(_nan_rows, ValueError, "got NaN or infinite values in 2 of 5 rows (first at row 1)", id="nan-inf"),
]


@pytest.mark.parametrize(("features", "error", "message"), VALIDATION_ERRORS)
def test_validate_features_errors(features, error, message):
    with pytest.raises(error, match=re.escape(message)):
        validate_features("x", features)


def test_validate_features_keeps_float32_tensor_without_copy():
    features = torch.randn(4, 3)
    assert validate_features("x", features).data_ptr() == features.data_ptr()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"backend": "annoy"}, ValueError, "`backend` must be one of ('auto', 'faiss', 'torch'), got 'annoy'."),
        (
            {"max_memory_bytes": 0},
            ValueError,
            "`max_memory_bytes` must be a positive integer, got 0; the default is 268435456.",
        ),
        (
            {"max_memory_bytes": 1.5e6},
            TypeError,
            "`max_memory_bytes` must be a positive integer, got 1500000.0 (float)",
        ),
        ({"num_threads": 0}, ValueError, "`num_threads` must be a positive integer, got 0; None keeps the current"),
        ({"num_threads": True}, TypeError, "`num_threads` must be a positive integer, got True (bool)"),
    ],
    ids=["backend", "memory-zero", "memory-float", "threads-zero", "threads-bool"],
)
def test_option_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ExactIndex(np.ones((2, 2), np.float32), **kwargs)


def test_width_mismatch_names_both_shapes():
    index = ExactIndex(np.ones((5, 4), np.float32), backend="torch")
    message = "`queries` must have 4 features per row like the reference, got shape (2, 3);"
    with pytest.raises(ValueError, match=re.escape(message)):
        index.search(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("`reference` must contain only finite values")):
        nearest_neighbors(np.ones((2, 3), np.float32), np.full((2, 3), np.nan, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_tie_below_float32_resolution_is_decided_exactly(backend):
    # row 1 is nearer than row 0 by 0.12 in 4e6 (3e-8 relative, below float32 resolution): lowest index would be wrong
    row = np.full(4, 1000.0, dtype=np.float32)
    nearer = row.copy()
    nearer[3] = np.nextafter(np.float32(1000.0), np.float32(0.0))
    reference = np.stack([row, nearer, row + 5.0])
    indices, _ = nearest_neighbors(np.zeros((3, 4), np.float32), reference, backend=backend)
    assert indices.tolist() == [1, 1, 1]
    assert brute_force(np.zeros((1, 4), np.float32), reference)[0].tolist() == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_queries_match_cpu(rng):
    queries, reference = data_with_duplicates(rng)
    on_cpu = nearest_neighbors(queries, reference, backend="torch")
    on_cuda = nearest_neighbors(torch.from_numpy(queries).cuda(), torch.from_numpy(reference).cuda())
    assert on_cuda[0].device.type == "cuda"
    assert torch.equal(on_cuda[0].cpu(), on_cpu[0])
    # a CPU index searched with CUDA queries runs on the torch path, on the queries' device
    index = ExactIndex(reference)
    assert index.backend_for("cuda") == "torch"
    assert torch.equal(index.search(torch.from_numpy(queries).cuda())[0].cpu(), on_cpu[0])
