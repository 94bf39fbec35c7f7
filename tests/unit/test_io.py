# SPDX-License-Identifier: Apache-2.0
"""Tests of reading image and feature sets from disk, with content-keyed feature caching."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diadm.cache import FeatureCache, fingerprint
from diadm.io import (
    FeatureSet,
    ImageFileDataset,
    UnreadableFileError,
    extract_features,
    find_images,
    list_inputs,
    load_array,
    load_feature_file,
    load_feature_set,
    load_image,
    read_csv_list,
)


class CountingPixels:
    """Independent reference extractor: flattened pixels in [0, 1]; counts the images it sees."""

    def __init__(self) -> None:
        self.seen = 0
        self.calls = 0

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        self.seen += imgs.shape[0]
        self.calls += 1
        return imgs.float().flatten(1) / 255.0


class MeanColor(CountingPixels):
    """Mean colour per channel: a width that does not depend on the image size."""

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        self.seen += imgs.shape[0]
        self.calls += 1
        return imgs.float().mean(dim=(2, 3)) / 255.0


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _rgb(rng: np.random.Generator, size: int = 4) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, list[np.ndarray]]:
    arrays = [_rgb(rng) for _ in range(5)]
    root = tmp_path / "train"
    _write(root / "b.png", arrays[1])
    _write(root / "a.png", arrays[0])
    _write(root / "sub" / "c.png", arrays[2])
    Image.fromarray(arrays[3]).save(root / "sub" / "d.webp", lossless=True)
    _write(root / "z.png", arrays[4])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root, arrays


def test_find_images_recursive_sorted(folder: tuple[Path, list[np.ndarray]]) -> None:
    root, _ = folder
    names = [p.relative_to(root).as_posix() for p in find_images(root)]
    assert names == ["a.png", "b.png", "sub/c.png", "sub/d.webp", "z.png"]
    with pytest.raises(ValueError, match=re.escape(f"got {str(root / 'a.png')!r}, which is not a directory.")):
        find_images(root / "a.png")


def test_load_image_converts_modes(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    rgba = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    _write(tmp_path / "g.png", gray)
    _write(tmp_path / "r.png", rgba)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "j.jpg", quality=95)
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 3, 5)
    assert g.dtype == torch.uint8
    for channel in range(3):
        np.testing.assert_array_equal(g[channel].numpy(), gray)
    r = load_image(tmp_path / "r.png")
    np.testing.assert_array_equal(r.permute(1, 2, 0).numpy(), rgba[..., :3])
    assert load_image(tmp_path / "j.jpg").shape == (3, 3, 5)
    # 16-bit grayscale is scaled to 8 bits (PIL's own conversion clips at 255); reference: numpy, round(v / 257).
    deep = rng.integers(0, 65536, (3, 5), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode in ("I;16", "I")
    expected = np.round(deep / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "d16.png").numpy(), np.stack([expected] * 3))


def test_load_image_corrupt_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UnreadableFileError, match=re.escape(f"cannot read {str(bad)!r}: UnidentifiedImageError")):
        load_image(bad)


def test_extract_features_matches_reference_and_order(folder: tuple[Path, list[np.ndarray]]) -> None:
    root, arrays = folder
    files = find_images(root)
    done = extract_features(files, CountingPixels(), batch_size=2, progress=False)
    order = [0, 1, 2, 3, 4]
    expected = torch.stack([torch.from_numpy(arrays[i]).permute(2, 0, 1).flatten() / 255.0 for i in order])
    torch.testing.assert_close(done.features, expected, rtol=0, atol=0)
    assert done.kept == order
    assert done.skipped == []
    assert done.content_sha256 is None  # no cache: the files are not hashed


def test_extract_features_with_workers_matches_reference(folder: tuple[Path, list[np.ndarray]]) -> None:
    root, arrays = folder
    two = extract_features(find_images(root), CountingPixels(), batch_size=3, num_workers=2, progress=False)
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1).flatten() / 255.0 for a in arrays])
    torch.testing.assert_close(two.features, expected, rtol=0, atol=0)
    assert two.kept == [0, 1, 2, 3, 4]


def test_mixed_sizes_grouped_per_size(tmp_path: Path, rng: np.random.Generator) -> None:
    sizes = [4, 6, 4, 8, 6]
    arrays = [_rgb(rng, s) for s in sizes]
    for i, array in enumerate(arrays):
        _write(tmp_path / f"{i}.png", array)
    files = find_images(tmp_path)
    done = extract_features(files, MeanColor(), batch_size=5, progress=False)
    expected = torch.tensor(np.stack([a.reshape(-1, 3).mean(0) for a in arrays]) / 255.0, dtype=torch.float32)
    torch.testing.assert_close(done.features, expected, rtol=1e-6, atol=1e-6)
    # Flattened pixels have a width that depends on the size: a clear error, and `image_size` fixes it.
    with pytest.raises(ValueError, match=re.escape("images of different sizes gave features of different widths")):
        extract_features(files, CountingPixels(), batch_size=5, progress=False)
    with pytest.raises(ValueError, match=re.escape("for some images and")):
        extract_features(files, CountingPixels(), batch_size=1, progress=False)
    resized = extract_features(files, CountingPixels(), batch_size=5, image_size=4, progress=False)
    assert resized.features.shape == (5, 48)
    torch.testing.assert_close(resized.features[0], torch.from_numpy(arrays[0]).permute(2, 0, 1).flatten() / 255.0)


def test_cache_hit_invalidation_and_no_name_collision(tmp_path: Path, rng: np.random.Generator) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for i in range(4):
        _write(one / f"{i}.png", _rgb(rng))
        _write(two / f"{i}.png", _rgb(rng))  # the same names, other pixels
    cache = FeatureCache(tmp_path / "cache")
    extractor = CountingPixels()
    kwargs = {"cache": cache, "extractor_id": "pixels-v1", "progress": False, "chunk_size": 2, "batch_size": 3}
    first = extract_features(find_images(one), extractor, **kwargs)
    assert (extractor.seen, first.num_cached) == (4, 0)
    assert first.content_sha256 == fingerprint(find_images(one))
    again = extract_features(find_images(one), extractor, **kwargs)
    assert (extractor.seen, again.num_cached) == (4, 4)
    torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)
    # Equal file names in another folder: no collision, the features are those of the other pixels.
    other = extract_features(find_images(two), extractor, **kwargs)
    assert other.num_cached == 0
    assert not torch.equal(other.features, first.features)
    torch.testing.assert_close(other.features, extract_features(find_images(two), CountingPixels()).features)
    # Changing one file invalidates its chunk only and gives the new features.
    _write(one / "2.png", _rgb(rng))
    seen = extractor.seen
    changed = extract_features(find_images(one), extractor, **kwargs)
    assert 1 <= extractor.seen - seen < 4
    assert changed.num_cached == 4 - (extractor.seen - seen)
    torch.testing.assert_close(changed.features, extract_features(find_images(one), CountingPixels()).features)
    # Another extractor fingerprint or resize setting misses.
    assert extract_features(find_images(one), extractor, **{**kwargs, "extractor_id": "other"}).num_cached == 0
    assert extract_features(find_images(one), extractor, **kwargs, image_size=2).num_cached == 0


def test_interrupt_keeps_finished_chunks(tmp_path: Path, rng: np.random.Generator) -> None:
    for i in range(12):
        _write(tmp_path / "imgs" / f"{i:02d}.png", _rgb(rng))
    files = find_images(tmp_path / "imgs")
    cache = FeatureCache(tmp_path / "cache")

    class Interrupting(CountingPixels):
        def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
            if self.seen >= 6:
                raise KeyboardInterrupt
            return super().__call__(imgs)

    kwargs = {"cache": cache, "extractor_id": "x", "progress": False, "chunk_size": 3, "batch_size": 1}
    with pytest.raises(KeyboardInterrupt):
        extract_features(files, Interrupting(), **kwargs)
    # Finished chunks were written before the interrupt; they hold at most the 6 images extracted.
    stored_rows = sum(cache.get(p.name.removesuffix(".safetensors")).shape[0] for p in cache.directory.iterdir())
    assert 1 <= stored_rows <= 6
    assert not list((tmp_path / "cache").glob("*.tmp"))
    resumed = CountingPixels()
    done = extract_features(files, resumed, **kwargs)
    assert done.num_cached == stored_rows
    assert resumed.seen == 12 - stored_rows
    torch.testing.assert_close(done.features, extract_features(files, CountingPixels()).features, rtol=0, atol=0)


def test_corrupt_file_error_or_skip(tmp_path: Path, rng: np.random.Generator) -> None:
    for i in range(3):
        _write(tmp_path / "imgs" / f"{i}.png", _rgb(rng))
    bad = tmp_path / "imgs" / "1b.png"
    bad.write_bytes(b"garbage")
    files = find_images(tmp_path / "imgs")
    with pytest.raises(UnreadableFileError, match=re.escape(f"cannot read {str(bad)!r}")):
        extract_features(files, CountingPixels(), progress=False)
    with pytest.raises(UnreadableFileError, match=re.escape("`--skip-bad`")):
        extract_features(files, CountingPixels(), num_workers=1, progress=False)
    done = extract_features(files, CountingPixels(), skip_bad=True, progress=False)
    assert done.kept == [0, 1, 3]  # 1b.png sorts after 1.png
    assert [s.path for s in done.skipped] == [str(bad)]
    assert "UnidentifiedImageError" in done.skipped[0].reason
    # Through the cache: the bad file is remembered as a NaN row, skipped again, and still an error without skip_bad.
    cache = FeatureCache(tmp_path / "cache")
    kwargs = {"cache": cache, "extractor_id": "x", "progress": False}
    first = extract_features(files, CountingPixels(), skip_bad=True, **kwargs)
    second = extract_features(files, CountingPixels(), skip_bad=True, **kwargs)
    assert second.num_cached == 4
    assert [s.path for s in second.skipped] == [str(bad)]
    torch.testing.assert_close(second.features, first.features)
    with pytest.raises(UnreadableFileError, match=re.escape(str(bad))):
        extract_features(files, CountingPixels(), **kwargs)
    bad.unlink()
    with pytest.raises(UnreadableFileError, match=re.escape("FileNotFoundError")):
        extract_features(files, CountingPixels(), **kwargs)
    skipped = extract_features(files, CountingPixels(), skip_bad=True, **kwargs)
    assert skipped.skipped[0].reason == "the file could not be read"


def test_all_files_bad(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=re.escape("none of the 1 input images could be read")):
        extract_features([tmp_path / "a.png"], CountingPixels(), skip_bad=True, progress=False)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((3, 4, 5), "NHW"),
        ((3, 4, 5, 3), "NHWC"),
        ((3, 3, 4, 5), "NCHW"),
        ((3, 5, 6, 4), "NHWC-alpha"),
        ((3, 4, 4, 3), "NHWC-ambiguous"),
        ((3, 3, 5, 3), "NCHW-tie"),
        ((3, 1, 4, 5), "NCHW-gray"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_image_arrays(
    tmp_path: Path, rng: np.random.Generator, shape: tuple[int, ...], layout: str, suffix: str
) -> None:
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"images{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, images=array, labels=np.arange(3))
    else:
        torch.save(torch.from_numpy(array), path)
    # Independent reference: bring to (N, H, W, 3) with numpy and flatten channels first.
    nhwc = {
        "NHW": lambda a: np.repeat(a[..., None], 3, -1),
        "NHWC": lambda a: a,
        "NHWC-ambiguous": lambda a: a,
        "NCHW-tie": lambda a: a.transpose(0, 2, 3, 1),
        "NCHW": lambda a: a.transpose(0, 2, 3, 1),
        "NHWC-alpha": lambda a: a[..., :3],
        "NCHW-gray": lambda a: np.repeat(a.transpose(0, 2, 3, 1), 3, -1),
    }[layout](array)
    expected = torch.from_numpy(nhwc.transpose(0, 3, 1, 2).reshape(3, -1).astype(np.float32) / 255.0)
    assert nhwc.shape[-1] == 3
    result = load_feature_set(path, CountingPixels(), progress=False)
    torch.testing.assert_close(result.features, expected, rtol=0, atol=0)
    assert result.kind == "image_array"
    assert result.names == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]
    shown = result.images([2, 0], size=4)
    assert shown.shape == (2, 3, 4, 4)
    assert shown.min() >= 0.0
    assert shown.max() <= 1.0
    if nhwc.shape[1:3] == (4, 4):  # no resize: the images shown are the input images
        torch.testing.assert_close(shown[0], torch.from_numpy(nhwc[2]).permute(2, 0, 1).float() / 255.0)


def test_image_array_cache_and_float(tmp_path: Path, rng: np.random.Generator) -> None:
    array = rng.random((5, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    cache = FeatureCache(tmp_path / "cache")
    extractor = CountingPixels()
    first = load_feature_set(tmp_path / "x.npy", extractor, cache=cache, extractor_id="e", progress=False, chunk_size=2)
    second = load_feature_set(
        tmp_path / "x.npy", extractor, cache=cache, extractor_id="e", progress=False, chunk_size=2
    )
    assert (extractor.seen, second.num_cached) == (5, 5)
    assert second.content_sha256 == fingerprint(tmp_path / "x.npy")
    torch.testing.assert_close(first.features, torch.from_numpy(array.reshape(5, -1)) / 255.0)
    np.save(tmp_path / "bad.npy", array * 2)
    with pytest.raises(ValueError, match=re.escape("must lie in [0, 1], got values in [0")):
        load_feature_set(tmp_path / "bad.npy", extractor, progress=False)


def test_feature_files(tmp_path: Path, rng: np.random.Generator) -> None:
    features = rng.standard_normal((6, 5)).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    np.savez(tmp_path / "f.npz", features=features, other=np.zeros(3))
    torch.save({"features": torch.from_numpy(features)}, tmp_path / "f.pt")
    for name in ("f.npy", "f.npz", "f.pt"):
        loaded = load_feature_set(tmp_path / name, features=True)
        torch.testing.assert_close(loaded.features, torch.from_numpy(features), rtol=0, atol=0)
        assert loaded.kind == "features"
        assert not loaded.has_images
    np.save(tmp_path / "h.npy", features.astype(np.float16))
    np.save(tmp_path / "d.npy", features.astype(np.float64))
    assert load_feature_file(tmp_path / "h.npy").dtype == torch.float16
    assert load_feature_file(tmp_path / "d.npy").dtype == torch.float32
    with pytest.raises(RuntimeError, match=re.escape("holds precomputed features, so its images cannot be shown")):
        loaded.images([0])


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda p: np.save(p / "x.npy", np.zeros((3, 4), np.uint8)),
            TypeError,
            "an integer array usually holds images, so leave out `features=True`",
        ),
        (
            lambda p: np.save(p / "x.npy", np.zeros((3, 4, 5), np.float32)),
            ValueError,
            "must have shape (N, D) with N, D >= 1, got shape (3, 4, 5)",
        ),
        (
            lambda p: np.save(p / "x.npy", np.full((2, 2), np.nan, np.float32)),
            ValueError,
            "hold NaN or infinite values",
        ),
        (
            lambda p: np.savez(p / "x.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2))),
            ValueError,
            "holds the arrays ['a', 'b']; store a single array",
        ),
        (lambda p: (p / "x.npy").write_bytes(b"nonsense"), UnreadableFileError, "cannot read"),
        (
            lambda p: np.save(p / "x.npy", np.array(["a", "b"])),
            TypeError,
            "must be numeric, got numpy dtype <U1; store uint8 images or floating-point features.",
        ),
        (lambda p: torch.save({"scale": 2.0}, p / "x.pt"), ValueError, "holds the arrays none; store a single array"),
        (lambda p: torch.save([1, 2], p / "x.pt"), ValueError, "must hold an array or tensor, got list; save the"),
    ],
    ids=["int-features", "3d-features", "nan", "ambiguous-npz", "corrupt", "strings", "no-array", "list"],
)
def test_feature_file_errors(tmp_path: Path, make: object, error: type[Exception], message: str) -> None:
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(error, match=re.escape(message)):
        load_feature_file(path)


@pytest.mark.parametrize(
    ("shape", "dtype", "error", "message"),
    [
        ((3, 5), np.uint8, ValueError, "got 2-D shape (3, 5); if it holds (N, D) features, pass `features=True`"),
        ((3, 5, 6, 7), np.uint8, ValueError, "must have 1, 3 or 4 channels in dimension 1"),
        ((3, 3, 4, 4), np.int32, TypeError, "must be uint8 in [0, 255] or floating in [0, 1], got torch.int32"),
        ((0, 3, 4, 4), np.uint8, ValueError, "holds no images"),
    ],
    ids=["2d", "channels", "int32", "empty"],
)
def test_image_array_errors(
    tmp_path: Path, shape: tuple[int, ...], dtype: type, error: type[Exception], message: str
) -> None:
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype))
    with pytest.raises(error, match=re.escape(message)):
        load_feature_set(tmp_path / "x.npy", CountingPixels(), progress=False)


def test_csv_lists(tmp_path: Path, rng: np.random.Generator) -> None:
    _write(tmp_path / "imgs" / "x.png", _rgb(rng))
    _write(tmp_path / "imgs" / "y.png", _rgb(rng))
    (tmp_path / "plain.csv").write_text("imgs/y.png\nimgs/x.png\n\n")
    (tmp_path / "header.csv").write_text(f"label,path\n1,{tmp_path / 'imgs' / 'x.png'}\n")
    assert read_csv_list(tmp_path / "plain.csv") == [tmp_path / "imgs" / "y.png", tmp_path / "imgs" / "x.png"]
    assert read_csv_list(tmp_path / "header.csv") == [tmp_path / "imgs" / "x.png"]
    result = load_feature_set(tmp_path / "plain.csv", CountingPixels(), progress=False)
    assert result.names == [str(tmp_path / "imgs" / "y.png"), str(tmp_path / "imgs" / "x.png")]
    torch.testing.assert_close(result.images([1], size=4)[0], load_image(tmp_path / "imgs" / "x.png") / 255.0)
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(ValueError, match=re.escape("lists no files; put one image path per row")):
        read_csv_list(tmp_path / "empty.csv")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "does not exist; pass a folder, a CSV list, or an array file."),
        ("empty", "holds no image files (.png, .jpg, .jpeg, .webp, searched recursively); check the path."),
        ("notes.txt", "got suffix '.txt'."),
    ],
)
def test_list_inputs_errors(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(message)):
        list_inputs(tmp_path / name)


def test_argument_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    _write(tmp_path / "a.png", _rgb(rng))
    files = [tmp_path / "a.png"]
    with pytest.raises(ValueError, match=re.escape("`batch_size` must be a positive integer, got 0.")):
        extract_features(files, CountingPixels(), batch_size=0)
    with pytest.raises(ValueError, match=re.escape("`num_workers` must be a non-negative integer, got -1.")):
        extract_features(files, CountingPixels(), num_workers=-1)
    with pytest.raises(ValueError, match=re.escape("`extractor_id` is required with `cache`")):
        extract_features(files, CountingPixels(), cache=FeatureCache(tmp_path / "c"))
    with pytest.raises(ValueError, match=re.escape("`features=True` (`--features`) needs a")):
        load_feature_set(tmp_path, features=True)
    with pytest.raises(ValueError, match=re.escape("holds images, so a feature extractor is needed")):
        load_feature_set(tmp_path)
    with pytest.raises(ValueError, match=re.escape("`image_size` must be a positive integer, got 0.")):
        ImageFileDataset(files, image_size=0)
    with pytest.raises(TypeError, match=re.escape("`image_size` must be an int or None, got float.")):
        ImageFileDataset(files, image_size=2.0)
    with pytest.raises(ValueError, match=re.escape("must end in one of .npy, .npz, .pt, .pth")):
        load_array(tmp_path / "a.png")


def test_float16_storage(tmp_path: Path, rng: np.random.Generator) -> None:
    for i in range(3):
        _write(tmp_path / "imgs" / f"{i}.png", _rgb(rng))
    files = find_images(tmp_path / "imgs")
    cache = FeatureCache(tmp_path / "cache")
    full = extract_features(files, CountingPixels(), cache=cache, extractor_id="e", progress=False)
    half = extract_features(files, CountingPixels(), cache=cache, extractor_id="e", progress=False, dtype=torch.float16)
    assert half.num_cached == 0  # the dtype is part of the key
    assert half.features.dtype == torch.float16
    torch.testing.assert_close(half.features, full.features.half(), rtol=0, atol=0)
    again = extract_features(
        files, CountingPixels(), cache=cache, extractor_id="e", progress=False, dtype=torch.float16
    )
    assert again.num_cached == 3
    assert again.features.dtype == torch.float16
    with pytest.raises(TypeError, match=re.escape("`dtype` must be a floating torch dtype, got torch.int32.")):
        extract_features(files, CountingPixels(), dtype=torch.int32)


def test_mixed_sizes_sorted_into_few_calls(tmp_path: Path, rng: np.random.Generator) -> None:
    sizes = [4, 6, 4, 6, 4, 6]
    arrays = [_rgb(rng, s) for s in sizes]
    for i, array in enumerate(arrays):
        _write(tmp_path / f"{i}.png", array)
    extractor = MeanColor()
    done = extract_features(find_images(tmp_path), extractor, batch_size=3, progress=False)
    # Ordered by size, the batches are [4, 4, 4] and [6, 6, 6]: two calls instead of four groups in file order.
    assert extractor.calls == 2
    assert done.kept == list(range(6))
    expected = torch.tensor(np.stack([a.reshape(-1, 3).mean(0) for a in arrays]) / 255.0, dtype=torch.float32)
    torch.testing.assert_close(done.features, expected, rtol=1e-6, atol=1e-6)


def test_non_finite_features_are_an_error(tmp_path: Path, rng: np.random.Generator) -> None:
    _write(tmp_path / "a.png", _rgb(rng))
    _write(tmp_path / "b.png", _rgb(rng))

    def broken(imgs: torch.Tensor) -> torch.Tensor:
        out = imgs.float().flatten(1)
        out[-1, 0] = float("nan")
        return out

    message = f"the feature extractor returned NaN or infinite features for {tmp_path / 'b.png'}"
    with pytest.raises(ValueError, match=re.escape(message)):
        extract_features(find_images(tmp_path), broken, progress=False)


def test_feature_set_subset_follows_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    for i in range(4):
        _write(tmp_path / "imgs" / f"{i}.png", _rgb(rng))
    (tmp_path / "imgs" / "3b.png").write_bytes(b"garbage")
    whole = load_feature_set(tmp_path / "imgs", CountingPixels(), progress=False, skip_bad=True)
    part = whole.subset(torch.tensor([3, 1]), source="half")
    torch.testing.assert_close(part.features, whole.features[[3, 1]], rtol=0, atol=0)
    assert part.names == [str(tmp_path / "imgs" / "3.png"), str(tmp_path / "imgs" / "1.png")]
    assert (part.source, part.kind, part.skipped, part.num_cached) == ("half", "image_files", [], 0)
    assert [s.path for s in whole.skipped] == [str(tmp_path / "imgs" / "3b.png")]
    # The images follow the rows: row 0 of the subset is 3.png, decoded independently here.
    expected = torch.from_numpy(np.asarray(Image.open(tmp_path / "imgs" / "3.png"), np.float32) / 255.0)
    torch.testing.assert_close(part.images([0], size=4)[0], expected.permute(2, 0, 1), rtol=0, atol=0)
    with pytest.raises(
        IndexError,
        match=re.escape(f"`rows` must lie in [0, 4) for the 4 rows of {str(tmp_path / 'imgs')!r}, got [4, -1]."),
    ):
        whole.subset([0, 4, -1])
    assert not FeatureSet(torch.zeros(2, 1), ["a", "b"], "features", "f").subset([1]).has_images
