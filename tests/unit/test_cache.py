# SPDX-License-Identifier: Apache-2.0
"""Tests of content fingerprints and the on-disk feature cache."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diadm.cache import FeatureCache, cached, fingerprint


# ---------------------------------------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------------------------------------
def test_fingerprint_of_bytes_and_file_is_plain_sha256(tmp_path: Path) -> None:
    data = b"\x00\x01 some image bytes"
    (tmp_path / "a.bin").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert fingerprint(data) == expected
    assert fingerprint(bytearray(data)) == expected
    assert fingerprint(memoryview(data)) == expected
    assert fingerprint(tmp_path / "a.bin") == expected


def test_fingerprint_of_files_depends_on_content_not_names(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "0.png").write_bytes(b"first")
    (tmp_path / "one" / "1.png").write_bytes(b"second")
    (tmp_path / "two" / "x.png").write_bytes(b"first")
    (tmp_path / "two" / "y.png").write_bytes(b"second")
    one = [tmp_path / "one" / "0.png", tmp_path / "one" / "1.png"]
    two = [str(tmp_path / "two" / "x.png"), str(tmp_path / "two" / "y.png")]
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(one[::-1])
    assert fingerprint(one) != fingerprint(one[:1])
    (tmp_path / "one" / "1.png").write_bytes(b"secone")
    assert fingerprint(one) != fingerprint(two)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2)),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)),
        (torch.zeros(4, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)),
        (torch.zeros(2, 3), torch.tensor([[0.0, 0, 0], [0, 0, 1e-30]])),
    ],
    ids=["shape", "dtype", "same-bytes-other-dtype", "content"],
)
def test_fingerprint_of_tensors_separates(left: torch.Tensor, right: torch.Tensor) -> None:
    assert fingerprint(left) != fingerprint(right)


def test_fingerprint_of_tensor_matches_array_and_ignores_layout() -> None:
    array = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    tensor = torch.from_numpy(array.copy())
    assert fingerprint(tensor) == fingerprint(array)
    # A transposed (non-contiguous) view hashes like its contiguous copy.
    assert fingerprint(tensor.t()) == fingerprint(tensor.t().contiguous())
    assert fingerprint(array.T) == fingerprint(np.ascontiguousarray(array.T))
    assert fingerprint(tensor.t()) != fingerprint(tensor)
    # dtypes NumPy lacks and 0-d tensors work.
    assert len(fingerprint(torch.tensor(1.5, dtype=torch.bfloat16))) == 64
    assert fingerprint(torch.tensor(1.5)) != fingerprint(torch.tensor([1.5]))


@pytest.mark.parametrize(
    ("obj", "error", "message"),
    [
        ("some/path.png", TypeError, "`fingerprint` got a bare string 'some/path.png', which could be text or a path"),
        (np.array([object()]), TypeError, "got an array of dtype object"),
        (
            3.5,
            TypeError,
            "`fingerprint` takes a tensor, a NumPy array, bytes, a path or a sequence of paths, got float.",
        ),
        ([1, 2], TypeError, "got list."),
    ],
    ids=["str", "object-array", "float", "list-of-int"],
)
def test_fingerprint_rejects(obj: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        fingerprint(obj)


def test_fingerprint_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("missing.png")):
        fingerprint([tmp_path / "missing.png"])
    with pytest.raises(IsADirectoryError, match=re.escape("is a directory")):
        fingerprint([tmp_path])


# ---------------------------------------------------------------------------------------------------------------------
# FeatureCache
# ---------------------------------------------------------------------------------------------------------------------
def test_cache_round_trip_and_atomic_write(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "nested" / "cache")
    features = torch.randn(5, 7)
    key = FeatureCache.key("pixels", "abc")
    assert cache.get(key) is None
    assert key not in cache
    path = cache.put(key, features)
    assert path == tmp_path / "nested" / "cache" / f"{key}.safetensors"
    torch.testing.assert_close(cache.get(key), features, rtol=0, atol=0)
    assert key in cache
    # Only the final file remains: the temporary file was renamed into place.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    # A second instance on the same folder sees the entry.
    torch.testing.assert_close(FeatureCache(path.parent).get(key), features, rtol=0, atol=0)
    # float16 and non-contiguous tensors survive.
    half = torch.randn(3, 4).to(torch.float16).t()
    cache.put("half", half)
    assert cache.get("half").dtype == torch.float16
    torch.testing.assert_close(cache.get("half"), half, rtol=0, atol=0)


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all", b"\xff" * 8 + b"{}"], ids=["empty", "garbage", "bad-header"]
)
def test_corrupt_cache_file_is_a_miss_with_warning(tmp_path: Path, content: bytes) -> None:
    cache = FeatureCache(tmp_path)
    cache.path("k").write_bytes(content)
    with pytest.warns(RuntimeWarning, match=re.escape("Ignoring the unreadable feature cache file")):
        assert cache.get("k") is None
    # cached() recomputes and overwrites the corrupt file.
    with pytest.warns(RuntimeWarning, match=re.escape("will be recomputed")):
        value = cached(cache, "k", lambda: torch.ones(2))
    torch.testing.assert_close(value, torch.ones(2))
    torch.testing.assert_close(cache.get("k"), torch.ones(2))


def test_truncated_cache_file_is_a_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    path = cache.put("k", torch.randn(50, 50))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))):
        assert cache.get("k") is None


def test_cache_file_without_features_tensor_is_a_miss(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cache = FeatureCache(tmp_path)
    save_file({"other": torch.ones(1)}, cache.path("k"))
    with pytest.warns(RuntimeWarning, match=re.escape("KeyError")):
        assert cache.get("k") is None


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path)
    cache.put("k", torch.zeros(2))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("diadm.cache.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k", torch.ones(2))
    # The old complete entry is intact and no temporary file is left.
    torch.testing.assert_close(cache.get("k"), torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_key_is_length_prefixed_and_deterministic() -> None:
    assert FeatureCache.key("ab", "c") != FeatureCache.key("a", "bc")
    # Independent reference: the documented layout, SHA-256 of a prefix and each part as `<byte length>:<bytes>`.
    assert FeatureCache.key("a", "bc") == hashlib.sha256(b"diadm-cache-key;1:a2:bc").hexdigest()
    assert FeatureCache.key("\u00e9") == hashlib.sha256("diadm-cache-key;2:\u00e9".encode()).hexdigest()
    assert FeatureCache.key("a", "b") != FeatureCache.key("b", "a")
    assert re.fullmatch("[0-9a-f]{64}", FeatureCache.key("x"))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: FeatureCache.key(), ValueError, "`FeatureCache.key` needs at least one part, got none."),
        (lambda c: FeatureCache.key("a", 3), TypeError, "`FeatureCache.key` parts must be strings, got int (3)"),
        (lambda c: c.get("../escape"), ValueError, "got '../escape'; build keys with `FeatureCache.key(...)`."),
        (lambda c: c.put("", torch.ones(1)), ValueError, "`key` must be 1-200 letters"),
        (lambda c: c.put("k", np.ones(1)), TypeError, "`features` must be a torch.Tensor, got ndarray."),
        (lambda c: cached(c, "k", lambda: [1.0]), TypeError, "`compute` must return a torch.Tensor, got list."),
        (lambda c: cached("dir", "k", torch.ones), TypeError, "`cache` must be a FeatureCache or None, got str."),
        (lambda c: FeatureCache(3), TypeError, "`directory` must be a path, got int."),
    ],
    ids=["no-parts", "int-part", "traversal", "empty-key", "array", "compute-list", "cache-str", "dir-int"],
)
def test_cache_errors(tmp_path: Path, call: object, error: type[Exception], message: str) -> None:
    cache = FeatureCache(tmp_path)
    with pytest.raises(error, match=re.escape(message)):
        call(cache)


def test_cache_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=re.escape("got the file")):
        FeatureCache(tmp_path / "file")


def test_cached_without_cache_always_computes() -> None:
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.ones(1)

    cached(None, "k", compute)
    cached(None, "k", compute)
    assert len(calls) == 2
