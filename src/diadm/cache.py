# SPDX-License-Identifier: Apache-2.0
"""Content fingerprints and an on-disk cache of feature tensors.

Features of real image sets are expensive (a SwAV pass over a training set) and are needed again every time a
generator is scored, so they are stored on disk under a key built from the *content* of what produced them: the
bytes of the image files and a fingerprint of the extractor. Renaming a folder keeps the cache valid, changing one
pixel of one file invalidates it, and two folders whose files share names never collide (the reference research
code keyed its cache by file names and so mixed them up).

Files are written atomically (a temporary file in the cache folder, then `os.replace`), so an interrupted run
leaves either the complete old entry, the complete new one, or none; an unreadable entry is treated as a miss.
"""

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Name of the tensor inside each safetensors file and the format version written into its metadata.
_TENSOR_NAME = "features"
_FORMAT_VERSION = "1"
_SUFFIX = ".safetensors"
# Keys become file names: keep them to a portable alphabet with no path separators.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_READ_BLOCK = 1 << 20


def _file_digest(path: Path) -> str:
    """SHA-256 hex digest of one file's bytes (the same value `sha256sum` prints)."""
    if path.is_dir():
        raise IsADirectoryError(f"`fingerprint` hashes files by content, but {str(path)!r} is a directory.")
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _array_digest(dtype_name: str, shape: tuple[int, ...], data: np.ndarray) -> str:
    # The header makes equal bytes of a different dtype or shape hash differently.
    hasher = hashlib.sha256(f"array;{dtype_name};{','.join(map(str, shape))};".encode())
    hasher.update(data.data)
    return hasher.hexdigest()


def fingerprint(obj: torch.Tensor | np.ndarray | bytes | bytearray | memoryview | os.PathLike | Sequence) -> str:
    """Return the SHA-256 hex digest of an object's content.

    - A tensor or array: its dtype, shape and element bytes (on the CPU, in C order). A tensor and a NumPy array
      with the same dtype, shape and values get the same fingerprint.
    - Bytes: the plain SHA-256 of the bytes.
    - One path (`os.PathLike`): the plain SHA-256 of the file's bytes, the same value `sha256sum` prints, so it
      serves as a weights checksum.
    - A sequence of paths (`str` or `os.PathLike`): the files' contents in order, never their names, so renaming
      or moving files keeps the fingerprint and changing one byte changes it.

    Args:
        obj: The object to fingerprint.

    Returns:
        64 lower-case hexadecimal characters.

    Raises:
        TypeError: If `obj` is a bare `str` (ambiguous between text and a path), an object array, or of another type.
        FileNotFoundError: If a path does not exist.
        IsADirectoryError: If a path is a directory.

    Example:
        >>> import hashlib
        >>> fingerprint(b"abc") == hashlib.sha256(b"abc").hexdigest()
        True
        >>> fingerprint(torch.arange(3, dtype=torch.float32)) == fingerprint(np.arange(3, dtype=np.float32))
        True
        >>> fingerprint(torch.zeros(2, 3))[:12]
        '908db2984d14'
    """
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().to("cpu").contiguous()
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        # Viewing as bytes covers dtypes NumPy lacks (bfloat16); a 0-d tensor is reshaped first so it can be viewed.
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        return _array_digest(dtype_name, tuple(tensor.shape), raw)
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(
                "`fingerprint` hashes arrays by their bytes, so it needs a numeric array, got an array of dtype object;"
                " convert it to a numeric dtype first."
            )
        array = np.ascontiguousarray(obj)
        return _array_digest(array.dtype.name, tuple(array.shape), array.reshape(-1).view(np.uint8))
    if isinstance(obj, bytes | bytearray | memoryview):
        return hashlib.sha256(obj).hexdigest()
    if isinstance(obj, os.PathLike):
        return _file_digest(Path(obj))
    if isinstance(obj, str):
        raise TypeError(
            f"`fingerprint` got a bare string {obj[:60]!r}, which could be text or a path;"
            " pass `Path(...)` for a file, `[path, ...]` for files, or `text.encode()` for text."
        )
    if isinstance(obj, Sequence) and all(isinstance(item, str | os.PathLike) for item in obj):
        return combine_digests([_file_digest(Path(item)) for item in obj])  # type: ignore[arg-type]
    raise TypeError(
        f"`fingerprint` takes a tensor, a NumPy array, bytes, a path or a sequence of paths, got {type(obj).__name__}."
    )


def combine_digests(digests: Sequence[str]) -> str:
    """Combine per-file SHA-256 hex digests, in order, into the fingerprint of the sequence of files.

    `combine_digests([fingerprint(Path(p)) for p in paths]) == fingerprint(paths)`, so a caller that has already
    hashed the files (to key per-chunk caches, say) gets the whole set's fingerprint without reading them again.

    Example:
        >>> combine_digests([]) == fingerprint([])
        True
    """
    hasher = hashlib.sha256(f"files;{len(digests)};".encode())
    for digest in digests:
        hasher.update(digest.encode())
    return hasher.hexdigest()


class FeatureCache:
    """A folder of feature tensors stored under content keys.

    Each entry is one safetensors file `<key>.safetensors` holding one tensor. Writes are atomic; a file that
    cannot be read (truncated, corrupt, written by something else) is reported with a warning and treated as a
    miss, so the caller recomputes and overwrites it.

    Args:
        directory: The cache folder; created (with its parents) if missing.

    Raises:
        TypeError: If `directory` is not a path.
        ValueError: If `directory` is an existing file.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = FeatureCache(folder)
        ...     key = FeatureCache.key("pixels", fingerprint(b"image bytes"))
        ...     print(cache.get(key))
        ...     _ = cache.put(key, torch.ones(2, 3))
        ...     print(cache.get(key).sum().item(), key in cache)
        None
        6.0 True
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"`directory` must be a path, got {type(directory).__name__}.")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"`directory` must be a folder for the feature cache, got the file {str(self.directory)!r};"
                " pass a folder path."
            )
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    @staticmethod
    def key(*parts: str) -> str:
        """Combine strings (fingerprints, extractor names, settings) into one cache key.

        Parts are length-prefixed before hashing, so `("ab", "c")` and `("a", "bc")` give different keys.

        Args:
            *parts: The strings that together determine the cached value.

        Returns:
            A 64-character SHA-256 hex digest.

        Raises:
            TypeError: If a part is not a string.
            ValueError: If no part is given.
        """
        if not parts:
            raise ValueError("`FeatureCache.key` needs at least one part, got none.")
        hasher = hashlib.sha256(b"diadm-cache-key;")
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(
                    f"`FeatureCache.key` parts must be strings, got {type(part).__name__} ({part!r});"
                    " convert numbers and paths with `str()` or use `fingerprint()`."
                )
            encoded = part.encode()
            hasher.update(f"{len(encoded)}:".encode())
            hasher.update(encoded)
        return hasher.hexdigest()

    def path(self, key: str) -> Path:
        """Return the file that holds (or would hold) the entry `key`.

        Raises:
            ValueError: If `key` is not a safe file name (letters, digits, `.`, `_`, `-`; at most 200 characters).
        """
        if not isinstance(key, str) or _KEY_PATTERN.fullmatch(key) is None:
            raise ValueError(
                "`key` must be 1-200 letters, digits, `.`, `_` or `-` starting with a letter or digit,"
                f" got {key!r}; build keys with `FeatureCache.key(...)`."
            )
        return self.directory / f"{key}{_SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """Load the entry `key`, or return None when it is missing or unreadable (with a warning for the latter).

        Raises:
            ValueError: If `key` is not a safe file name.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            features = tensors[_TENSOR_NAME]
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
            warnings.warn(
                f"Ignoring the unreadable feature cache file {str(path)!r} ({type(err).__name__}: {err});"
                " its features will be recomputed and the file overwritten.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        log.debug("feature cache hit %s %s", key, tuple(features.shape))
        return features

    def put(self, key: str, features: torch.Tensor) -> Path:
        """Store `features` under `key` atomically and return the file written.

        Raises:
            TypeError: If `features` is not a tensor.
            ValueError: If `key` is not a safe file name.
        """
        path = self.path(key)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"`features` must be a torch.Tensor, got {type(features).__name__}.")
        tensor = features.detach().to("cpu").contiguous().clone()
        handle, temporary = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=self.directory)
        os.close(handle)
        try:
            save_file({_TENSOR_NAME: tensor}, temporary, metadata={"diadm_cache_version": _FORMAT_VERSION})
            os.replace(temporary, path)
        except BaseException:
            # Includes KeyboardInterrupt: never leave half-written temporary files behind.
            Path(temporary).unlink(missing_ok=True)
            raise
        log.debug("feature cache write %s %s", key, tuple(tensor.shape))
        return path


def cached(cache: FeatureCache | None, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Return the cached tensor for `key`, or compute, store and return it.

    Args:
        cache: The cache, or None to always compute (nothing is stored).
        key: The cache key, usually from `FeatureCache.key`.
        compute: Called without arguments on a miss; must return a tensor.

    Returns:
        The cached or freshly computed tensor (on the CPU when it came from the cache).

    Raises:
        TypeError: If `cache` is neither a `FeatureCache` nor None, or `compute` returns something else than a tensor.

    Example:
        >>> import tempfile
        >>> calls = []
        >>> def compute():
        ...     calls.append(1)
        ...     return torch.full((2,), 3.0)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = FeatureCache(folder)
        ...     first = cached(cache, "k", compute)
        ...     second = cached(cache, "k", compute)
        >>> print(second.tolist(), len(calls))
        [3.0, 3.0] 1
    """
    if cache is None:
        value = compute()
    elif isinstance(cache, FeatureCache):
        hit = cache.get(key)
        if hit is not None:
            return hit
        value = compute()
    else:
        raise TypeError(f"`cache` must be a FeatureCache or None, got {type(cache).__name__}.")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`compute` must return a torch.Tensor, got {type(value).__name__}.")
    if cache is not None:
        cache.put(key, value)
    return value
