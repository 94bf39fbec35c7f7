# SPDX-License-Identifier: Apache-2.0
"""Coverage report: figures of what a generator retrieves and misses, and an HTML page tying them together.

`write_report` takes an `IRSResult` and, when the images are available, functions that load training and
synthetic images by index. It writes four PNG figures into a folder:

- `never_retrieved.png`: a seeded random sample of the training images that no synthetic query retrieved (the
  modes the generator misses);
- `most_retrieved.png`: the training images retrieved most often, each labelled with its count (the modes it
  collapses onto);
- `nearest_pairs.png`: synthetic queries (top row of each pair) above their nearest training images;
- `retrieval_histogram.png`: how many training images were retrieved 0, 1, 2, ... times (`histogram_counts`),
  with the same numbers in `retrieval_histogram.csv`;

and `index.html` with the numbers and the figures. The grid helpers (`image_grid`, `save_image_grid`,
`save_pairs_figure`) take any (N, C, H, W) images in [0, 1] and are used by the demo as well.

Figures use matplotlib's object-oriented API on an Agg canvas, so no global backend is set and no window opens.
matplotlib is an optional dependency (the `demo` extra).
"""

import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from diadm._imports import MATPLOTLIB_AVAILABLE, require

FIGURE_NAMES = {
    "never_retrieved": "never_retrieved.png",
    "most_retrieved": "most_retrieved.png",
    "nearest_pairs": "nearest_pairs.png",
    "histogram": "retrieval_histogram.png",
}
HISTOGRAM_TABLE = "retrieval_histogram.csv"
# Inches per image cell in the grids, and resolution of the saved PNG files.
_CELL_INCHES = 1.1
_DPI = 100
# Pixels between the images of the saved grids.
_PADDING = 2

ImageLoader = Callable[[Sequence[int]], Tensor]


def _check_images(name: str, images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"`{name}` must have shape (N, C, H, W) with C in {{1, 3}}, got shape {tuple(images.shape)};"
            " channels-last images need `permute(0, 3, 1, 2)`."
        )
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be floating point in [0, 1], got {images.dtype}; divide uint8 images by 255.")
    images = images.detach().to("cpu", torch.float32)
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(
            f"`{name}` must have values in [0, 1], got values in [{images.min().item():.4g},"
            f" {images.max().item():.4g}]; rescale the images, e.g. `(x + 1) / 2` for images in [-1, 1]."
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _require_matplotlib() -> None:
    require(MATPLOTLIB_AVAILABLE, "matplotlib", "demo", "The coverage report figures")


def image_grid(images: Tensor, *, num_columns: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile images into one RGB image, row by row.

    Args:
        images: (N, C, H, W) floating images in [0, 1], C in {1, 3} (grayscale is repeated to RGB).
        num_columns: Images per row; defaults to `ceil(sqrt(N))`.
        padding: Pixels of `pad_value` between and around the images.
        pad_value: The value of the padding, in [0, 1].

    Returns:
        A (3, H_grid, W_grid) float tensor in [0, 1] with `H_grid = rows * (H + padding) + padding`.

    Raises:
        TypeError: If `images` is not a floating tensor.
        ValueError: If `images` is not (N, C, H, W) with C in {1, 3}, has values outside [0, 1] or is empty, or
            `num_columns` or `padding` is out of range.

    Example:
        >>> grid = image_grid(torch.zeros(5, 1, 4, 4), num_columns=3, padding=1)
        >>> tuple(grid.shape), grid.sum().item()
        ((3, 11, 16), 288.0)
    """
    images = _check_images("images", images)
    count = images.shape[0]
    if count == 0:
        raise ValueError("`images` must hold at least one image, got shape (0, ...).")
    if num_columns is None:
        num_columns = math.ceil(math.sqrt(count))
    if isinstance(num_columns, bool) or not isinstance(num_columns, int) or num_columns < 1:
        raise ValueError(f"`num_columns` must be a positive integer, got {num_columns!r}.")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be a non-negative integer, got {padding!r}.")
    columns = min(num_columns, count)
    rows = math.ceil(count / columns)
    height, width = images.shape[-2:]
    grid = torch.full((3, rows * (height + padding) + padding, columns * (width + padding) + padding), float(pad_value))
    for position in range(count):
        top = padding + (position // columns) * (height + padding)
        left = padding + (position % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = images[position]
    return grid


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    num_columns: int | None = None,
) -> Path:
    """Save images as a labelled grid figure (PNG).

    Args:
        images: (N, C, H, W) floating images in [0, 1], C in {1, 3}.
        path: The PNG file to write (its folder is created).
        title: A title above the grid.
        labels: One short caption per image, shown under it.
        num_columns: Images per row; defaults to `ceil(sqrt(N))`.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        TypeError: If `images` is not a floating tensor.
        ValueError: If `images` is malformed or empty, or `labels` does not have one entry per image.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     written = save_image_grid(torch.rand(4, 3, 8, 8), Path(folder) / "grid.png", labels=list("abcd"))
        ...     print(written.name, written.stat().st_size > 0)
        grid.png True
    """
    _require_matplotlib()
    images = _check_images("images", images)
    count = images.shape[0]
    if count == 0:
        raise ValueError("`images` must hold at least one image, got shape (0, ...).")
    if labels is not None and len(labels) != count:
        raise ValueError(f"`labels` must have one entry per image ({count}), got {len(labels)}.")
    columns = min(num_columns or math.ceil(math.sqrt(count)), count)
    return _save_grid(
        image_grid(images, num_columns=columns, padding=_PADDING), images.shape[-2:], columns, labels, title, path
    )


def save_pairs_figure(
    queries: Tensor,
    neighbors: Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    num_columns: int = 8,
) -> Path:
    """Save query images above their nearest training images, pair by pair, as a PNG figure.

    Args:
        queries: (N, C, H, W) floating images in [0, 1] (e.g. synthetic samples).
        neighbors: (N, C, H, W) images in [0, 1], `neighbors[i]` the nearest training image of `queries[i]`.
        path: The PNG file to write.
        title: A title above the figure.
        labels: One caption per pair (e.g. the training index), shown under the neighbour.
        num_columns: Pairs per row.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        TypeError: If an image tensor is not floating point.
        ValueError: If the two tensors differ in count, are empty or malformed, or `labels` has the wrong length.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     written = save_pairs_figure(torch.rand(3, 1, 8, 8), torch.rand(3, 3, 6, 6), Path(folder) / "p.png")
        ...     print(written.suffix)
        .png
    """
    _require_matplotlib()
    queries = _check_images("queries", queries)
    neighbors = _check_images("neighbors", neighbors)
    count = queries.shape[0]
    if count == 0 or neighbors.shape[0] != count:
        raise ValueError(
            "`queries` and `neighbors` must hold the same, non-zero number of images, got"
            f" {count} and {neighbors.shape[0]}."
        )
    if labels is not None and len(labels) != count:
        raise ValueError(f"`labels` must have one entry per pair ({count}), got {len(labels)}.")
    if neighbors.shape[-2:] != queries.shape[-2:]:
        neighbors = F.interpolate(neighbors, size=queries.shape[-2:], mode="bilinear", antialias=True).clamp(0, 1)
    columns = min(num_columns, count)
    rows = math.ceil(count / columns)
    # Interleave rows of queries and rows of their neighbours: grid row 2r holds queries, row 2r + 1 neighbours.
    height, width = queries.shape[-2:]
    blank = torch.ones(rows * columns - count, 3, height, width)
    tiles = torch.cat([queries, blank]).view(rows, columns, 3, height, width)
    below = torch.cat([neighbors, blank]).view(rows, columns, 3, height, width)
    stacked = torch.stack([tiles, below], dim=1).reshape(2 * rows * columns, 3, height, width)
    grid = image_grid(stacked, num_columns=columns, padding=_PADDING)
    cell_labels = None
    if labels is not None:
        # Labels go under the neighbour cells only.
        padded = [*labels, *[""] * (rows * columns - count)]
        cell_labels = [
            "" if upper else padded[r * columns + c]
            for r in range(rows)
            for upper in (True, False)
            for c in range(columns)
        ]
    return _save_grid(grid, (height, width), columns, cell_labels, title, path)


def histogram_counts(retrieval_counts: Tensor) -> Tensor:
    """Number of training images retrieved exactly j times, for j = 0 .. max count (`torch.bincount`).

    Raises:
        TypeError: If `retrieval_counts` is not a 1-D integer tensor.

    Example:
        >>> histogram_counts(torch.tensor([0, 2, 0, 1, 2, 2])).tolist()
        [2, 1, 3]
    """
    if not isinstance(retrieval_counts, Tensor) or retrieval_counts.ndim != 1 or retrieval_counts.is_floating_point():
        got = (
            f"{retrieval_counts.dtype} of shape {tuple(retrieval_counts.shape)}"
            if isinstance(retrieval_counts, Tensor)
            else type(retrieval_counts).__name__
        )
        raise TypeError(f"`retrieval_counts` must be a 1-D integer tensor (one count per training image), got {got}.")
    return torch.bincount(retrieval_counts.to("cpu", torch.int64))


def save_histogram(retrieval_counts: Tensor, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Save the retrieval-count histogram (`histogram_counts`) as a bar chart with a log-scaled y axis.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        TypeError: If `retrieval_counts` is not a 1-D integer tensor.
    """
    _require_matplotlib()
    from matplotlib.figure import Figure

    bins = histogram_counts(retrieval_counts)
    figure = Figure(figsize=(5.0, 3.2), dpi=_DPI)
    axis = figure.subplots()
    axis.bar(torch.arange(len(bins)).numpy(), bins.numpy(), width=0.9, color="#4477aa")
    axis.set_yscale("log" if bins.max() > 0 else "linear")
    axis.set_xlabel("times retrieved by a synthetic query")
    axis.set_ylabel("training images")
    axis.set_title(title or "Retrieval counts", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def _save_grid(
    grid: Tensor,
    cell: tuple[int, int] | torch.Size,
    columns: int,
    labels: Sequence[str] | None,
    title: str | None,
    path: str | os.PathLike,
) -> Path:
    """Draw a grid image in one axes (fast even for many cells), with a caption under each labelled cell."""
    from matplotlib.figure import Figure

    height, width = int(cell[0]), int(cell[1])
    rows = (grid.shape[1] - _PADDING) // (height + _PADDING)
    inches = _CELL_INCHES
    figure = Figure(figsize=(columns * inches, rows * inches + (0.4 if title else 0.0)), dpi=_DPI)
    axis = figure.add_axes((0.0, 0.0, 1.0, 1.0 if not title else 1.0 - 0.4 / (rows * inches + 0.4)))
    axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
    axis.set_axis_off()
    for position, label in enumerate(labels or []):
        if label:
            x = _PADDING + (position % columns) * (width + _PADDING) + width / 2
            y = _PADDING + (position // columns) * (height + _PADDING) + height
            axis.text(x, y, label, fontsize=6, ha="center", va="bottom", backgroundcolor="white")
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _summary_rows(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_summary_rows(value, f"{name}."))
        elif isinstance(value, list | tuple) and len(value) > 8:
            rows.append((name, f"{len(value)} entries (see the JSON result)"))
        else:
            rows.append((name, _format(value)))
    return rows


def select_indices(
    retrieval_counts: Tensor, num_show: int = 16, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Choose the training images a report shows and the synthetic queries it pairs with them.

    Returns:
        `(never, most, queries)`: up to `num_show` never-retrieved training indices (a seeded random sample, in
        increasing order), the `num_show` most retrieved training indices (by count, descending; ties to the lower
        index), and up to `num_show` synthetic query indices (a seeded random sample, in increasing order; the
        number of queries is `retrieval_counts.sum()`).

    Example:
        >>> select_indices(torch.tensor([0, 3, 0, 1, 3]), num_show=2, seed=0)
        ([0, 2], [1, 4], [3, 6])
    """
    counts = retrieval_counts.to("cpu", torch.int64)
    generator = torch.Generator().manual_seed(seed)
    never = torch.nonzero(counts == 0).flatten()
    never = never[torch.randperm(len(never), generator=generator)[:num_show]].sort().values
    # Stable sort of the negated counts keeps the lower index first among equal counts.
    ordered = torch.sort(-counts, stable=True).indices
    most = ordered[:num_show][counts[ordered[:num_show]] > 0]
    num_queries = int(counts.sum())
    queries = torch.randperm(num_queries, generator=generator)[:num_show].sort().values
    return never.tolist(), most.tolist(), queries.tolist()


def write_report(
    directory: str | os.PathLike,
    result: Any,
    *,
    train_images: ImageLoader | None = None,
    synthetic_images: ImageLoader | None = None,
    train_names: Sequence[str] | None = None,
    synthetic_names: Sequence[str] | None = None,
    summary: Mapping[str, Any] | None = None,
    num_show: int = 16,
    seed: int = 0,
    title: str = "Image Retrieval Score report",
) -> Path:
    """Write the coverage figures and `index.html` for one IRS result.

    Args:
        directory: The report folder (created).
        result: An `IRSResult` (from `image_retrieval_score` or `ImageRetrievalScore.last_result`).
        train_images: Loads training images by index as (k, C, H, W) floats in [0, 1] of one size; without it
            (precomputed features), only the histogram is drawn.
        synthetic_images: Loads synthetic images by index likewise; needed for the pairs figure.
        train_names: File names of the training images, listed under the figures.
        synthetic_names: File names of the synthetic images, listed likewise.
        summary: Numbers (nested mappings allowed) shown in the page's table, e.g. the command's JSON result.
        num_show: Images per figure.
        seed: Seed of the random choice of never-retrieved images and of queries.
        title: The page title.

    Returns:
        The path of `index.html`.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        ValueError: If `num_show` is not positive.

    Example:
        >>> import tempfile
        >>> from diadm.functional import image_retrieval_score
        >>> train, synthetic = torch.rand(20, 3, 6, 6), torch.rand(10, 3, 6, 6)
        >>> result = image_retrieval_score(train.flatten(1), synthetic.flatten(1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     page = write_report(folder, result, train_images=lambda i: train[list(i)],
        ...                         synthetic_images=lambda i: synthetic[list(i)], num_show=4)
        ...     print(sorted(p.name for p in page.parent.iterdir()))
        ['index.html', 'most_retrieved.png', 'nearest_pairs.png', 'never_retrieved.png', 'retrieval_histogram.csv',
         'retrieval_histogram.png']
    """
    _require_matplotlib()
    if isinstance(num_show, bool) or not isinstance(num_show, int) or num_show < 1:
        raise ValueError(f"`num_show` must be a positive integer, got {num_show!r}.")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    counts = result.retrieval_counts.to("cpu", torch.int64)
    nearest = result.nearest_train_index.to("cpu", torch.int64)
    never, most, queries = select_indices(counts, num_show, seed)
    num_never = int((counts == 0).sum())
    sections: list[tuple[str, str, str, list[str]]] = []

    def names(source: Sequence[str] | None, indices: Sequence[int]) -> list[str]:
        return [f"{i}: {source[i]}" for i in indices] if source is not None else [str(i) for i in indices]

    # 1. Training images no query retrieved: what the generator misses.
    if train_images is not None and never:
        save_image_grid(
            train_images(never),
            folder / FIGURE_NAMES["never_retrieved"],
            title=f"{len(never)} of {num_never} training images never retrieved",
            labels=[str(i) for i in never],
        )
        sections.append(
            (
                "Never retrieved",
                FIGURE_NAMES["never_retrieved"],
                f"{num_never} training images",
                names(train_names, never),
            )
        )
    # 2. The most retrieved training images: where the generator concentrates.
    if train_images is not None and most:
        save_image_grid(
            train_images(most),
            folder / FIGURE_NAMES["most_retrieved"],
            title="Most retrieved training images",
            labels=[f"#{i} x{int(counts[i])}" for i in most],
        )
        sections.append(
            ("Most retrieved", FIGURE_NAMES["most_retrieved"], "label: index x count", names(train_names, most))
        )
    # 3. Synthetic queries above their nearest training images.
    if train_images is not None and synthetic_images is not None and queries:
        partners = [int(nearest[q]) for q in queries]
        save_pairs_figure(
            synthetic_images(queries),
            train_images(partners),
            folder / FIGURE_NAMES["nearest_pairs"],
            title="Synthetic queries (upper) and their nearest training images (lower)",
            labels=[f"#{i}" for i in partners],
        )
        sections.append(
            (
                "Nearest training images",
                FIGURE_NAMES["nearest_pairs"],
                "upper: synthetic query; lower: its nearest training image",
                names(synthetic_names, queries),
            )
        )
    # 4. The histogram, always available.
    save_histogram(
        counts, folder / FIGURE_NAMES["histogram"], title=f"Retrieval counts of {len(counts)} training images"
    )
    bins = histogram_counts(counts)
    table = "times_retrieved,num_train_images\n" + "".join(f"{j},{int(c)}\n" for j, c in enumerate(bins.tolist()))
    (folder / HISTOGRAM_TABLE).write_text(table, encoding="utf-8")
    sections.append(
        (
            "Retrieval-count histogram",
            FIGURE_NAMES["histogram"],
            "training images retrieved j times, j = 0, 1, ...: " + ", ".join(map(str, bins.tolist()[:50])),
            [],
        )
    )
    page = folder / "index.html"
    page.write_text(_html_page(title, result, summary or {}, sections), encoding="utf-8")
    return page


def _html_page(
    title: str, result: Any, summary: Mapping[str, Any], sections: list[tuple[str, str, str, list[str]]]
) -> str:
    esc = html.escape
    estimates = [("synthetic", result.synthetic)] + ([("held-out", result.test)] if result.test is not None else [])
    head = "<tr><th>queries</th><th>N_train</th><th>n</th><th>k</th><th>IRS_alpha</th><th>IRS_inf [bounds]</th></tr>"
    rows = [
        f"<tr><td>{name}</td><td>{e.n_train}</td><td>{e.n_samples}</td><td>{e.n_learned}</td>"
        f"<td>{e.irs_alpha:.4f}</td><td>{e.irs_inf:.4f} [{e.irs_inf_lower:.4f}, {e.irs_inf_upper:.4f}]</td></tr>"
        for name, e in estimates
    ]
    adjusted = ""
    if result.irs_adjusted is not None:
        adjusted = (
            f"<p>Adjusted IRS: <b>{result.irs_adjusted:.4f}</b> (spread {result.irs_adjusted_std:.4f} over"
            f" {result.num_subsets} synthetic subset(s))</p>"
        )
    details = "".join(f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>" for key, value in _summary_rows(summary))
    figures = []
    for heading, file, caption, listed in sections:
        items = "".join(f"<li>{esc(item)}</li>" for item in listed)
        listing = f"<details><summary>images shown</summary><ul>{items}</ul></details>" if listed else ""
        figures.append(
            f'<h2>{esc(heading)}</h2><figure><img src="{esc(file)}" alt="{esc(heading)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>{listing}"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;max-width:60em;margin:auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style>"
        f"</head><body><h1>{esc(title)}</h1><table>{head}{''.join(rows)}</table>{adjusted}"
        f"{''.join(figures)}<p>Histogram table: <a href='{HISTOGRAM_TABLE}'>{HISTOGRAM_TABLE}</a></p>"
        f"<h2>Details</h2><table>{details}</table></body></html>\n"
    )
