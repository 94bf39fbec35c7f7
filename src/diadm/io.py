# SPDX-License-Identifier: Apache-2.0
"""Read image sets and feature sets from disk and turn them into feature matrices.

An input is one of:

- a folder, searched recursively for PNG, JPEG and WebP files (sorted by their path relative to the folder);
- a CSV file listing image files (a column named `path`, `file`, `filename` or `image`, else the first column;
  relative paths are relative to the CSV file's folder);
- a single image file;
- a `.npy`, `.npz` or `.pt`/`.pth` file holding either images, shape (N, H, W), (N, H, W, C) or (N, C, H, W)
  with C in {1, 3, 4}, uint8 in [0, 255] or floating in [0, 1], or precomputed features of shape (N, D)
  (`features=True` says which). When both dimension 1 and the last one could be channels, 3 is preferred over
  1 over 4, and (N, C, H, W) wins a tie: (N, 4, 4, 3) is read as channels-last RGB, (N, 3, 5, 3) as
  channels-first.

Images are decoded in a `torch.utils.data.DataLoader` (with workers when asked), converted to RGB (grayscale is
repeated, 16-bit grayscale is scaled to 8 bits, an alpha channel is dropped), optionally resized, and fed to the
feature extractor in batches. Images of different sizes are never padded: files are ordered by size (read from their
headers) within each cache chunk, each batch is split by image size, and the extractor (which resizes as it needs)
runs once per size.

With a `FeatureCache`, features are stored in chunks of about `chunk_size` consecutive files, keyed by the SHA-256
of the files' bytes, the extractor's fingerprint and the resize setting. Chunk boundaries are chosen from file
contents (a chunk ends after a file whose digest is 0 modulo `chunk_size`), so adding or removing a file
invalidates only the chunk that holds it, and a chunk is written as soon as it is complete, so an interrupted
run (Ctrl-C) keeps every finished chunk and the next run extracts only the rest.

Limitations: an array file of images is read into memory whole (use a folder of image files for sets larger than
memory); an alpha channel is dropped, not composited onto a background; changing one file re-extracts its whole
chunk (about `chunk_size` files); the cache folder is never pruned (delete it to reclaim the space).
"""

import csv
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diadm.cache import FeatureCache, combine_digests, fingerprint

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth")
CSV_COLUMNS = ("path", "file", "filename", "image")
DEFAULT_CHUNK_SIZE = 1024
# Version of the chunk key layout: bump it when the way features are computed from files changes.
_CACHE_VERSION = "diadm-io-2"
# PIL modes of 16-bit grayscale images; PIL's own conversion to RGB clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Image arrays: how strongly a dimension of this size suggests channels (RGB over grayscale over RGBA).
_CHANNEL_RANK = {3: 3, 1: 2, 4: 1}
# A content-defined chunk never grows beyond this many times `chunk_size`.
_MAX_CHUNK_FACTOR = 4

SourceKind = Literal["image_files", "image_array", "features"]


class UnreadableFileError(OSError):
    """An input file could not be read or decoded; `path` names it.

    Example:
        >>> err = UnreadableFileError("a.png", "truncated")
        >>> print(err.path, isinstance(err, OSError))
        a.png True
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(
            f"cannot read {str(path)!r}: {reason}; fix or remove the file, or skip unreadable files with"
            " `skip_bad=True` (`--skip-bad` on the command line)."
        )
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class SkippedFile:
    """A file (or an entry of an array file) left out because it could not be read.

    Example:
        >>> SkippedFile("imgs/bad.png", "UnidentifiedImageError: cannot identify image file")
        SkippedFile(path='imgs/bad.png', reason='UnidentifiedImageError: cannot identify image file')
    """

    path: str
    reason: str


@dataclass
class FeatureSet:
    """Features of one input set, with what is needed to show its images again.

    Attributes:
        features: (N, D) features on the CPU, one row per readable image (or per row of a feature file).
        names: N labels: file paths, or `file.npy[i]` for entries of an array file.
        kind: What the input held: `"image_files"`, `"image_array"` or `"features"`.
        source: The input path as given.
        skipped: Files left out because they could not be read (only with `skip_bad`).
        num_cached: How many images had their features read from the cache instead of extracted.
        content_sha256: A fingerprint of the input's content (the file bytes in order), when it was computed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     np.save(f"{folder}/f.npy", np.ones((3, 2), np.float32))
        ...     feature_set = load_feature_set(f"{folder}/f.npy", features=True)
        >>> len(feature_set), feature_set.kind, feature_set.has_images
        (3, 'features', False)
    """

    features: Tensor
    names: list[str]
    kind: SourceKind
    source: str
    skipped: list[SkippedFile] = field(default_factory=list)
    num_cached: int = 0
    content_sha256: str | None = None
    _loader: Callable[[int], Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def has_images(self) -> bool:
        """Whether the images behind the features can be shown (false for feature files)."""
        return self._loader is not None

    def images(self, indices: Sequence[int] | Tensor, size: int = 64) -> Tensor:
        """Load some of the set's images as float32 RGB in [0, 1], resized to `size` x `size`, shape (k, 3, s, s).

        Raises:
            RuntimeError: If the set was read from a feature file, which holds no images.
        """
        if self._loader is None:
            raise RuntimeError(f"{self.source!r} holds precomputed features, so its images cannot be shown.")
        rows = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if not rows:
            return torch.zeros(0, 3, size, size)
        return torch.stack([_resize(self._loader(row), size).float() / 255.0 for row in rows])

    def subset(self, rows: Sequence[int] | Tensor, source: str | None = None) -> "FeatureSet":
        """The rows `rows` of this set, in that order, as a new set whose names and images follow the rows.

        The skipped files, the cache count and the content fingerprint describe the whole input, so they stay with
        this set: the new set has none of them.

        Args:
            rows: Row positions in this set, each in [0, len(self)).
            source: The new set's `source` label; defaults to this set's.

        Returns:
            A `FeatureSet` of `len(rows)` rows.

        Raises:
            IndexError: If a row is outside [0, len(self)).

        Example:
            >>> whole = FeatureSet(torch.arange(6.0).reshape(3, 2), ["a", "b", "c"], "features", "f.npy")
            >>> part = whole.subset([2, 0])
            >>> part.features.tolist(), part.names
            ([[4.0, 5.0], [0.0, 1.0]], ['c', 'a'])
        """
        picked = [int(i) for i in (rows.tolist() if isinstance(rows, Tensor) else rows)]
        outside = [i for i in picked if not 0 <= i < len(self)]
        if outside:
            raise IndexError(
                f"`rows` must lie in [0, {len(self)}) for the {len(self)} rows of {self.source!r}, got {outside[:5]}."
            )
        loader = self._loader
        return FeatureSet(
            self.features[picked],
            [self.names[i] for i in picked],
            self.kind,
            self.source if source is None else source,
            _loader=None if loader is None else (lambda row: loader(picked[row])),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Finding and decoding files
# ---------------------------------------------------------------------------------------------------------------------
def find_images(folder: str | os.PathLike) -> list[Path]:
    """List the PNG, JPEG and WebP files under `folder`, recursively, sorted by their relative path.

    Hidden files and folders (names starting with `.`) are left out. Suffixes are matched case-insensitively.

    Raises:
        ValueError: If `folder` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"`folder` must be a directory of images, got {str(root)!r}, which is not a directory.")
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found.extend(
            Path(directory, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def read_csv_list(path: str | os.PathLike) -> list[Path]:
    """Read the image files listed in a CSV file.

    The column named `path`, `file`, `filename` or `image` (case-insensitive) is used when the first row is such a
    header, otherwise the first column of every row. Relative paths are taken relative to the CSV file's folder.
    Empty rows are ignored.

    Raises:
        ValueError: If the CSV file lists no file.
    """
    csv_path = Path(path)
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    column = 0
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        named = [i for i, cell in enumerate(header) if cell in CSV_COLUMNS]
        if named:
            column = named[0]
            rows = rows[1:]
    files = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    if not files:
        raise ValueError(
            f"the CSV file {str(csv_path)!r} lists no files; put one image path per row (optionally under a"
            f" header named one of {', '.join(CSV_COLUMNS)})."
        )
    return [Path(name) if Path(name).is_absolute() else csv_path.parent / name for name in files]


def load_image(path: str | os.PathLike) -> Tensor:
    """Decode one image file as RGB uint8 of shape (3, H, W).

    Grayscale and palette images are converted to RGB, and an alpha channel is dropped (not composited). 16-bit
    grayscale (PNG) is scaled to 8 bits, `round(value / 257)`, then repeated; PIL's own conversion would clip every
    value above 255 to white.

    Raises:
        UnreadableFileError: If the file is missing, unreadable or not a decodable image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
                wide = np.asarray(image).astype(np.float64)
                gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
                array = np.repeat(gray[..., None], 3, axis=-1)
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableFileError(path, f"{type(err).__name__}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_nchw_rgb(array: Tensor, source: str) -> Tensor:
    """Bring an image array to (N, 3, H, W), keeping its dtype; see `load_array` for the accepted layouts."""
    if array.ndim == 3:
        array = array.unsqueeze(1)
    elif array.ndim == 4:
        # Channel counts in order of preference: (N, 4, 4, 3) is channels-last RGB, not 4x3 RGBA; on a tie
        # (N, 3, H, 3) the torch layout (N, C, H, W) wins.
        first, last = _CHANNEL_RANK.get(array.shape[1], 0), _CHANNEL_RANK.get(array.shape[-1], 0)
        if first and first >= last:
            pass
        elif last:
            array = array.permute(0, 3, 1, 2)
        else:
            raise ValueError(
                f"the image array in {source!r} must have 1, 3 or 4 channels in dimension 1 (N, C, H, W) or in the"
                f" last dimension (N, H, W, C), got shape {tuple(array.shape)}; if it holds features, pass"
                " `features=True` (`--features`)."
            )
    else:
        raise ValueError(
            f"the image array in {source!r} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got"
            f" {array.ndim}-D shape {tuple(array.shape)}; if it holds (N, D) features, pass `features=True`"
            " (`--features`)."
        )
    if array.shape[1] == 1:
        array = array.expand(-1, 3, -1, -1)
    elif array.shape[1] == 4:
        array = array[:, :3]
    if array.dtype == torch.uint8:
        return array
    if not array.is_floating_point():
        raise TypeError(
            f"the image array in {source!r} must be uint8 in [0, 255] or floating in [0, 1], got {array.dtype};"
            " convert it with `.astype(np.uint8)`."
        )
    return array


def load_array(path: str | os.PathLike) -> Tensor:
    """Load the array stored in a `.npy`, `.npz` or `.pt`/`.pth` file as a tensor (no layout change).

    An `.npz` file or a saved dict must hold a single array or one named `features` or `images`. `.pt` files are
    read with `torch.load(weights_only=True)`, so they cannot run code.

    Raises:
        UnreadableFileError: If the file cannot be read.
        ValueError: If the file holds several arrays and none is named `features` or `images`, or no array at all.
        TypeError: If a NumPy array is not numeric (strings, dates, ...).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            loaded: Any = np.load(file, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                loaded = {name: archive[name] for name in archive.files}
        elif suffix in (".pt", ".pth"):
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"the array file {str(file)!r} must end in one of {', '.join(ARRAY_SUFFIXES)}.")
    except (OSError, EOFError, RuntimeError, ValueError, KeyError) as err:
        if isinstance(err, ValueError) and "must end in" in str(err):
            raise
        raise UnreadableFileError(file, f"{type(err).__name__}: {err}") from err
    if isinstance(loaded, dict):
        arrays = {name: value for name, value in loaded.items() if isinstance(value, np.ndarray | Tensor)}
        if len(arrays) == 1:
            loaded = next(iter(arrays.values()))
        elif "features" in arrays or "images" in arrays:
            loaded = arrays.get("features", arrays.get("images"))
        else:
            raise ValueError(
                f"{str(file)!r} holds the arrays {sorted(arrays) or 'none'}; store a single array, or name the one to"
                " use `features` or `images`."
            )
    if isinstance(loaded, np.ndarray):
        if loaded.dtype.kind not in "biuf":
            raise TypeError(
                f"the array in {str(file)!r} must be numeric, got numpy dtype {loaded.dtype}; store uint8 images or"
                " floating-point features."
            )
        return torch.from_numpy(np.ascontiguousarray(loaded))
    if isinstance(loaded, Tensor):
        return loaded
    raise ValueError(
        f"{str(file)!r} must hold an array or tensor, got {type(loaded).__name__}; save the array itself, e.g."
        " `np.save(path, array)` or `torch.save(tensor, path)`."
    )


def load_feature_file(path: str | os.PathLike) -> Tensor:
    """Load precomputed (N, D) features from a `.npy`, `.npz` or `.pt` file.

    float16, bfloat16 and float32 features keep their dtype (a float16 file of 1.28 million 2048-d features stays
    5 GiB in memory instead of 10); float64 is rounded to float32.

    Raises:
        UnreadableFileError: If the file cannot be read.
        ValueError: If the array is not 2-D, is empty or holds NaN or infinity.
        TypeError: If the array is not floating point (integer arrays are usually images: drop `--features`).
    """
    features = load_array(path)
    if not features.is_floating_point():
        raise TypeError(
            f"the features in {str(path)!r} must be floating point, got {features.dtype} of shape"
            f" {tuple(features.shape)}; an integer array usually holds images, so leave out `features=True`"
            " (`--features`)."
        )
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(
            f"the features in {str(path)!r} must have shape (N, D) with N, D >= 1, got shape {tuple(features.shape)};"
            " if the file holds images, leave out `features=True` (`--features`)."
        )
    if features.dtype == torch.float64:
        features = features.to(torch.float32)
    if not torch.isfinite(features).all():
        raise ValueError(f"the features in {str(path)!r} hold NaN or infinite values; recompute them.")
    return features


def _resize(image: Tensor, size: int) -> Tensor:
    """Resize one (3, H, W) image to `size` x `size`, bilinear with antialiasing, keeping uint8 as uint8."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(image.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True)[0]
    if image.dtype == torch.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8)
    return resized.clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The dataset and the extraction loop
# ---------------------------------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    """Images decoded from files or taken from an (N, 3, H, W) array, as `(index, image, error)` triples.

    `image` is RGB of shape (3, H, W), uint8 (or floating in [0, 1] for a floating array), resized to
    `image_size` x `image_size` when given, then passed through `transform` when given. A file that cannot be read
    gives `(index, None, reason)` instead of raising inside a worker process, so the caller decides whether to stop
    with an error naming the file or to skip it.

    Args:
        items: Image file paths, or an image tensor (N, 3, H, W).
        image_size: Resize every image to this square size (bilinear, antialiased) before `transform`.
        transform: A callable applied to each (3, H, W) image, e.g. one an extractor supplies.

    Raises:
        TypeError: If `image_size` is neither an int nor None.
        ValueError: If `image_size` is not positive.

    Example:
        >>> dataset = ImageFileDataset(torch.zeros(2, 3, 5, 7, dtype=torch.uint8), image_size=4)
        >>> index, image, error = dataset[1]
        >>> print(index, tuple(image.shape), image.dtype, error)
        1 (3, 4, 4) torch.uint8 None
    """

    def __init__(
        self,
        items: Sequence[str | os.PathLike] | Tensor,
        *,
        image_size: int | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
            raise TypeError(f"`image_size` must be an int or None, got {type(image_size).__name__}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer, got {image_size}.")
        self.items = items
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        if isinstance(self.items, Tensor):
            image = self.items[index]
        else:
            try:
                image = load_image(self.items[index])
            except UnreadableFileError as err:
                return index, None, err.reason
        if self.image_size is not None:
            image = _resize(image, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return index, image, None


def _collate(batch: list[tuple[int, Tensor | None, str | None]]) -> list[tuple[int, Tensor | None, str | None]]:
    # Images may differ in size, so they stay a list; `_extract_batch` groups them by size.
    return batch


def _extract_batch(extractor: Callable[[Tensor], Tensor], images: list[Tensor], device: torch.device) -> Tensor:
    """Run the extractor once per distinct image size in `images` and return the features in input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    results: list[Tensor | None] = [None] * len(images)
    widths: dict[int, tuple[int, ...]] = {}
    for shape, positions in groups.items():
        batch = torch.stack([images[p] for p in positions]).to(device)
        features = extractor(batch)
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] != len(positions):
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"the feature extractor must return (N, D) features for N = {len(positions)} images, got {got}."
            )
        widths.setdefault(int(features.shape[1]), shape)
        for row, position in enumerate(positions):
            results[position] = features[row]
    if len(widths) > 1:
        described = ", ".join(f"{width} for images of shape {shape}" for width, shape in widths.items())
        raise ValueError(
            f"images of different sizes gave features of different widths ({described}); resize all images to one"
            " size with `image_size=` (`--image-size` on the command line) or use an extractor that resizes."
        )
    return torch.stack([r for r in results if r is not None]).to("cpu", torch.float32)


def _content_chunks(digests: Sequence[str | None], chunk_size: int) -> list[list[int]]:
    """Split positions into chunks whose boundaries depend on file contents only (see the module docstring)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for position, digest in enumerate(digests):
        if digest is None:
            continue
        current.append(position)
        if int(digest[:12], 16) % chunk_size == 0 or len(current) >= _MAX_CHUNK_FACTOR * chunk_size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _image_sizes(files: Sequence[Path], num_threads: int) -> dict[Path, tuple[int, int]]:
    """(width, height) of every image from its header only; (0, 0) for a file that cannot be opened."""

    def size(path: Path) -> tuple[int, int]:
        try:
            with Image.open(path) as image:
                return image.size
        except (OSError, ValueError, SyntaxError):
            return (0, 0)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return dict(zip(files, pool.map(size, files), strict=True))


class Extraction(NamedTuple):
    """What `extract_features` returns; see there.

    Example:
        >>> done = extract_features(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), lambda x: x.float().flatten(1),
        ...                         progress=False)
        >>> tuple(done.features.shape), done.kept, done.skipped, done.num_cached
        ((2, 12), [0, 1], [], 0)
    """

    features: Tensor
    kept: list[int]
    skipped: list[SkippedFile]
    num_cached: int
    content_sha256: str | None


def _progress(total: int, desc: str, progress: bool) -> tqdm:
    # Without an explicit `disable`, tqdm honours TQDM_DISABLE from the environment.
    kwargs: dict[str, Any] = {} if progress else {"disable": True}
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, **kwargs)


def _hash_files(files: Sequence[Path], num_threads: int, skip_bad: bool, progress: bool, desc: str) -> list[str | None]:
    """SHA-256 of every file, in parallel threads (hashlib releases the GIL); None for unreadable files."""

    def digest(path: Path) -> str | None:
        try:
            return fingerprint(path)
        except OSError as err:
            if skip_bad:
                return None
            raise UnreadableFileError(path, f"{type(err).__name__}: {err}") from err

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool, _progress(len(files), desc, progress) as bar:
        digests = []
        for value in pool.map(digest, files):
            digests.append(value)
            bar.update(1)
    return digests


def extract_features(
    items: Sequence[str | os.PathLike] | Tensor,
    extractor: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    cache: FeatureCache | None = None,
    extractor_id: str | None = None,
    image_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    skip_bad: bool = False,
    progress: bool = True,
    desc: str = "features",
    content_id: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> "Extraction":
    """Extract features of image files or of an image tensor, in batches, caching finished chunks.

    Args:
        items: Image file paths, or images (N, 3, H, W) uint8 in [0, 255] or floating in [0, 1].
        extractor: Maps a batch (n, 3, H, W) on `device` to (n, D) features, e.g. `get_feature_extractor("pixels")`.
        batch_size: Images per extractor call.
        num_workers: DataLoader worker processes decoding files (0 decodes in this process).
        device: Where batches are sent before the extractor runs.
        cache: Where finished chunks of features are stored and looked up; None disables caching.
        extractor_id: A string that changes whenever the extractor's features change (its fingerprint); required
            with `cache`.
        image_size: Resize every image to this square size before extraction.
        chunk_size: Typical number of files per cached chunk.
        skip_bad: Skip unreadable files (returned in the skipped list) instead of raising.
        progress: Show progress bars on stderr.
        desc: The label of the progress bar.
        content_id: For a tensor `items`, a fingerprint of the array it came from (computed when None).
        dtype: The floating dtype the features are stored in, in the cache and in the result; `torch.float16`
            halves their memory and disk size (relative rounding error below 5e-4).

    Returns:
        An `Extraction`: features (n_kept, D) of `dtype` on the CPU, the positions in `items` of their rows, the
        files that were skipped, how many images came from the cache, and (when the files were hashed, that is
        with a cache) the fingerprint of their contents, equal to `fingerprint(items)`.

    Raises:
        UnreadableFileError: If a file cannot be read and `skip_bad` is false.
        ValueError: If `cache` is given without `extractor_id`, a size or count is not positive, images of different
            sizes give different feature widths, the extractor returns NaN or infinity, or every file was unreadable.
        TypeError: If `dtype` is not a floating torch dtype.
    """
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be a floating torch dtype, got {dtype!r}.")
    if cache is not None and extractor_id is None:
        raise ValueError("`extractor_id` is required with `cache`; pass `extractor_fingerprint(extractor)`.")
    device = torch.device(device)
    is_array = isinstance(items, Tensor)
    files = [] if is_array else [Path(item) for item in items]  # type: ignore[union-attr]
    count = len(items)
    skipped: dict[int, str] = {}

    # 1. Chunk keys. With a cache, file contents decide the chunks; without one, fixed-size chunks suffice.
    keys: list[str | None]
    content_sha256: str | None = content_id
    if cache is None:
        chunks = [list(range(start, min(start + chunk_size, count))) for start in range(0, count, chunk_size)]
        keys = [None] * len(chunks)
    elif is_array:
        array_id = content_id or fingerprint(items)  # type: ignore[arg-type]
        chunks = [list(range(start, min(start + chunk_size, count))) for start in range(0, count, chunk_size)]
        keys = [
            FeatureCache.key(
                _CACHE_VERSION, "array", array_id, f"{c[0]}:{c[-1] + 1}", str(extractor_id), str(image_size), str(dtype)
            )
            for c in chunks
        ]
    else:
        digests = _hash_files(files, num_workers or 1, skip_bad, progress, f"{desc} (hashing)")
        if all(digests):
            # The same value as `fingerprint(files)`, without reading the files twice.
            content_sha256 = combine_digests(digests)  # type: ignore[arg-type]
        skipped.update({i: "the file could not be read" for i, d in enumerate(digests) if d is None})
        chunks = _content_chunks(digests, chunk_size)
        keys = [
            FeatureCache.key(
                _CACHE_VERSION,
                "files",
                *(digests[i] or "" for i in chunk),
                str(extractor_id),
                str(image_size),
                str(dtype),
            )
            for chunk in chunks
        ]

    # 2. Cached chunks. A NaN row marks a file that was unreadable when the chunk was made.
    results: dict[int, Tensor] = {}
    todo: list[int] = []
    num_cached = 0
    for number, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
        hit = cache.get(key) if cache is not None and key is not None else None
        if hit is not None and hit.ndim == 2 and hit.shape[0] == len(chunk):
            results[number] = hit
            num_cached += len(chunk)
        else:
            todo.append(number)
    if num_cached:
        log.info("%s: %d of %d images read from the feature cache", desc, num_cached, count)

    # 3. Extract the missing chunks; each batch lies inside one chunk, and a chunk is stored once complete.
    batches: list[list[int]] = []
    batch_chunk: list[int] = []
    # Files of mixed sizes are ordered by size within their chunk, so that a batch splits into few same-size groups.
    sort_by_size = not is_array and image_size is None
    sizes = _image_sizes([files[i] for n in todo for i in chunks[n]], num_workers or 1) if sort_by_size else {}
    for number in todo:
        order = sorted(chunks[number], key=lambda i: sizes[files[i]]) if sort_by_size else chunks[number]
        for start in range(0, len(order), batch_size):
            batches.append(order[start : start + batch_size])
            batch_chunk.append(number)
    if batches:
        transform = getattr(extractor, "transform", None)
        dataset = ImageFileDataset(
            items if is_array else files,
            image_size=image_size,
            transform=transform if callable(transform) else None,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        pending: dict[int, dict[int, Tensor | None]] = {}
        width: int | None = None
        with _progress(sum(len(chunks[n]) for n in todo), desc, progress) as bar:
            for number, batch in zip(batch_chunk, loader, strict=True):
                good = [(index, image) for index, image, _ in batch if image is not None]
                for index, _, reason in batch:
                    if reason is not None and not skip_bad:
                        raise UnreadableFileError(files[index], reason)
                    if reason is not None:
                        skipped[index] = reason
                rows = pending.setdefault(number, {})
                if good:
                    features = _extract_batch(extractor, [image for _, image in good], device)
                    finite = torch.isfinite(features).all(dim=1)
                    if not bool(finite.all()):
                        first = good[int((~finite).nonzero()[0])][0]
                        raise ValueError(
                            f"the feature extractor returned NaN or infinite features for"
                            f" {str(files[first]) if files else f'image {first}'}; check the extractor and its weights."
                        )
                    if width is not None and features.shape[1] != width:
                        raise ValueError(
                            f"the extractor returned {features.shape[1]} features per image for some images and"
                            f" {width} for others; resize all images to one size with `image_size=` (`--image-size`)."
                        )
                    width = int(features.shape[1])
                    rows.update({index: features[row] for row, (index, _) in enumerate(good)})
                rows.update({index: None for index, image, _ in batch if image is None})
                bar.update(len(batch))
                if len(rows) == len(chunks[number]):
                    results[number] = _assemble(chunks[number], pending.pop(number), width).to(dtype)
                    if cache is not None and keys[number] is not None:
                        cache.put(keys[number], results[number])  # type: ignore[arg-type]

    # 4. Put the chunks together in input order, dropping unreadable files.
    kept: list[int] = []
    blocks: list[Tensor] = []
    for number, chunk in enumerate(chunks):
        block = results[number]
        bad = torch.isnan(block).any(dim=1) if block.numel() else torch.ones(len(chunk), dtype=torch.bool)
        for row in bad.nonzero().flatten().tolist():
            index = chunk[row]
            skipped.setdefault(index, "the file could not be decoded as an image")
            if not skip_bad:
                raise UnreadableFileError(files[index] if files else f"row {index}", skipped[index])
        kept.extend(torch.tensor(chunk)[~bad].tolist())
        blocks.append(block[~bad])
    blocks = [block for block in blocks if len(block)]
    if not blocks:
        raise ValueError(f"none of the {count} input images could be read; see the skipped files for the reasons.")
    widths = {int(block.shape[1]) for block in blocks}
    if len(widths) > 1:
        raise ValueError(
            f"cached and new features have different widths ({sorted(widths)}); clear the feature cache folder."
        )
    names = [str(files[i]) if files else f"[{i}]" for i in sorted(skipped)]
    skipped_list = [SkippedFile(name, skipped[i]) for name, i in zip(names, sorted(skipped), strict=True)]
    return Extraction(torch.cat(blocks), kept, skipped_list, num_cached, content_sha256)


def _assemble(chunk: list[int], rows: dict[int, Tensor | None], width: int | None) -> Tensor:
    """Stack a chunk's rows in order; unreadable files become NaN rows (a whole-NaN chunk has width 1)."""
    filler = torch.full((width or 1,), float("nan"))
    return torch.stack([rows[index] if rows[index] is not None else filler for index in chunk])  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# One input set, end to end
# ---------------------------------------------------------------------------------------------------------------------
def list_inputs(path: str | os.PathLike) -> list[Path]:
    """Resolve a folder, a CSV list or a single image file to the image files it names.

    Raises:
        ValueError: If `path` does not exist, has an unsupported suffix, or names no image.
    """
    source = Path(path)
    if source.is_dir():
        files = find_images(source)
        if not files:
            raise ValueError(
                f"the folder {str(source)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}, searched recursively);"
                " check the path."
            )
        return files
    if not source.exists():
        raise ValueError(f"the input {str(source)!r} does not exist; pass a folder, a CSV list, or an array file.")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return read_csv_list(source)
    if suffix in IMAGE_SUFFIXES:
        return [source]
    raise ValueError(
        f"the input {str(source)!r} must be a folder, a .csv list, an image ({', '.join(IMAGE_SUFFIXES)}) or an array"
        f" file ({', '.join(ARRAY_SUFFIXES)}), got suffix {suffix!r}."
    )


def load_feature_set(
    path: str | os.PathLike,
    extractor: Callable[[Tensor], Tensor] | None = None,
    *,
    features: bool = False,
    extractor_id: str | None = None,
    cache: FeatureCache | None = None,
    **kwargs: Any,
) -> FeatureSet:
    """Read one input (folder, CSV list, image, or array file) and return its features.

    Args:
        path: The input; see the module docstring for the accepted kinds.
        extractor: The feature extractor; not needed when `features` is true.
        features: The array file holds precomputed (N, D) features, not images.
        extractor_id: The extractor's fingerprint, part of every cache key.
        cache: The feature cache, or None.
        **kwargs: Passed to `extract_features` (batch_size, num_workers, device, image_size, chunk_size, skip_bad,
            progress, desc).

    Returns:
        The set's features and labels.

    Raises:
        ValueError: If `path` is missing or unsupported, names no image, `features` is given for image files, or
            an extractor is missing.
        TypeError: If an array file of images is neither uint8 nor floating point.
        UnreadableFileError: If a file cannot be read (and `skip_bad` is false).
    """
    source = Path(path)
    suffix = source.suffix.lower()
    if source.is_file() and suffix in ARRAY_SUFFIXES:
        array = load_array(source) if not features else load_feature_file(source)
        if features:
            return FeatureSet(array, [f"{source}[{i}]" for i in range(len(array))], "features", str(path))
        images = _to_nchw_rgb(array, str(source))
        if images.shape[0] == 0:
            raise ValueError(f"the image array in {str(source)!r} holds no images (shape {tuple(array.shape)}).")
        if images.is_floating_point():
            low, high = float(images.min()), float(images.max())
            if not (low >= 0.0 and high <= 1.0):
                raise ValueError(
                    f"floating images in {str(source)!r} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}];"
                    " divide by 255 or store them as uint8."
                )
        if extractor is None:
            raise ValueError(f"{str(source)!r} holds images, so a feature extractor is needed.")
        content = fingerprint(source)
        done = extract_features(images, extractor, cache=cache, extractor_id=extractor_id, content_id=content, **kwargs)
        return FeatureSet(
            done.features,
            [f"{source}[{i}]" for i in done.kept],
            "image_array",
            str(path),
            done.skipped,
            done.num_cached,
            content,
            _loader=lambda row: _as_uint8(images[done.kept[row]]),
        )
    if features:
        raise ValueError(
            f"`features=True` (`--features`) needs a {', '.join(ARRAY_SUFFIXES)} file of (N, D) features, got"
            f" {str(source)!r}; leave it out to extract features from images."
        )
    files = list_inputs(source)
    if extractor is None:
        raise ValueError(f"{str(source)!r} holds images, so a feature extractor is needed.")
    done = extract_features(files, extractor, cache=cache, extractor_id=extractor_id, **kwargs)
    kept_files = [files[i] for i in done.kept]
    return FeatureSet(
        done.features,
        [str(file) for file in kept_files],
        "image_files",
        str(path),
        done.skipped,
        done.num_cached,
        done.content_sha256,
        _loader=lambda row: load_image(kept_files[row]),
    )


def _as_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.float() * 255).round().clamp(0, 255).to(torch.uint8)
