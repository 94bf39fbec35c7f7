# SPDX-License-Identifier: Apache-2.0
"""Find, check and load published weights files without ever downloading in secret.

A weights file is looked up in this order:

1. the path passed as `weights=` (it must exist);
2. the torch hub cache, `torch.hub.get_dir()/checkpoints/<file name>` (where `torch.hub.load_state_dict_from_url`
   and torchmetrics put the same files), under each known file name;
3. a download of the published URL into that cache with `torch.hub.download_url_to_file`, only when downloading is
   allowed: `download=True`, or `download=None` (the default) while neither `HF_HUB_OFFLINE` nor `DIADM_OFFLINE` is
   set to a true value ("1", "true", "yes", "on"). The test suite sets `HF_HUB_OFFLINE=1`.

The file is then checked against its SHA-256. Where the full digest is not published, the torch hub convention
applies: the hex digits after the last "-" of the published file name are the start of the file's SHA-256, and that
prefix is what is checked. SSL settings are never touched; a download that fails (no network, proxy, certificate)
raises the same "not found" error, with the URL, so the user can fetch the file by other means.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "DIADM_OFFLINE")
_TRUE_VALUES = ("1", "true", "yes", "on")
# torch.hub's convention: "name-<hex prefix of the SHA-256>.ext".
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
# Digests of files already checked, keyed by (resolved path, size, modification time), so that building an
# extractor twice does not read 100 MB twice.
_DIGESTS: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightsFile:
    """Where a published weights file comes from and how to recognise it.

    Attributes:
        extractor: The registry name of the extractor that uses the file (for messages).
        url: The published download URL.
        filenames: The names the file has in the torch hub cache; the first is the one a download writes. Other
            names are the same file as other libraries name it.
        sha256: The full SHA-256 when it is known, else None.
        sha256_prefix: The SHA-256 prefix encoded in the file name (torch hub convention), else None.
    """

    extractor: str
    url: str
    filenames: tuple[str, ...]
    sha256: str | None = None
    sha256_prefix: str | None = None


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE_VALUES for var in _OFFLINE_VARIABLES)


def cache_dir() -> Path:
    """The folder where torch hub keeps downloaded checkpoints, `torch.hub.get_dir()/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, remembered per (path, size, modification time).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp) / "abc.bin"
        ...     _ = path.write_bytes(b"abc")
        ...     file_sha256(path)[:16]
        'ba7816bf8f01cfea'
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        _DIGESTS[key] = digest
    return digest


def check_sha256(path: Path, spec: WeightsFile, expected: str | None = None) -> str:
    """Check a weights file against the expected digest (full or prefix) and return its full SHA-256.

    A file with no known digest (neither `expected` nor a published one) is accepted; its digest is still returned,
    so that `extractor_fingerprint` can record exactly which file was used.

    Args:
        path: The file to check.
        spec: The published file it should be.
        expected: A SHA-256 (or its start) given by the user; it replaces the published one, for a checkpoint of
            the same architecture made elsewhere (converted or fine-tuned).

    Returns:
        The SHA-256 hex digest of the file.

    Raises:
        ValueError: If the digest does not match.
    """
    digest = file_sha256(path)
    checks: list[tuple[str, str]] = []
    if expected:
        checks.append((expected.lower(), "SHA-256 given as `sha256=`"))
    elif spec.sha256:
        checks.append((spec.sha256.lower(), "published SHA-256"))
    elif spec.sha256_prefix:
        checks.append((spec.sha256_prefix.lower(), "SHA-256 prefix of the published file name"))
    if not checks:
        log.info("`%s` weights %s have no published digest; their SHA-256 is %s", spec.extractor, path, digest)
    for want, what in checks:
        if not digest.startswith(want):
            raise ValueError(
                f"`{spec.extractor}` weights file {str(path)!r} must have the {what} {want}, got SHA-256 {digest};"
                f" it is truncated or another file. Delete it and download {spec.url} again, or pass the right file"
                " as `weights=`."
            )
    return digest


def _missing_message(spec: WeightsFile, reason: str, *, offer_download: bool = True) -> str:
    # A failed download must not suggest allowing the download; it was allowed.
    remedy = ", or allow the download with `download=True`" if offer_download else ""
    return (
        f"`{spec.extractor}` weights not found: no file {' or '.join(spec.filenames)} in the torch hub cache"
        f" {str(cache_dir())!r}, and {reason}. Download {spec.url} and pass its path as `weights=` (`--weights` on"
        f" the command line), or put it in that folder{remedy}."
    )


def resolve_weights(
    spec: WeightsFile,
    weights: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
    sha256: str | None = None,
) -> tuple[Path, str]:
    """Find a weights file (explicit path, then torch hub cache, then download if allowed) and check its digest.

    Args:
        spec: The published file.
        weights: A local path to the file, or None to look in the cache.
        download: True to allow a download, False to forbid it, None to allow it unless `HF_HUB_OFFLINE` or
            `DIADM_OFFLINE` is set.
        sha256: A SHA-256 (or its start) the file must have instead of the published one, for a checkpoint of the
            same architecture made elsewhere.

    Returns:
        The path of the checked file and its SHA-256.

    Raises:
        FileNotFoundError: If `weights` does not exist, or no file is cached and downloading is off or fails.
        ValueError: If the file's SHA-256 does not match.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"`weights` must be the path of the `{spec.extractor}` weights file ({spec.filenames[0]}), got"
                f" {str(weights)!r}, which does not exist. The file is published at {spec.url}."
            )
        return path, check_sha256(path, spec, sha256)
    for filename in spec.filenames:
        candidate = cache_dir() / filename
        if candidate.is_file():
            return candidate, check_sha256(candidate, spec, sha256)
    allowed = (not _offline()) if download is None else bool(download)
    if not allowed:
        reason = "downloading is off (`download=False`)" if download is False else "downloading is off (offline mode)"
        raise FileNotFoundError(_missing_message(spec, reason))
    target = cache_dir() / spec.filenames[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", spec.url, target)
    try:
        # download_url_to_file writes to a temporary file and renames it, and checks the hash prefix itself.
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256_prefix, progress=False)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(_missing_message(spec, f"the download failed ({err})", offer_download=False)) from err
    return target, check_sha256(target, spec, sha256)


def hash_prefix_from_name(filename: str) -> str | None:
    """The SHA-256 prefix a torch hub file name carries, e.g. "6726825d" for "pt_inception-2015-12-05-6726825d.pth".

    Example:
        >>> hash_prefix_from_name("pt_inception-2015-12-05-6726825d.pth")
        '6726825d'
        >>> print(hash_prefix_from_name("swav_800ep_pretrain.pth.tar"))
        None
    """
    matches = _HASH_IN_NAME.findall(filename)
    return matches[-1] if matches else None


def load_state_dict(path: Path, extractor: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint of tensors on the CPU (`weights_only=True`), unwrapping a top-level "state_dict" entry.

    Raises:
        ValueError: If the file is not a checkpoint of tensors.
    """
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"`{extractor}` weights file {str(path)!r} must be a PyTorch checkpoint of tensors, but it could not be"
            f" loaded: {err}"
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"`{extractor}` weights file {str(path)!r} must hold a state dict, got {type(state).__name__}."
        )
    return dict(state)
