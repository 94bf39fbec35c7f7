# SPDX-License-Identifier: Apache-2.0
"""IRSCallback: watch a generator's coverage (IRS) next to FID while a Lightning model trains.

Every `every_n_epochs` epochs (or `every_n_train_steps` optimizer steps) the callback draws images from the model
being trained, extracts their features, retrieves each one's nearest training image and logs the Image Retrieval
Score (Dombrowski et al., arXiv:2411.16171, Sec. 3) with its confidence bounds, the adjusted score when held-out
real images exist, and FID computed on the same features. Pictures (samples, samples beside the training images
they retrieved, training images nobody retrieved, a histogram of retrieval counts) go to TensorBoard and W&B.
"""

import hashlib
import logging
import math
import numbers
import os
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from typing_extensions import override

from diadm._imports import WANDB_AVAILABLE
from diadm.cache import FeatureCache, cached, fingerprint
from diadm.estimator import check_alpha_e, estimate_irs
from diadm.features import extractor_fingerprint, get_feature_extractor
from diadm.functional import IRSResult, image_retrieval_score
from diadm.retrieval import ExactIndex

log = logging.getLogger(__name__)

SAMPLER_NAMES: tuple[Literal["sample_fn", "sample", "pipeline"], ...] = ("sample_fn", "sample", "pipeline")
EVALUATE_ON = ("train_epoch_end", "validation_epoch_end")
# Keys of a batch dict that hold the images, tried in this order by the default `batch_to_images`.
_IMAGE_KEYS = ("images", "image", "pixel_values", "input")
# Images are accepted in [0, 1]; this slack absorbs rounding of samplers that clamp in another precision.
_RANGE_SLACK = 1e-3
# The paper's fixed sample count (Sec. 4), the cap of `target_ci_width` when `max_samples` is not given.
_PAPER_NUM_SAMPLES = 50_000
# Top-level packages whose frames a warning skips, so that it points at the user's code (their `trainer.fit` call).
_INTERNAL_PACKAGES = frozenset(
    {"diadm", "lightning", "lightning_utilities", "pytorch_lightning", "torch", "contextlib"}
)

RealSource = Tensor | Dataset | DataLoader
SampleFn = Callable[["pl.LightningModule", int, torch.Generator], Tensor]


def _default_batch_to_images(batch: Any) -> Tensor:
    """Take the image tensor out of a batch: the batch itself, its first element, or a dict entry."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _IMAGE_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(
        "`IRSCallback` could not find images in a batch of type"
        f" {type(batch).__name__}: it takes a tensor, a tuple/list whose first element is the image tensor, or a dict"
        f" with one of the keys {_IMAGE_KEYS}; pass `batch_to_images=` to extract (N, C, H, W) images in [0, 1]."
    )


def _check_images(name: str, images: Any) -> Tensor:
    """Check that `images` is an (N, C, H, W) tensor, uint8 or floating in [0, 1], and return it."""
    if not isinstance(images, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must have shape (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}.")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"`{name}` must be uint8 or floating, got dtype {images.dtype}.")
        if images.numel() and (images.min() < -_RANGE_SLACK or images.max() > 1 + _RANGE_SLACK):
            raise ValueError(
                f"`{name}` must hold floats in [0, 1], got values in [{images.min().item():.3g},"
                f" {images.max().item():.3g}]; map diffusion outputs in [-1, 1] with `(x + 1) / 2`"
                " (for real data pass such a function as `batch_to_images=`)."
            )
    return images


def _as_display(images: Tensor) -> Tensor:
    """Float (N, 3, H, W) in [0, 1] on the CPU, for pictures."""
    images = images.detach().to("cpu")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _make_grid(images: Tensor, num_columns: int) -> Tensor:
    """Tile (N, 3, H, W) images into one (3, H', W') picture with a one-pixel border."""
    from torchvision.utils import make_grid

    return make_grid(images, nrow=num_columns, padding=1, pad_value=1.0)


def _user_stacklevel() -> int:
    """The `stacklevel` that points a warning of the calling function at the first frame outside our packages.

    The frames skipped are diadm's, Lightning's and torch's; 1 is the calling function itself.
    """
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL_PACKAGES:
        level, frame = level + 1, frame.f_back
    return level


def _logger_step(trainer: "pl.Trainer", *, train_epoch_end: bool) -> int:
    """The step under which Lightning's loggers file what the current hook logs.

    Lightning files the values of the batch that takes `global_step` from s - 1 to s (its training loss, what
    `on_train_batch_end` and an in-epoch validation log) under s - 1, the count of batches stepped before it; in
    `on_train_epoch_end` that count is already s, and Lightning steps it back by one to log epoch-end values
    (`fit_loop.on_advance_end`). `LearningRateMonitor` reads the same counter.
    """
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    if stepped is None:  # a Lightning without the counter: the same convention, for a single optimizer
        return max(trainer.global_step - 1, 0)
    return max(stepped - 1, 0) if train_epoch_end else stepped


def _rank_share(total: int, world_size: int, rank: int) -> int:
    """How many of `total` samples rank `rank` draws: equal shares, the remainder to the lowest ranks."""
    return total // world_size + (1 if rank < total % world_size else 0)


def _rank_zero_rows(round_sizes: Sequence[int], world_size: int, limit: int) -> Tensor:
    """The first `limit` positions of rank 0's samples among the gathered ones (by round, ranks in order)."""
    rows, offset = [], 0
    for size in round_sizes:
        rows.append(torch.arange(offset, offset + _rank_share(size, world_size, 0)))
        offset += size
    return torch.cat(rows)[:limit]


@contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Run the body without changing Python's, NumPy's or torch's global random state (CPU and `device`)."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _FeaturePassthrough(nn.Module):
    """A feature 'extractor' for torchmetrics' FID that receives features and returns them unchanged.

    `FrechetInceptionDistance(feature=module)` reads `module.num_features` and calls the module on what `update`
    gets; passing features we already extracted for IRS avoids running the extractor twice.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    @override
    def forward(self, features: Tensor) -> Tensor:
        return features


class IRSCallback(Callback):
    r"""Sample the model periodically during training and log its Image Retrieval Score next to FID.

    At each evaluation the callback draws `num_samples` images (split across ranks), extracts their features
    with `feature`, retrieves the nearest training image of each and logs, under `prefix`:
    `irs_inf`, `irs_inf_lower`, `irs_inf_upper`, `irs_alpha`, `n_learned`, `num_samples` (how many samples were
    used), `irs_adjusted` and `irs_adjusted_std` (when held-out real images exist) and `fid` (when `compute_fid`).
    FID is torchmetrics' `FrechetInceptionDistance` fed the *same* features (so it is the Fréchet distance in the
    chosen feature space, equal to the usual FID only with `feature="inception"`), against the training features.

    How it samples, trying the sources in `sampler_order` (default `("sample_fn", "sample", "pipeline")`):

    - `"sample_fn"`: the `sample_fn(pl_module, num_images, generator)` given here;
    - `"sample"`: a method `pl_module.sample(num_images, generator)`;
    - `"pipeline"`: a diffusers pipeline exposed as `pl_module.pipeline`, either the pipeline itself or a
      method returning one (called at every evaluation, so it wraps the current weights); it is called as
      `pipeline(batch_size=..., generator=..., output_type="np", **pipeline_kwargs)` with its progress bar off.

    Each returns (N, C, H, W) images, floating in [0, 1] or uint8. Sampling runs under `torch.no_grad`, with every
    submodule's train/eval mode restored afterwards, and inside an isolated random state (Python, NumPy, torch CPU
    and the model's CUDA device), so the training run draws exactly the random numbers it would draw without the
    callback. The sampler gets an explicit generator on the model's device seeded with `seed + global_rank`, the
    same at every evaluation (common random numbers: changes between evaluations come from the model, not the
    noise).

    Real features come from `real_features` (precomputed (N, D)), or are extracted once from `real_data` (an image
    tensor, a map-style dataset or a dataloader; default: the trainer's training dataloader). Map-style datasets
    are read in index order whatever the loader's sampler, so index `i` of the retrieval counts is `dataset[i]`.
    With `cache_dir`, the features are stored on disk under a key made of a SHA-256 of the image bytes and the
    extractor's fingerprint (never file names), so a repeated or resumed run skips the extraction. Held-out images
    (for `irs_adjusted`) come from `held_out_features`, `held_out_data`, or with `held_out_data="val"` (default)
    the validation dataloader when there is one.

    With `target_ci_width`, the callback samples `num_samples` at a time until
    `irs_inf_upper - irs_inf_lower < target_ci_width` or `max_samples` is reached.

    Args:
        num_samples: Images per evaluation (per round with `target_ci_width`), over all ranks; at least 2.
        every_n_epochs: Evaluate after every n-th training epoch. The default when neither interval is given is 1.
        every_n_train_steps: Evaluate after every n-th optimizer step instead, in `on_train_batch_end`.
        evaluate_on: For epoch intervals, the hook that evaluates: `"train_epoch_end"` or `"validation_epoch_end"`
            (every validation run of a selected epoch, sanity check excluded). Both make the logged values a
            `ModelCheckpoint(monitor=...)` target.
        sample_fn: A user sampler, see above.
        sampler_order: The sampling sources to try, in order; the first available is used.
        pipeline_kwargs: Extra keyword arguments for the pipeline call (for example `num_inference_steps`).
        sample_batch_size: At most this many images per sampler call and per feature-extraction batch.
        feature: The feature extractor, as for `ImageRetrievalScore`: a registered name (`"swav"`,
            `"inception"`, `"pixels"`, ...), an `nn.Module` or a callable.
        feature_kwargs: Keyword arguments for `get_feature_extractor` (for example `weights=`).
        real_data: Training images to extract the reference features from.
        real_features: Precomputed (N, D) reference features; excludes `real_data`.
        held_out_data: Held-out real images, `"val"` for the validation dataloader, or None for none.
        held_out_features: Precomputed (M, D) held-out features; excludes `held_out_data`.
        batch_to_images: Maps a batch of `real_data`/`held_out_data` to (N, C, H, W) images in [0, 1] or uint8.
            The default takes a tensor batch, the first element of a tuple/list, or a dict entry `"images"`.
        cache_dir: A folder for `diadm.cache.FeatureCache`; None keeps the features in memory only.
        compute_fid: Whether to log FID as well.
        target_ci_width: Stop sampling once the `irs_inf` confidence interval is narrower than this, in (0, 1].
        max_samples: The cap for `target_ci_width` (default 50,000, the paper's fixed count).
        alpha_e: Error probability of each one-sided confidence bound.
        seed: Base seed of the sampling generators and of the subsampling inside `image_retrieval_score`.
        prefix: Prepended to every logged key, for example `"irs/"` gives `"irs/irs_inf"`.
        log_images: Whether to log pictures (rank zero only).
        num_images: Images per picture grid.

    Raises:
        ValueError: In `__init__` if both intervals are given, an interval, `sample_batch_size` or `num_images` is
            not a positive integer, `num_samples < 2`, `evaluate_on` or `sampler_order` is unknown, both a source
            and precomputed features are given, `target_ci_width` is not a number in (0, 1], `max_samples` is not
            an integer of at least `num_samples`, `max_samples` is given without `target_ci_width`, or `alpha_e` is
            not a number in (0, 0.5). In `setup` if no sampling source in
            `sampler_order` is available, pictures are requested and no logger of the trainer can take them,
            `evaluate_on="validation_epoch_end"` is asked of a fit without validation, or another `IRSCallback` of
            the trainer has the same `prefix`.
            At the first evaluation if a real or held-out source holds no images; at any evaluation if images
            (sampled or real) are not (N, C, H, W) with C in (1, 3) and values in [0, 1], or the sampler returns
            another number of images than asked for.
        TypeError: In `__init__` if `sample_fn` or `batch_to_images` is not callable, `prefix` is not a string,
            `compute_fid` or `log_images` is not a bool, or `seed` is not an int.
            At evaluation if images are not a uint8 or floating tensor, a real or held-out source is neither a
            tensor, a Dataset nor a DataLoader, or `held_out_data="val"` meets something else than one or more
            validation DataLoaders (the first is used).
        FileNotFoundError: In `setup`, from `get_feature_extractor`, when a named extractor's weights are missing.
        RuntimeError: If an evaluation hook is called by hand, outside `Trainer.fit` (whose `setup` builds the
            feature extractor).

    Note:
        A configuration the arguments alone show to be wrong fails at construction; one that needs the trainer or
        the module (no sampling source, no logger that takes pictures, no validation loop for
        `evaluate_on="validation_epoch_end"`, two callbacks with one `prefix`, missing extractor weights) fails in
        `setup`, before the first training step. The callback evaluates only during `fit`: `trainer.validate()`
        leaves it idle. One callback passed to a second `fit` keeps its history and the real and held-out features
        of the first (they are not extracted again); build a new `IRSCallback` for another data set.

    Note:
        Steps. Scalars and pictures go to every logger under the step at which Lightning files the training loss
        of the same batch: after the optimizer step that makes `trainer.global_step` equal to s, that is s - 1
        (Lightning counts logging steps from 0), for step and epoch intervals alike, so the scores line up with
        the loss and validation curves. `history[i]["global_step"]` holds `trainer.global_step` itself (s). The
        scalars are written to the loggers directly at every evaluation, whatever `Trainer(log_every_n_steps=...)`
        is; `pl_module.log` (with `logger=False`) puts them into `trainer.callback_metrics`.

    Note:
        Order relative to Lightning's weight averaging (`lightning.pytorch.callbacks.WeightAveraging`,
        `EMAWeightAveraging`): the averaged weights are swapped into the module only between
        `on_validation_epoch_start` and the averaging callback's own `on_validation_epoch_end`. To score the
        averaged (EMA) weights, use `evaluate_on="validation_epoch_end"` and list `IRSCallback` *before* the
        averaging callback in `callbacks=[...]`; in every other arrangement the current (raw) weights are scored,
        and `setup` warns once that this is what will happen.

    Note:
        Every rank computes the scores on the features gathered from all ranks (an `all_gather` on every rank,
        no rank-zero-only collective), so every rank logs the same values; pictures are logged from rank zero.
        Every rank extracts the real features itself (or reads them from `cache_dir`). With an
        `IterableDataset` the retrieved and never-retrieved training images cannot be looked up by index, and those
        two pictures are skipped with a warning; so they are with precomputed `real_features`.

    Example:
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch import nn
        >>> real = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> class Generator(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.bias = nn.Parameter(torch.zeros(()))
        ...     def training_step(self, batch, batch_idx):
        ...         return (self.bias - 0.5) ** 2
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        ...     def train_dataloader(self):
        ...         return torch.utils.data.DataLoader(real, batch_size=32)
        ...     def sample(self, num_images, generator):  # reproduces a quarter of the training set
        ...         return real[torch.randint(0, 16, (num_images,), generator=generator)]
        >>> callback = IRSCallback(num_samples=32, feature="pixels", log_images=False)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Generator())
        >>> entry = callback.history[-1]
        >>> print(entry["global_step"], entry["num_samples"], entry["n_learned"], round(entry["irs_inf"], 4))
        2 32 16 0.2969
        >>> print(sorted(trainer.callback_metrics)[:3])
        ['irs/fid', 'irs/irs_alpha', 'irs/irs_inf']
    """

    def __init__(
        self,
        num_samples: int = 1000,
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        evaluate_on: Literal["train_epoch_end", "validation_epoch_end"] = "train_epoch_end",
        sample_fn: SampleFn | None = None,
        sampler_order: Sequence[Literal["sample_fn", "sample", "pipeline"]] = SAMPLER_NAMES,
        pipeline_kwargs: Mapping[str, Any] | None = None,
        sample_batch_size: int = 64,
        feature: str | nn.Module | Callable[[Tensor], Tensor] = "swav",
        feature_kwargs: Mapping[str, Any] | None = None,
        real_data: RealSource | None = None,
        real_features: Tensor | None = None,
        held_out_data: RealSource | Literal["val"] | None = "val",
        held_out_features: Tensor | None = None,
        batch_to_images: Callable[[Any], Tensor] | None = None,
        cache_dir: str | os.PathLike | None = None,
        compute_fid: bool = True,
        target_ci_width: float | None = None,
        max_samples: int | None = None,
        alpha_e: float = 0.05,
        seed: int = 0,
        prefix: str = "irs/",
        log_images: bool = True,
        num_images: int = 16,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                f"`IRSCallback` takes one interval, got both `every_n_epochs={every_n_epochs}` and"
                f" `every_n_train_steps={every_n_train_steps}`; pass only one of them."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}; pass at least 1.")
        if every_n_epochs is None and every_n_train_steps is None:
            every_n_epochs = 1
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(
                f"`num_samples` must be an integer of at least 2 (IRS and FID need two samples), got {num_samples!r};"
                " pass `num_samples=2` or more (the paper's estimates are confident from about 0.1 x the training set)."
            )
        if evaluate_on not in EVALUATE_ON:
            raise ValueError(f"`evaluate_on` must be one of {EVALUATE_ON}, got {evaluate_on!r}.")
        unknown = [name for name in sampler_order if name not in SAMPLER_NAMES]
        if not sampler_order or unknown or isinstance(sampler_order, str):
            raise ValueError(
                f"`sampler_order` must be a non-empty sequence of names from {SAMPLER_NAMES}, got {sampler_order!r}."
            )
        if sample_fn is not None and not callable(sample_fn):
            raise TypeError(
                "`sample_fn` must be callable as `sample_fn(pl_module, num_images, generator)`,"
                f" got {type(sample_fn).__name__}."
            )
        if batch_to_images is not None and not callable(batch_to_images):
            raise TypeError(f"`batch_to_images` must be callable, got {type(batch_to_images).__name__}.")
        if isinstance(sample_batch_size, bool) or not isinstance(sample_batch_size, int) or sample_batch_size < 1:
            raise ValueError(f"`sample_batch_size` must be a positive integer, got {sample_batch_size!r}.")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}.")
        if real_data is not None and real_features is not None:
            raise ValueError(
                "`IRSCallback` takes the training set once, got both `real_data` and `real_features`;"
                " pass only one of them."
            )
        if held_out_features is not None and held_out_data not in (None, "val"):
            raise ValueError(
                "`IRSCallback` takes the held-out set once, got both `held_out_data` and `held_out_features`;"
                " pass only one of them."
            )
        if target_ci_width is not None and (
            isinstance(target_ci_width, bool)
            or not isinstance(target_ci_width, numbers.Real)
            or not 0 < target_ci_width <= 1
        ):
            raise ValueError(
                f"`target_ci_width` must be in (0, 1] (a width of the `irs_inf` interval), got {target_ci_width!r}."
            )
        if max_samples is not None:
            if target_ci_width is None:
                raise ValueError(
                    f"`max_samples={max_samples}` caps the sampling of `target_ci_width`, which is None;"
                    " pass `target_ci_width=` as well, or `num_samples=` for a fixed count."
                )
            if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < num_samples:
                raise ValueError(
                    f"`max_samples` must be an integer of at least `num_samples` ({num_samples}), got {max_samples!r}."
                )
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
        for name, flag in (("compute_fid", compute_fid), ("log_images", log_images)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r} ({type(flag).__name__}).")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r} ({type(seed).__name__}).")
        check_alpha_e(alpha_e)  # the estimator's own rule, checked now rather than after the first training epoch

        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.evaluate_on = evaluate_on
        self.sample_fn = sample_fn
        self.sampler_order = tuple(sampler_order)
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.sample_batch_size = sample_batch_size
        self.feature = feature
        self.feature_kwargs = dict(feature_kwargs or {})
        self.real_data = real_data
        self.held_out_data = held_out_data
        self.batch_to_images = batch_to_images or _default_batch_to_images
        self.cache = FeatureCache(cache_dir) if cache_dir is not None else None
        self.compute_fid = compute_fid
        self.target_ci_width = target_ci_width
        self.max_samples = (max_samples or _PAPER_NUM_SAMPLES) if target_ci_width is not None else num_samples
        self.alpha_e = alpha_e
        self.seed = seed
        self.prefix = prefix
        self.log_images = log_images
        self.num_images = num_images

        # Evaluation history (one dict of floats per evaluation) and the step of the last one: the resumable state.
        self.history: list[dict[str, float]] = []
        self.last_evaluated_step: int | None = None

        self._real_features = real_features
        self._held_out_features = held_out_features
        self._held_out_resolved = held_out_features is not None
        self._sampler: Callable[[pl.LightningModule, int, torch.Generator], Tensor] | None = None
        self._sampler_name: str | None = None
        self._extractor: nn.Module | Callable[[Tensor], Tensor] | None = None
        self._index: ExactIndex | None = None
        self._fid: Any = None
        # Looks up training image i for the pictures; None when the source has no index access.
        self._real_lookup: Callable[[int], Tensor] | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        # Two callbacks with different prefixes or schedules keep separate states in one checkpoint.
        return self._generate_state_key(
            prefix=self.prefix,
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
            evaluate_on=self.evaluate_on,
        )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts at its own step 0; a checkpoint's state, restored after `setup`, sets the step back.
        self.last_evaluated_step = None
        self._sampler_name, self._sampler = self._resolve_sampler(pl_module)
        callbacks = getattr(trainer, "callbacks", [])  # set by the trainer at run time, absent from its annotations
        twins = [other for other in callbacks if isinstance(other, IRSCallback) and other.prefix == self.prefix]
        if len(twins) > 1:
            raise ValueError(
                f"Each `IRSCallback` of a trainer needs its own `prefix`, got {len(twins)} with"
                f" `prefix={self.prefix!r}`, whose values would overwrite each other in the loggers; pass a distinct"
                " `prefix=` to each (for example `prefix='irs_fine/'`)."
            )
        if (
            self.evaluate_on == "validation_epoch_end"
            and self.every_n_epochs is not None
            and not trainer.enable_validation
        ):
            raise ValueError(
                "`IRSCallback(evaluate_on='validation_epoch_end')` would never evaluate: this fit runs no validation"
                " (no validation dataloader, no `validation_step`, or `limit_val_batches=0`); pass"
                " `evaluate_on='train_epoch_end'` or enable validation."
            )
        if self._extractor is None:
            # Built here so that missing weights fail before any training time is spent.
            self._extractor = get_feature_extractor(self.feature, **self.feature_kwargs)
        if self.log_images:
            image_loggers = [
                logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger | WandbLogger)
            ]
            if not image_loggers:
                names = [type(logger).__name__ for logger in trainer.loggers] or ["no logger"]
                raise ValueError(
                    "`IRSCallback(log_images=True)` needs a logger that can take images (TensorBoardLogger or"
                    f" WandbLogger), got {', '.join(names)}; add one to `Trainer(logger=...)` or pass"
                    " `log_images=False`."
                )
        self._warn_about_weight_averaging(trainer)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps is None or step == 0 or step % self.every_n_train_steps != 0:
            return
        if step != self.last_evaluated_step:
            self._evaluate(trainer, pl_module, on_step=True, logger_step=_logger_step(trainer, train_epoch_end=False))

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Only the validation runs of `fit`: `trainer.validate()` neither calls `setup("fit")` nor trains.
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if self.evaluate_on == "validation_epoch_end" and fitting and self._epoch_selected(trainer):
            self._evaluate(trainer, pl_module, on_step=False, logger_step=_logger_step(trainer, train_epoch_end=False))

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.evaluate_on == "train_epoch_end" and self._epoch_selected(trainer):
            self._evaluate(trainer, pl_module, on_step=False, logger_step=_logger_step(trainer, train_epoch_end=True))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # The index and FID statistics can be large; the features stay cached for a following `fit`.
        self._index = None
        self._fid = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history], "last_evaluated_step": self.last_evaluated_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict["history"]]
        self.last_evaluated_step = state_dict["last_evaluated_step"]

    # ----------------------------------------------------------------------------------------------------------------
    # Configuration helpers

    def _resolve_sampler(
        self, pl_module: "pl.LightningModule"
    ) -> tuple[str, Callable[["pl.LightningModule", int, torch.Generator], Tensor]]:
        """Return the first sampling source of `sampler_order` that is available."""
        for name in self.sampler_order:
            if name == "sample_fn":
                if self.sample_fn is not None:
                    return name, self.sample_fn
            elif name == "sample":
                if callable(getattr(pl_module, "sample", None)):
                    return name, lambda module, num, generator: module.sample(num, generator)
            elif name == "pipeline":
                if getattr(pl_module, "pipeline", None) is not None:
                    return name, self._sample_pipeline
            else:
                raise AssertionError(f"unreachable: `sampler_order` was validated, got {name!r}")
        raise ValueError(
            f"`IRSCallback` found no way to sample {type(pl_module).__name__}"
            f" with `sampler_order={self.sampler_order}`:"
            " pass `sample_fn=lambda pl_module, num_images, generator: images`, define"
            " `sample(self, num_images, generator)` on the LightningModule, or expose a diffusers pipeline as"
            " `pl_module.pipeline` (an attribute or a method returning one)."
        )

    def _warn_about_weight_averaging(self, trainer: "pl.Trainer") -> None:
        try:
            from lightning.pytorch.callbacks import WeightAveraging
        except ImportError:  # Lightning < 2.5 has no weight averaging callback.
            return
        callbacks = list(getattr(trainer, "callbacks", []))
        averagers = [index for index, callback in enumerate(callbacks) if isinstance(callback, WeightAveraging)]
        if not averagers or self not in callbacks:
            return
        position = callbacks.index(self)
        if self.evaluate_on == "validation_epoch_end" and position < min(averagers):
            return
        self._warn_once(
            "weight-averaging",
            "`IRSCallback` will score the current (non-averaged) weights: the averaged weights of"
            " `WeightAveraging` are in the module only during validation. To score the averaged weights, pass"
            " `evaluate_on='validation_epoch_end'` and list `IRSCallback` before the averaging callback.",
        )

    def _epoch_selected(self, trainer: "pl.Trainer") -> bool:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return False
        return trainer.global_step != self.last_evaluated_step

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            # `rank_zero_warn` puts three frames of its own above this method.
            rank_zero_warn(message, category=UserWarning, stacklevel=_user_stacklevel() + 3)

    # ----------------------------------------------------------------------------------------------------------------
    # Evaluation

    def _evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, on_step: bool, logger_step: int
    ) -> None:
        """Sample, score and log under `logger_step`; identical on every rank except for what goes to loggers."""
        device = pl_module.device
        with _isolated_rng(device), torch.no_grad():
            self._prepare(trainer, pl_module)
            assert self._real_features is not None
            assert self._index is not None
            generator = torch.Generator(device=device).manual_seed(self.seed + trainer.global_rank)
            counts = torch.zeros(self._index.num_reference, dtype=torch.int64)
            synthetic: list[Tensor] = []
            shown: list[Tensor] = []  # this rank's first `num_images` samples, for the pictures
            round_sizes: list[int] = []
            total = 0
            while True:
                # 1. Sample this rank's share of one round, and extract features.
                round_size = min(self.num_samples, self.max_samples - total)
                local_images, local_features = self._sample_round(trainer, pl_module, round_size, generator)
                kept = sum(images.shape[0] for images in shown)
                if kept < self.num_images:
                    shown.append(local_images[: self.num_images - kept].cpu())
                # 2. Gather the features of all ranks, in rank order (rank 0's samples come first in each round).
                features = self._gather(trainer, local_features, round_size)
                round_sizes.append(round_size)
                synthetic.append(features)
                total += features.shape[0]
                # 3. Update the retrieval counts and the estimate; stop when precise enough or at the cap.
                nearest, _ = self._index.search(features)
                counts += torch.bincount(nearest.cpu(), minlength=counts.numel())
                estimate = estimate_irs(counts.numel(), total, int((counts > 0).sum()), alpha_e=self.alpha_e)
                width = estimate.irs_inf_upper - estimate.irs_inf_lower
                if self.target_ci_width is None or width < self.target_ci_width or total >= self.max_samples:
                    break
            synthetic_features = torch.cat(synthetic)
            result = image_retrieval_score(
                self._real_features,
                synthetic_features,
                self._held_out_features,
                alpha_e=self.alpha_e,
                seed=self.seed,
                index=self._index,
            )
            metrics = self._metrics(result, synthetic_features)
        self._log_metrics(trainer, pl_module, metrics, on_step=on_step, logger_step=logger_step)
        if self.log_images and trainer.is_global_zero:
            rows = _rank_zero_rows(round_sizes, trainer.world_size, self.num_images)
            self._log_pictures(trainer, torch.cat(shown)[: rows.numel()], rows, result, logger_step)

    def _prepare(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build the extractor, the real and held-out features, the index and FID's real statistics once."""
        device = pl_module.device
        if self._extractor is None:
            raise RuntimeError(
                "`IRSCallback` evaluates during `fit` only, after its `setup` has built the feature extractor, got an"
                " evaluation hook called before `setup`; pass the callback to `Trainer(callbacks=[...])` and call"
                " `trainer.fit(...)` instead of calling its hooks directly."
            )
        if isinstance(self._extractor, nn.Module):
            self._extractor.to(device)
        if self._real_features is None:
            source = self.real_data if self.real_data is not None else trainer.train_dataloader
            self._real_features, self._real_lookup = self._features_of("real_data", source, device)
        if not self._held_out_resolved:
            source = self._val_dataloader(trainer) if isinstance(self.held_out_data, str) else self.held_out_data
            if source is not None:
                self._held_out_features, _ = self._features_of("held_out_data", source, device)
            self._held_out_resolved = source is not None or self.held_out_data is None
        if self._index is None:
            self._index = ExactIndex(self._real_features)
        if self.compute_fid and self._fid is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            # The gathered features are identical on every rank, so FID must not sum its states across ranks.
            self._fid = FrechetInceptionDistance(
                feature=_FeaturePassthrough(self._index.num_features),
                reset_real_features=False,
                sync_on_compute=False,
            )
            self._fid.update(self._real_features.cpu().float(), real=True)

    def _val_dataloader(self, trainer: "pl.Trainer") -> RealSource | None:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.enable_validation:
            # Before the first validation run the loop has not built its dataloaders yet.
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        if loaders is not None and not isinstance(loaders, DataLoader):
            raise TypeError(
                f"`held_out_data='val'` needs one validation DataLoader, got {type(loaders).__name__};"
                " pass `held_out_data=` or `held_out_features=` explicitly."
            )
        return loaders

    def _features_of(
        self, name: str, source: Any, device: torch.device
    ) -> tuple[Tensor, Callable[[int], Tensor] | None]:
        """Extract features of every image of `source` (cached on disk by content) and an index lookup."""
        batches, lookup = self._image_batches(name, source)

        def compute() -> Tensor:
            features = [self._extract(_check_images(name, images), device).cpu() for images in batches()]
            if not features or sum(chunk.shape[0] for chunk in features) == 0:
                raise ValueError(f"`{name}` holds no images; pass a non-empty image set.")
            return torch.cat(features)

        if self.cache is None:
            features = compute()
        else:
            content = hashlib.sha256(b"irs-callback-images;")
            for images in batches():
                content.update(fingerprint(images).encode())
            assert self._extractor is not None
            key = FeatureCache.key("irs-callback", content.hexdigest(), extractor_fingerprint(self._extractor))
            features = cached(self.cache, key, compute)
        return features.float(), lookup

    def _image_batches(
        self, name: str, source: Any
    ) -> tuple[Callable[[], Iterator[Tensor]], Callable[[int], Tensor] | None]:
        """A re-iterable source of image batches, and a lookup of image i (None without index access)."""
        batch_size = self.sample_batch_size
        if isinstance(source, Tensor):
            images = _check_images(name, source)
            return (lambda: iter(images.split(batch_size))), (lambda i: images[i])
        if isinstance(source, DataLoader):
            dataset, collate = source.dataset, source.collate_fn
            batch_size = source.batch_size or batch_size
            if isinstance(dataset, IterableDataset):
                return (lambda: (self.batch_to_images(batch) for batch in source)), None
        elif isinstance(source, Dataset):
            dataset, collate = source, default_collate
        else:
            raise TypeError(
                f"`{name}` must be an image tensor, a Dataset or a DataLoader, got {type(source).__name__};"
                " pass one, or precomputed features (`real_features=` / `held_out_features=`)."
            )
        # Index order, whatever sampler the loader uses, so position i of the features is dataset[i].
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)  # type: ignore[arg-type]

        def lookup(i: int) -> Tensor:
            return self.batch_to_images(collate([dataset[i]]))[0]

        return (lambda: (self.batch_to_images(batch) for batch in loader)), lookup

    def _extract(self, images: Tensor, device: torch.device) -> Tensor:
        assert self._extractor is not None
        features = [self._extractor(chunk.to(device)) for chunk in images.split(self.sample_batch_size)]
        return torch.cat(features).float()

    def _sample_round(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Sample this rank's share of `round_size` images in batches; return the images and their features."""
        assert self._sampler is not None
        share = _rank_share(round_size, trainer.world_size, trainer.global_rank)
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            images, features = [], []
            for start in range(0, share, self.sample_batch_size):
                count = min(self.sample_batch_size, share - start)
                batch = _check_images(
                    f"images returned by the {self._sampler_name!r} sampler", self._sampler(pl_module, count, generator)
                )
                if batch.shape[0] != count:
                    raise ValueError(
                        f"The {self._sampler_name!r} sampler must return {count} images, got {batch.shape[0]};"
                        " return exactly `num_images` images per call (the callback asks for its batches itself)."
                    )
                images.append(batch)
                features.append(self._extract(batch, pl_module.device))
        finally:
            for module, mode in modes.items():
                module.training = mode
        if not features:  # more ranks than images in this round
            assert self._index is not None
            return torch.empty(0, 3, 1, 1), torch.empty(0, self._index.num_features, device=pl_module.device)
        return torch.cat(images), torch.cat(features)

    def _sample_pipeline(self, pl_module: "pl.LightningModule", num_images: int, generator: torch.Generator) -> Tensor:
        attribute: Any = getattr(pl_module, "pipeline")  # noqa: B009 (LightningModule types unknown attributes)
        pipeline = attribute() if callable(attribute) and not hasattr(attribute, "components") else attribute
        # Lightning owns the terminal during `fit`: the bar is off for this call, and the pipeline's own
        # configuration (diffusers keeps it in `_progress_bar_config`) is put back afterwards.
        configurable = hasattr(pipeline, "set_progress_bar_config")
        previous: dict[str, Any] = {}
        if configurable:
            previous = dict(getattr(pipeline, "_progress_bar_config", {}))
            pipeline.set_progress_bar_config(**{**previous, "disable": True})
        try:
            output = pipeline(batch_size=num_images, generator=generator, output_type="np", **self.pipeline_kwargs)
        finally:
            if configurable:
                pipeline.set_progress_bar_config(**previous)
        images = output.images if hasattr(output, "images") else output[0]
        if isinstance(images, np.ndarray):  # diffusers' "np" output: (N, H, W, C) floats in [0, 1]
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return images

    def _gather(self, trainer: "pl.Trainer", local: Tensor, round_size: int) -> Tensor:
        """Concatenate every rank's features in rank order; a collective that every rank enters."""
        world = trainer.world_size
        if world == 1:
            return local.cpu()
        # all_gather needs equal shapes: pad every share to the largest, then drop the padding.
        largest = _rank_share(round_size, world, 0)
        padded = torch.zeros(largest, local.shape[1], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        gathered = trainer.strategy.all_gather(padded).cpu()  # (world, largest, D)
        return torch.cat([gathered[rank, : _rank_share(round_size, world, rank)] for rank in range(world)])

    def _metrics(self, result: IRSResult, synthetic_features: Tensor) -> dict[str, float]:
        estimate = result.synthetic
        metrics = {
            "irs_inf": estimate.irs_inf,
            "irs_inf_lower": estimate.irs_inf_lower,
            "irs_inf_upper": estimate.irs_inf_upper,
            "irs_alpha": estimate.irs_alpha,
            "n_learned": float(estimate.n_learned),
            "num_samples": float(estimate.n_samples),
        }
        if result.irs_adjusted is not None:
            metrics["irs_adjusted"] = result.irs_adjusted
            if result.irs_adjusted_std is not None:
                metrics["irs_adjusted_std"] = result.irs_adjusted_std
        if self._fid is not None:
            self._fid.reset()  # keeps the real statistics (reset_real_features=False)
            self._fid.update(synthetic_features.float(), real=False)
            metrics["fid"] = float(self._fid.compute())
        return metrics

    # ----------------------------------------------------------------------------------------------------------------
    # Logging

    def _log_metrics(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        metrics: dict[str, float],
        *,
        on_step: bool,
        logger_step: int,
    ) -> None:
        step = trainer.global_step
        scalars = {self.prefix + name: value for name, value in metrics.items()}
        for name, value in scalars.items():
            # For `callback_metrics` (a `ModelCheckpoint(monitor=...)` target) only: every rank holds the same value,
            # so no reduction across ranks is needed.
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step, batch_size=1, logger=False)
        if trainer.is_global_zero:
            # Straight to the loggers, as LearningRateMonitor does: through `pl_module.log`, values logged in
            # `on_train_batch_end` would reach them only at multiples of `Trainer(log_every_n_steps=...)`.
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=logger_step)
        entry = {"global_step": step, "epoch": trainer.current_epoch, **metrics}
        entry["num_samples"] = int(metrics["num_samples"])
        entry["n_learned"] = int(metrics["n_learned"])
        self.history.append(entry)
        self.last_evaluated_step = step
        log.debug("IRSCallback step %d: %s", step, metrics)

    def _log_pictures(self, trainer: "pl.Trainer", shown: Tensor, rows: Tensor, result: IRSResult, step: int) -> None:
        """Log the picture grids and the histogram; `rows` are the positions of `shown` among all the samples."""
        columns = max(1, math.isqrt(self.num_images))
        pictures = {"samples": _make_grid(_as_display(shown), columns)}
        if self._real_lookup is None:
            self._warn_once(
                "lookup",
                "`IRSCallback` cannot look up training images by index (precomputed `real_features` or an"
                " IterableDataset), so the pictures of retrieved and never-retrieved training images are skipped;"
                " pass `real_data=` as a tensor, a map-style Dataset or a DataLoader over one to get them.",
            )
        else:
            nearest = result.nearest_train_index[rows].tolist()
            retrieved = torch.stack([_as_display(self._real_lookup(i)[None])[0] for i in nearest])
            pairs = torch.stack([_as_display(shown), retrieved], dim=1).flatten(0, 1)  # (2N, 3, H, W)
            pictures["samples_and_retrieved"] = _make_grid(pairs, 2 * columns)
            missed = torch.nonzero(result.retrieval_counts == 0).flatten()
            if missed.numel():
                order = torch.randperm(missed.numel(), generator=torch.Generator().manual_seed(self.seed))
                chosen = missed[order[: self.num_images]].tolist()
                never = torch.stack([_as_display(self._real_lookup(i)[None])[0] for i in chosen])
                pictures["never_retrieved"] = _make_grid(never, columns)
        counts = result.retrieval_counts.cpu().float()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, grid in pictures.items():
                    logger.experiment.add_images(self.prefix + name, grid[None], global_step=step)
                logger.experiment.add_histogram(self.prefix + "retrieval_counts", counts, global_step=step)
            elif isinstance(logger, WandbLogger) and WANDB_AVAILABLE:
                import wandb

                names = list(pictures)
                for name in names:
                    image = (pictures[name].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                    logger.log_image(key=self.prefix + name, images=[image], step=step)
                histogram = wandb.Histogram(counts.tolist())
                logger.log_metrics({self.prefix + "retrieval_counts": histogram}, step=step)  # type: ignore[dict-item]
            else:
                self._warn_once(
                    f"logger-{type(logger).__name__}",
                    f"`IRSCallback` cannot log pictures to {type(logger).__name__}; it skips that logger"
                    " (TensorBoardLogger and WandbLogger are supported).",
                )
