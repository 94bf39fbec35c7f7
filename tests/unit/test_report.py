# SPDX-License-Identifier: Apache-2.0
"""Tests of the coverage report: grid helpers against torchvision, histogram against numpy, the HTML page."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from diadm._imports import MATPLOTLIB_AVAILABLE
from diadm.functional import image_retrieval_score
from diadm.report import (
    FIGURE_NAMES,
    HISTOGRAM_TABLE,
    histogram_counts,
    image_grid,
    save_histogram,
    save_image_grid,
    save_pairs_figure,
    select_indices,
    write_report,
)

needs_matplotlib = pytest.mark.skipif(not MATPLOTLIB_AVAILABLE, reason="matplotlib is not installed")


@pytest.mark.parametrize(
    ("count", "columns", "padding"), [(5, 3, 1), (4, None, 2), (1, 8, 0), (7, 2, 3)], ids=["5x3", "auto", "one", "7x2"]
)
def test_image_grid_matches_torchvision(count: int, columns: int | None, padding: int) -> None:
    images = torch.rand(count, 3, 5, 4)
    expected = make_grid(images, nrow=columns or int(np.ceil(np.sqrt(count))), padding=padding, pad_value=0.5)
    torch.testing.assert_close(image_grid(images, num_columns=columns, padding=padding, pad_value=0.5), expected)


def test_image_grid_gray_is_repeated() -> None:
    gray = torch.rand(2, 1, 3, 3)
    torch.testing.assert_close(image_grid(gray, padding=0), make_grid(gray.expand(-1, 3, -1, -1), nrow=2, padding=0))


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "message"),
    [
        (np.zeros((1, 3, 2, 2)), {}, TypeError, "`images` must be a torch.Tensor of shape (N, C, H, W), got ndarray."),
        (torch.zeros(1, 2, 2, 3), {}, ValueError, "got shape (1, 2, 2, 3); channels-last images need"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), {}, TypeError, "got torch.uint8; divide uint8 images by 255."),
        (torch.full((1, 3, 2, 2), -1.0), {}, ValueError, "got values in [-1, -1]; rescale the images"),
        (torch.zeros(0, 3, 2, 2), {}, ValueError, "`images` must hold at least one image, got shape (0, ...)."),
        (torch.zeros(1, 3, 2, 2), {"num_columns": 0}, ValueError, "`num_columns` must be a positive integer, got 0."),
        (torch.zeros(1, 3, 2, 2), {"padding": -1}, ValueError, "`padding` must be a non-negative integer, got -1."),
    ],
    ids=["array", "channels-last", "uint8", "range", "empty", "columns", "padding"],
)
def test_image_grid_errors(images: object, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        image_grid(images, **kwargs)


def test_histogram_counts_is_bincount(rng: np.random.Generator) -> None:
    counts = rng.poisson(1.3, 500)
    np.testing.assert_array_equal(histogram_counts(torch.from_numpy(counts)).numpy(), np.bincount(counts))
    with pytest.raises(TypeError, match=re.escape("must be a 1-D integer tensor (one count per training image)")):
        histogram_counts(torch.zeros(3))


def test_select_indices_against_numpy(rng: np.random.Generator) -> None:
    counts = rng.poisson(0.8, 200)
    never, most, queries = select_indices(torch.from_numpy(counts), num_show=10, seed=3)
    assert len(never) == 10
    assert all(counts[i] == 0 for i in never)
    assert never == sorted(never)
    assert most == np.argsort(-counts, kind="stable")[:10].tolist()
    assert len(queries) == 10
    assert max(queries) < counts.sum()
    assert select_indices(torch.from_numpy(counts), num_show=10, seed=3) == (never, most, queries)
    assert select_indices(torch.from_numpy(counts), num_show=10, seed=4)[0] != never
    # Everything retrieved: no never-retrieved images; nothing retrieved more than zero times is never "most".
    assert select_indices(torch.tensor([1, 2]), num_show=5) == ([], [1, 0], [0, 1, 2])
    assert select_indices(torch.tensor([0, 0, 1]), num_show=5)[1] == [2]


@needs_matplotlib
def test_figures_are_png(tmp_path: Path) -> None:
    grid = save_image_grid(torch.rand(3, 3, 6, 6), tmp_path / "sub" / "g.png", title="t", labels=["a", "b", "c"])
    pairs = save_pairs_figure(torch.rand(5, 3, 6, 6), torch.rand(5, 1, 4, 4), tmp_path / "p.png", num_columns=2)
    hist = save_histogram(torch.tensor([0, 1, 1, 5]), tmp_path / "h.png")
    for path in (grid, pairs, hist):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] > 50
    with pytest.raises(ValueError, match=re.escape("`labels` must have one entry per image (3), got 2.")):
        save_image_grid(torch.rand(3, 3, 6, 6), tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match=re.escape("must hold the same, non-zero number of images, got 2 and 3.")):
        save_pairs_figure(torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=re.escape("`labels` must have one entry per pair (2), got 1.")):
        save_pairs_figure(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), tmp_path / "x.png", labels=["a"])


@needs_matplotlib
def test_write_report_with_images(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(30, 3, 6, 6, generator=generator)
    # Synthetic images copy the first 8 training images, so 22 are never retrieved.
    synthetic = train[torch.randint(0, 8, (12,), generator=generator)]
    result = image_retrieval_score(train.flatten(1), synthetic.flatten(1), train.flatten(1)[10:22])
    loaded = []

    def train_images(indices: list[int]) -> torch.Tensor:
        loaded.append(list(indices))
        return train[list(indices)]

    page = write_report(
        tmp_path / "report",
        result,
        train_images=train_images,
        synthetic_images=lambda i: synthetic[list(i)],
        train_names=[f"t{i}.png" for i in range(30)],
        summary={"feature": "pixels", "nested": {"value": 0.5}, "long": list(range(20))},
        num_show=6,
    )
    text = page.read_text()
    for name in FIGURE_NAMES.values():
        assert (tmp_path / "report" / name).is_file()
        assert f'src="{name}"' in text
    # Every link of the page names a file the report wrote.
    links = re.findall(r"""(?:src|href)=["']([^"']+)["']""", text)
    assert sorted(links) == sorted([*FIGURE_NAMES.values(), HISTOGRAM_TABLE])
    assert all((tmp_path / "report" / link).is_file() for link in links)
    assert f"href='{HISTOGRAM_TABLE}'" in text
    assert "<td>nested.value</td><td>0.5000</td>" in text
    assert "<td>long</td><td>20 entries (see the JSON result)</td>" in text
    assert "Adjusted IRS: <b>" in text
    assert f"{result.irs_adjusted:.4f}" in text
    assert "t0.png" in text
    # The never-retrieved figure shows only training images that no query retrieved.
    never_shown = loaded[0]
    assert all(int(result.retrieval_counts[i]) == 0 for i in never_shown)
    assert all(i >= 8 for i in never_shown)
    # The histogram table equals numpy's bincount of the retrieval counts.
    with (tmp_path / "report" / HISTOGRAM_TABLE).open() as handle:
        rows = list(csv.DictReader(handle))
    expected = np.bincount(result.retrieval_counts.numpy())
    assert [int(r["times_retrieved"]) for r in rows] == list(range(len(expected)))
    assert [int(r["num_train_images"]) for r in rows] == expected.tolist()
    assert expected[0] == 30 - result.synthetic.n_learned


@needs_matplotlib
def test_write_report_features_only(tmp_path: Path) -> None:
    result = image_retrieval_score(torch.randn(10, 4), torch.randn(5, 4))
    page = write_report(tmp_path, result, summary={"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", HISTOGRAM_TABLE, FIGURE_NAMES["histogram"]]
    assert "never_retrieved.png" not in page.read_text()
    assert "Adjusted IRS" not in page.read_text()
    with pytest.raises(ValueError, match=re.escape("`num_show` must be a positive integer, got 0.")):
        write_report(tmp_path, result, num_show=0)


def test_missing_matplotlib_names_both_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("diadm.report.MATPLOTLIB_AVAILABLE", False)
    message = "Install it with `pip install 'diadm[demo]'` or `pip install matplotlib`."
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        save_image_grid(torch.rand(1, 3, 2, 2), tmp_path / "x.png")
    with pytest.raises(ModuleNotFoundError, match=re.escape("The coverage report figures needs `matplotlib`")):
        write_report(tmp_path, object())
