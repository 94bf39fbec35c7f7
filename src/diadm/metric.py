# SPDX-License-Identifier: Apache-2.0
"""`ImageRetrievalScore`: the Image Retrieval Score as a torchmetrics `Metric`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics.metric import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE, plot_single_or_multi_val
from typing_extensions import override

from diadm._imports import MATPLOTLIB_AVAILABLE, require
from diadm.estimator import check_alpha_e
from diadm.features import get_feature_extractor
from diadm.functional import image_retrieval_score
from diadm.retrieval import BACKENDS, DEFAULT_MAX_MEMORY_BYTES, Backend, ExactIndex, validate_features

if TYPE_CHECKING:
    from diadm.functional import IRSResult

if not MATPLOTLIB_AVAILABLE:
    __doctest_skip__ = ["ImageRetrievalScore.plot"]

FEATURE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
# the three kinds of feature rows the metric keeps, as (state name prefix, wording for messages)
_KINDS: tuple[tuple[str, str], ...] = (
    ("train", "real training"),
    ("held_out", "real held-out"),
    ("generated", "generated"),
)
# keys of `compute()` that share the [0, 1] axis of `plot()` (counts and the spread are left out)
_PLOTTED_KEYS = ("irs_alpha", "irs_inf", "irs_inf_lower", "irs_inf_upper", "irs_adjusted")
# dtypes a state tensor may have, by the code `_gather_states` sends in its header
_STATE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
)
# integer views of float rows: bitwise-equal rows have equal integer sums, whatever order the sum runs in
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _communication_device(group: Any, device: torch.device) -> torch.device:
    """The device a tensor must be on for a collective of `group`: the current GPU for NCCL, else `device`."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _gather_states(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """All-gather one metric state tensor, also when some ranks hold no rows of it.

    torchmetrics stands in for an empty list state with a 1-D float tensor of the metric's default dtype, which
    `gather_all_tensors` cannot gather next to (num_rows, num_features) float16 rows or int64 indices of another
    rank. A small header (rank, dtype, width, size) is exchanged first; an empty placeholder is then reshaped to the
    others' layout. States kept on the CPU are moved to the GPU for NCCL and the results moved back.

    Args:
        tensor: The local state (after torchmetrics concatenated the local list).
        group: The process group; None is the default group.

    Returns:
        One tensor per rank, on the device of `tensor`.

    Raises:
        RuntimeError: If two ranks hold non-empty states of different rank, dtype or width.
    """
    group = group if group is not None else torch.distributed.group.WORLD
    device = _communication_device(group, tensor.device)
    world_size = torch.distributed.get_world_size(group)
    width = tensor.shape[1] if tensor.ndim == 2 else 0
    header = torch.tensor(
        [tensor.ndim, _STATE_DTYPES.index(tensor.dtype), width, tensor.numel()], dtype=torch.int64, device=device
    )
    headers = [torch.empty_like(header) for _ in range(world_size)]
    torch.distributed.all_gather(headers, header, group=group)
    layouts = {tuple(h[:3].tolist()) for h in headers if int(h[3]) > 0}
    if len(layouts) > 1:
        described = sorted(f"{ndim}-D {_STATE_DTYPES[code]} of width {w}" for ndim, code, w in layouts)
        raise RuntimeError(
            f"`ImageRetrievalScore` states differ between processes ({', '.join(described)}); every process must"
            " use the same feature extractor and `feature_dtype`."
        )
    local = tensor
    if layouts and tensor.numel() == 0:
        ndim, code, width = layouts.pop()
        local = torch.empty((0, width) if ndim == 2 else (0,), dtype=_STATE_DTYPES[code])
    gathered = gather_all_tensors(local.to(device), group=group)
    return [part.to(tensor.device) for part in gathered]


def _as_rows(state: list[Tensor] | Tensor) -> Tensor | None:
    """Concatenate a list state (or take the synced tensor); None when it holds no rows."""
    if isinstance(state, list) and not state:
        return None
    rows = dim_zero_cat(state)
    return rows if rows.numel() > 0 else None


def _num_rows(rows: Tensor | None) -> int:
    return 0 if rows is None else int(rows.shape[0])


def _first_row_per_index(features: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the first row (in gathered order) of every dataset index, sorted by index.

    Sorting by index makes the order, and so every seeded subsample, the same as one process that saw the data
    set in index order.
    """
    sorted_indices, order = torch.sort(indices, stable=True)
    is_first = torch.ones_like(sorted_indices, dtype=torch.bool)
    is_first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return features[order[is_first]], sorted_indices[is_first]


def _row_keys(features: Tensor) -> Tensor:
    """A key per row that bitwise-equal rows share.

    The key is the wrapping integer sum of the float bit patterns, plus the bits of three single columns. Integer
    addition modulo 2^32 does not depend on the summation order, so equal rows get equal sums however the reduction
    is vectorised.
    """
    bits = features.contiguous().view(_BIT_VIEWS[features.dtype])
    columns = [0, bits.shape[1] // 2, bits.shape[1] - 1]
    if bits.device.type == "cpu":
        # numpy's unsigned sum wraps and is vectorised; torch promotes integer sums to int64 and runs ~30x slower
        unsigned = bits.numpy().view(f"uint{8 * bits.element_size()}")
        sums = torch.from_numpy(unsigned.sum(axis=1, dtype="uint32").astype("int64"))
    else:
        sums = bits.to(torch.int64).sum(dim=1)
    return torch.cat([sums[:, None].to(bits.device), bits[:, columns].to(torch.int64)], dim=1)


def _count_duplicate_rows(features: Tensor) -> int:
    """Number of rows that are bitwise copies of an earlier row.

    Only rows whose cheap key (`_row_keys`) collides with another row's are compared exactly, so continuous features
    cost about one pass over the data.
    """
    if features.shape[0] < 2:
        return 0
    if features.dtype not in _BIT_VIEWS:
        features = features.to(torch.float32)
    _, inverse, counts = torch.unique(_row_keys(features), dim=0, return_inverse=True, return_counts=True)
    candidates = features[counts[inverse] > 1]
    if candidates.shape[0] == 0:
        return 0
    bits = candidates.contiguous().view(_BIT_VIEWS[candidates.dtype])
    return int(candidates.shape[0] - torch.unique(bits, dim=0).shape[0])


def _plottable(value: Any) -> Any:
    """Keep the score entries of one `compute()` dict, or of each dict in a sequence."""
    if isinstance(value, dict):
        return {key: value[key] for key in _PLOTTED_KEYS if key in value}
    if isinstance(value, Sequence) and value and isinstance(value[0], dict):
        return [_plottable(item) for item in value]
    return value


def _max_plotted(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.max())
    if isinstance(value, dict):
        return max((_max_plotted(v) for v in value.values()), default=0.0)
    if isinstance(value, Sequence):
        return max((_max_plotted(v) for v in value), default=0.0)
    return float(value)


class ImageRetrievalScore(Metric):
    r"""Image Retrieval Score (IRS): how many training images a generator can produce.

    Each generated image retrieves its nearest real training image in feature space (exact Euclidean search); a
    training image is learned when some generated image retrieves it. From the number `k` of learned images among
    `N_train`, after `n` generated images, IRS estimates the share of the training set the model can produce
    (Dombrowski et al., CVPR 2025, arXiv:2411.16171, Sec. 3):

    .. math::
        \mathrm{IRS}_\alpha = k / N_{train}, \qquad
        \mathrm{IRS}_\infty = \hat s / N_{train}, \quad \hat s = \arg\max_s P(k \mid n, s)

    with one-sided confidence bounds at error probability `alpha_e`. When real held-out images are given too, the
    same estimate is made with them as queries, and `irs_adjusted = IRS_inf(generated) / IRS_inf(held-out)` removes
    the feature extractor's "measurement gap" (it can exceed 1). All of it is computed by
    `diadm.functional.image_retrieval_score` on the accumulated features.

    Images are passed as FID takes them: a batch of shape (N, C, H, W), C in {1, 3} (grayscale is accepted; the
    extractor repeats it where it needs RGB), uint8 in [0, 255] by default, or floating in [0, 1] with
    `normalize=True`. `update(imgs, real=True)` adds real training images (the reference set),
    `update(imgs, real=True, held_out=True)` real held-out images, and `update(imgs, real=False)` generated images.
    Precomputed features of shape (N, D) go to `update_features` instead.

    `compute()` returns a dict of scalar tensors: `irs_alpha`, `irs_inf`, `irs_inf_lower`, `irs_inf_upper` (floats in
    [0, 1]), `n_train`, `n_samples`, `n_learned` (int64), plus `irs_adjusted` and `irs_adjusted_std` (its spread over
    generated subsets, 0.0 for one subset) when held-out images were given. The full `IRSResult` of the last
    computation (per-image retrieval counts, the held-out estimate) stays in `last_result`.

    Memory: features are kept as list states on the CPU (`features_on_cpu=True`), whatever device the extractor
    runs on. A 2048-wide float32 feature takes 8 KiB, so 50,000 images take 391 MiB (410 MB) and the 1,281,167
    ImageNet training images 9.8 GiB; `feature_dtype=torch.float16` halves that. At `compute()` the rows are
    concatenated once (a list of many batches is replaced by one tensor, so the copy is not kept twice) and the
    search works in float32: float16 storage needs a float32 copy of the rows during `compute()`, and one of the
    reference set stays with the cached index. The faiss backend (the default on the CPU when faiss is installed)
    keeps one more float32 copy of its own; `backend="torch"` shares the stored float32 rows instead.

    Args:
        feature: A name from `diadm.features.available_feature_extractors()` ("swav", the paper's choice,
            "inception", "pixels"), an `nn.Module` or a callable mapping float images in [0, 1] of shape
            (N, C, H, W) to (N, D) features (see `diadm.features.get_feature_extractor`), or None to use
            `update_features` only. A module becomes a submodule, so it moves with `.to(device)`; it receives the
            images as passed (no resize, no grayscale-to-RGB repeat, no normalisation), so it must include them.
        reset_real_features: Whether `reset()` also drops the real training and held-out features. Set it to False
            when the real data do not change between evaluations: their features, and the reference index built
            from them, are then kept.
        normalize: False if images are uint8 in [0, 255], True if they are floating in [0, 1].
        alpha_e: One-sided error probability of each confidence bound.
        seed: Seed of the subsampling that equalises the number of generated and held-out queries.
        feature_dtype: The dtype features are stored in: torch.float32 or torch.float16.
        weights: A local path to the weights of a named extractor (None looks in the download cache).
        feature_kwargs: Further keyword arguments for `get_feature_extractor` (for example `{"size": 32}` for
            "pixels", or `{"num_features": 512}` for a module without a `num_features` attribute).
        features_on_cpu: Whether to keep features on the CPU; False keeps them on the device of the extractor's
            output, where the search then runs too (faster on a GPU, but it holds the whole reference set there).
        backend: Search backend of `diadm.retrieval.ExactIndex`: "auto", "faiss" or "torch".
        max_memory_bytes: Byte budget of one block of the exact search.
        kwargs: Keyword arguments of the torchmetrics `Metric` base class (`dist_sync_fn`, `process_group`, ...).

    Raises:
        TypeError: If `reset_real_features`, `normalize` or `features_on_cpu` is not a bool, `seed` or
            `max_memory_bytes` is not an int, or `feature` is neither a name, a module, a callable nor None.
        ValueError: If `alpha_e` is not a number in (0, 0.5), `feature_dtype` is neither float32 nor float16,
            `backend` is unknown, `max_memory_bytes` is below 1, or `feature` is an unknown name.

    Note:
        Distributed runs: states are gathered across processes at `compute()` in the torchmetrics way
        (`dist_reduce_fx="cat"`), moved through the GPU when the backend is NCCL. A `DistributedSampler` pads an
        uneven split by repeating samples, which would count those training images twice in `n_train`. Pass the
        dataset indices of each batch as `indices=` to `update`/`update_features`: after the gather, rows that
        share an index are reduced to the first one and all rows are put in index order, so the result equals one
        process reading the data set in order. Without `indices`, rows of the gathered states that are exact copies
        of another row are detected and reported with a warning (once per kind), but kept: they may be genuine
        duplicates. A single process makes no such check.

    Note:
        Precision: the stored rows always keep `feature_dtype` and the search runs in float32, so `set_dtype`
        (which casts the states of other metrics) leaves the rows and the int64 dataset indices as they are.
        `set_dtype` and `.to(dtype)` (which Lightning's "16-true"/"bf16-true" precisions call) cast the weights of
        an extractor module; it then runs its network in that dtype (preprocessing stays float32) and still
        returns float32 features. `.half()`, `.float()` and `.double()` do nothing, as on every torchmetrics metric.

    Note:
        `forward` (calling the metric) only accumulates, like `update`, and returns None: IRS needs the whole
        reference set, so a per-batch value has no meaning. The reference index is cached between `compute()`
        calls and rebuilt when training rows are added, reset, loaded or moved; under DDP its key is the number of
        training updates this process has seen together with the gathered row count.

    Note:
        float16 storage rounds features to 11 significant bits. On scikit-learn's digits (900 training images, 897
        queries) it changed the nearest training image of 4 queries with the features of a small random conv net
        and of none with 32 PCA components; every change was a near-tie (best two distances within 0.13 %), and
        `n_learned`, hence every score, stayed the same (pinned by
        `tests/unit/test_metric.py::test_float16_storage_changes_few_neighbours`). Keep float32 when the exact
        neighbour of every query matters more than memory.

    Example:
        >>> import torch
        >>> from diadm.metric import ImageRetrievalScore
        >>> metric = ImageRetrievalScore(feature="pixels")
        >>> train = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
        >>> metric.update(train, real=True)
        >>> # a model that only reproduces 25 of its 100 training images, each twice, with a little noise
        >>> copies = train[:25].repeat(2, 1, 1, 1).int() + torch.randint(-4, 5, (50, 1, 8, 8))
        >>> metric.update(copies.clamp(0, 255).to(torch.uint8), real=False)
        >>> scores = metric.compute()
        >>> {key: round(value.item(), 3) for key, value in scores.items()}
        {'irs_alpha': 0.25, 'irs_inf': 0.31, 'irs_inf_lower': 0.26, 'irs_inf_upper': 0.4, 'n_train': 100,
         'n_samples': 50, 'n_learned': 25}
    """

    higher_is_better: bool = True
    is_differentiable: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    train_features: list[Tensor]
    train_indices: list[Tensor]
    held_out_features: list[Tensor]
    held_out_indices: list[Tensor]
    generated_features: list[Tensor]
    generated_indices: list[Tensor]

    feature_extractor: nn.Module | None

    def __init__(
        self,
        feature: str | nn.Module | Callable[[Tensor], Tensor] | None = "swav",
        reset_real_features: bool = True,
        normalize: bool = False,
        alpha_e: float = 0.05,
        seed: int = 0,
        feature_dtype: torch.dtype = torch.float32,
        *,
        weights: str | os.PathLike | None = None,
        feature_kwargs: dict[str, Any] | None = None,
        features_on_cpu: bool = True,
        backend: Backend = "auto",
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (
            ("reset_real_features", reset_real_features),
            ("normalize", normalize),
            ("features_on_cpu", features_on_cpu),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        check_alpha_e(alpha_e)  # the estimator's own rule, checked now rather than at the first compute()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r} ({type(seed).__name__}).")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"`feature_dtype` must be torch.float32 or torch.float16, got {feature_dtype!r}; float16 halves the"
                " memory of the stored features."
            )
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
        if isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, int):
            raise TypeError(
                f"`max_memory_bytes` must be a positive int, got {max_memory_bytes!r}"
                f" ({type(max_memory_bytes).__name__}); the default is {DEFAULT_MAX_MEMORY_BYTES}."
            )
        if max_memory_bytes < 1:
            raise ValueError(
                f"`max_memory_bytes` must be a positive int, got {max_memory_bytes!r}; the default is"
                f" {DEFAULT_MAX_MEMORY_BYTES}."
            )
        self.reset_real_features = reset_real_features
        self.normalize = normalize
        self.alpha_e = float(alpha_e)
        self.seed = seed
        self.feature_dtype = feature_dtype
        self.features_on_cpu = features_on_cpu
        self.backend = backend
        self.max_memory_bytes = max_memory_bytes
        if feature is None:
            if weights is not None or feature_kwargs:
                raise ValueError(
                    "`weights` and `feature_kwargs` configure a feature extractor, but `feature` is None; pass"
                    " `feature=` or leave them out."
                )
            self.feature_extractor = None
        else:
            self.feature_extractor = get_feature_extractor(feature, weights=weights, **(feature_kwargs or {}))

        for prefix, _ in _KINDS:
            self.add_state(f"{prefix}_features", [], dist_reduce_fx="cat")
            self.add_state(f"{prefix}_indices", [], dist_reduce_fx="cat")
        if self.dist_sync_fn is None:
            self.dist_sync_fn = _gather_states

        self.last_result: IRSResult | None = None
        self._reference_index: ExactIndex | None = None
        self._reference_key: tuple[Any, ...] | None = None
        self._train_version = 0
        self._warned: set[str] = set()  # kinds whose duplicates were reported

    @override
    def update(
        self, imgs: Tensor, real: bool, held_out: bool = False, indices: Tensor | Sequence[int] | None = None
    ) -> None:
        """Extract features of a batch of images and add them to the real or generated set.

        Args:
            imgs: Images of shape (N, C, H, W), C in {1, 3}: uint8 in [0, 255], or floating in [0, 1] with
                `normalize=True`.
            real: True for real images, False for generated ones.
            held_out: With `real=True`, whether the images are held-out real images (queries for the adjusted score)
                rather than training images (the reference set).
            indices: Optional dataset index of every image, shape (N,); rows sharing an index are kept once after a
                distributed gather (see the class notes). Pass it with every update of a kind or with none.

        Raises:
            RuntimeError: If the metric was built with `feature=None`.
            TypeError: If `imgs` is not a tensor, its dtype does not match `normalize`, or `real`/`held_out` is not a
                bool.
            ValueError: If `imgs` is not 4-D with 1 or 3 channels, is empty, or is floating outside [0, 1]; if
                `held_out=True` with `real=False`; or if the feature width or `indices` do not fit earlier updates.
        """
        if self.feature_extractor is None:
            raise RuntimeError(
                "`update` needs a feature extractor, but `ImageRetrievalScore` was built with `feature=None`; pass"
                " precomputed features to `update_features`, or build it with `feature=` (e.g. 'pixels')."
            )
        kind = self._check_kind(real, held_out)
        self._check_images(imgs)
        features = self.feature_extractor(imgs)
        self._append(kind, features, indices, name="features computed by the extractor", copy=False)

    def update_features(
        self,
        features: Tensor,
        real: bool,
        held_out: bool = False,
        indices: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add precomputed features (for example SwAV or Inception embeddings) to the real or generated set.

        Args:
            features: Features of shape (N, D), floating point and finite, computed like every other update's.
            real: True for real images, False for generated ones.
            held_out: With `real=True`, whether the rows belong to held-out real images.
            indices: Optional dataset index of every row, shape (N,) (see `update`).

        Raises:
            TypeError: If `features` is not a floating-point tensor or array, or `real`/`held_out` is not a bool.
            ValueError: If `features` is not a finite 2-D matrix, its width differs from earlier updates, it overflows
                float16 storage, `held_out=True` with `real=False`, or `indices` do not fit.
        """
        kind = self._check_kind(real, held_out)
        # the same bookkeeping the base class wraps around `update`
        self._computed = None
        self._update_count += 1
        with torch.no_grad():
            self._append(kind, features, indices, name="`features`", copy=True)

    @override
    def compute(self) -> dict[str, Tensor]:
        """Retrieve the nearest training image of every generated image and estimate IRS.

        Returns:
            A dict of scalar tensors: `irs_alpha`, `irs_inf`, `irs_inf_lower`, `irs_inf_upper`, `n_train`,
            `n_samples`, `n_learned`, plus `irs_adjusted` and `irs_adjusted_std` when held-out images were given.

        Raises:
            RuntimeError: If no real training or no generated image was given, or only some processes passed
                `indices`.

        Note:
            Called before any `update`, torchmetrics' base class first warns that `compute` ran before `update`;
            the `RuntimeError` above follows, naming how many rows of each kind arrived. States restored with
            `load_state_dict` count as updated, so a restored metric computes without that warning.
        """
        rows = {prefix: self._gathered_rows(prefix, words) for prefix, words in _KINDS}
        train, generated, held_out = rows["train"], rows["generated"], rows["held_out"]
        counts = ", ".join(f"{_num_rows(rows[prefix])} {words}" for prefix, words in _KINDS)
        if train is None or generated is None:
            missing = "real training images (`real=True`)" if train is None else "generated images (`real=False`)"
            raise RuntimeError(
                f"`ImageRetrievalScore.compute()` needs at least one real training and one generated image, got"
                f" {counts}; add {missing} with `update` or `update_features` first."
            )
        result = image_retrieval_score(
            train,
            generated,
            held_out,
            alpha_e=self.alpha_e,
            seed=self.seed,
            backend=self.backend,
            max_memory_bytes=self.max_memory_bytes,
            index=self._index_for(train),
        )
        self.last_result = result
        estimate = result.synthetic
        scores = {
            "irs_alpha": estimate.irs_alpha,
            "irs_inf": estimate.irs_inf,
            "irs_inf_lower": estimate.irs_inf_lower,
            "irs_inf_upper": estimate.irs_inf_upper,
        }
        if result.irs_adjusted is not None:
            scores["irs_adjusted"] = result.irs_adjusted
            scores["irs_adjusted_std"] = result.irs_adjusted_std if result.irs_adjusted_std is not None else 0.0
        output = {key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in scores.items()}
        for key in ("n_train", "n_samples", "n_learned"):
            output[key] = torch.tensor(getattr(estimate, key), dtype=torch.int64, device=self.device)
        return output

    @override
    def reset(self) -> None:
        """Reset the states; keep the real features and the reference index if `reset_real_features` is False."""
        if self.reset_real_features:
            super().reset()
            self._invalidate_index()
            return
        kept = {
            name: list(getattr(self, name))
            for prefix in ("train", "held_out")
            for name in (f"{prefix}_features", f"{prefix}_indices")
        }
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    @override
    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate a batch exactly like `update`; return None, since IRS has no per-batch value."""
        self.update(*args, **kwargs)

    @override
    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge the states of another `ImageRetrievalScore` (or a state dict) into this one.

        The incoming rows are placed before this metric's own. Scores from all queries do not depend on the order,
        but the seeded held-out subsample of `irs_adjusted` does; with `indices` the rows are put in index order and
        the merged result equals one metric fed everything.

        Args:
            incoming_state: Another `ImageRetrievalScore`, or its `metric_state` dict.
        """
        super().merge_state(incoming_state)
        # the base class keeps the value computed before the merge
        self._computed = None
        self._invalidate_index()

    def plot(
        self,
        val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | Tensor | Sequence[Tensor] | None = None,
        ax: _AX_TYPE | None = None,
    ) -> _PLOT_OUT_TYPE:
        """Plot the scores of one `compute()` result, or a sequence of them as curves over evaluations.

        Counts (`n_train`, ...) and `irs_adjusted_std` are left out so that all plotted values share one axis. The
        axis spans [0, 1] with the optimum marked at 1, unless a value (an adjusted score) exceeds 1.

        Args:
            val: A result of `compute()`, a sequence of them, a single tensor or a sequence of tensors; None
                calls `compute()`.
            ax: A matplotlib axis to draw into; None creates a figure.

        Returns:
            The figure (None when `ax` was given) and the axis.

        Raises:
            ModuleNotFoundError: If matplotlib is not installed (checked before `compute()` runs).

        Example:
            >>> import torch
            >>> metric = ImageRetrievalScore(feature=None)
            >>> values = []
            >>> for step in range(3):
            ...     metric.update_features(torch.randn(40, 4), real=True)
            ...     metric.update_features(torch.randn(20, 4), real=False)
            ...     values.append(metric.compute())
            ...     metric.reset()
            >>> fig, ax = metric.plot(values)
            >>> sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_"))
            ['irs_alpha', 'irs_inf', 'irs_inf_lower', 'irs_inf_upper']
        """
        require(MATPLOTLIB_AVAILABLE, "matplotlib", "demo", "`ImageRetrievalScore.plot`")
        value = _plottable(val if val is not None else self.compute())
        upper = self.plot_upper_bound if _max_plotted(value) <= self.plot_upper_bound else None
        return plot_single_or_multi_val(
            value,
            ax=ax,
            higher_is_better=self.higher_is_better,
            name=type(self).__name__,
            lower_bound=self.plot_lower_bound,
            upper_bound=upper,
            legend_name=self.plot_legend_name,
        )

    @override
    def __getstate__(self) -> dict[str, Any]:
        # a faiss index cannot be pickled or deep-copied; the copy rebuilds it at its first compute()
        state = super().__getstate__()
        state["_reference_index"] = None
        state["_reference_key"] = None
        return state

    @override
    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> nn.Module:
        # moving the metric moves the training rows, so an index built on the old device is stale
        self._invalidate_index()
        converts_states = self._dtype_convert
        out = super()._apply(fn, exclude_state)
        if converts_states:
            # `set_dtype` casts every state; the rows keep `feature_dtype` and the dataset indices stay int64
            for prefix, _ in _KINDS:
                for name, dtype in ((f"{prefix}_features", self.feature_dtype), (f"{prefix}_indices", torch.int64)):
                    state = getattr(self, name)
                    if isinstance(state, list):
                        setattr(self, name, [value.to(dtype) for value in state])
                    else:
                        setattr(self, name, state.to(dtype))
        return out

    @override
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self._invalidate_index()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a value cached before the load belongs to the old rows
        self._computed = None
        # the base class counts `update` calls, which a load does not make; restored rows are updates all the same,
        # so `compute()` must not warn that it runs before `update`
        if any(_as_rows(getattr(self, f"{kind}_features")) is not None for kind, _ in _KINDS):
            self._update_count = max(self._update_count, 1)

    # ----------------------------------------------------------------------------------------------------------------
    # private helpers

    def _check_kind(self, real: Any, held_out: Any) -> str:
        for name, value in (("real", real), ("held_out", held_out)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        if held_out and not real:
            raise ValueError(
                "`held_out=True` marks real held-out images, so it needs `real=True`, got `real=False`; generated"
                " images are passed with `real=False` alone."
            )
        if not real:
            return "generated"
        return "held_out" if held_out else "train"

    def _check_images(self, imgs: Any) -> None:
        """Check the FID input conventions; the extractor checks rank, channels and range again on its side."""
        if not isinstance(imgs, Tensor):
            raise TypeError(f"`imgs` must be a torch.Tensor of shape (N, C, H, W), got {type(imgs).__name__}.")
        described = f"shape {tuple(imgs.shape)} and dtype {imgs.dtype}"
        if imgs.ndim != 4:
            remedy = "; add a batch dimension with `imgs.unsqueeze(0)`" if imgs.ndim == 3 else ""
            raise ValueError(f"`imgs` must be a 4-D batch of shape (N, C, H, W), got {described}{remedy}.")
        if imgs.shape[1] not in (1, 3):
            raise ValueError(
                f"`imgs` must have 1 (grayscale) or 3 (RGB) channels in dimension 1, got {described}; channels-last"
                " batches need `imgs.permute(0, 3, 1, 2)`."
            )
        if imgs.shape[0] == 0:
            raise ValueError(f"`imgs` must hold at least one image, got {described}.")
        if self.normalize:
            if imgs.dtype == torch.uint8:
                raise TypeError(
                    f"`imgs` must be floating in [0, 1] because `normalize=True`, got {described}; set"
                    " `normalize=False` for uint8 images in [0, 255]."
                )
            if not imgs.is_floating_point():
                raise TypeError(f"`imgs` must be floating in [0, 1] because `normalize=True`, got {described}.")
            low, high = float(imgs.min()), float(imgs.max())
            # NaN fails both comparisons and is reported here as well
            if not (low >= 0.0 and high <= 1.0):
                raise ValueError(
                    f"`imgs` must have values in [0, 1] because `normalize=True`, got values in [{low:.4g}, {high:.4g}]"
                    f" ({described}); divide images in [0, 255] by 255."
                )
        elif imgs.dtype != torch.uint8:
            remedy = "set `normalize=True` for float images in [0, 1]" if imgs.is_floating_point() else "convert them"
            raise TypeError(
                f"`imgs` must be uint8 in [0, 255] because `normalize=False`, got {described}; {remedy}, or pass"
                " `(imgs * 255).round().to(torch.uint8)`."
            )

    def _expected_width(self) -> int | None:
        for prefix, _ in _KINDS:
            rows = getattr(self, f"{prefix}_features")
            if isinstance(rows, list) and rows:
                return int(rows[0].shape[1])
            if isinstance(rows, Tensor) and rows.ndim == 2:
                return int(rows.shape[1])
        width = getattr(self.feature_extractor, "num_features", None)
        return width if isinstance(width, int) else None

    def _append(self, kind: str, features: Any, indices: Any, name: str, copy: bool) -> None:
        """Check one batch of feature rows and store it; `copy` keeps the stored rows apart from the caller's."""
        words = dict(_KINDS)[kind]
        features = validate_features("features", features)
        width = self._expected_width()
        if width is not None and features.shape[1] != width:
            raise ValueError(
                f"{name} must have {width} values per row like the earlier updates, got shape"
                f" {tuple(features.shape)}; use one feature extractor for all images, or call `reset()` (with"
                " `reset_real_features=True`) before changing it."
            )
        stored = features.to(device="cpu" if self.features_on_cpu else features.device, dtype=self.feature_dtype)
        if copy and stored.data_ptr() == features.data_ptr():
            # never keep a view of the caller's tensor: a reused buffer would silently change the stored rows
            stored = stored.clone()
        if self.feature_dtype == torch.float16 and not bool(torch.isfinite(stored).all()):
            raise ValueError(
                f"{name} must fit float16 storage (|x| <= 65504), got values up to {float(features.abs().max()):.4g};"
                " use `feature_dtype=torch.float32`."
            )
        index_rows = self._check_indices(kind, words, indices, features.shape[0])
        getattr(self, f"{kind}_features").append(stored)
        if index_rows is not None:
            getattr(self, f"{kind}_indices").append(index_rows)
        if kind == "train":
            self._train_version += 1

    def _check_indices(self, kind: str, words: str, indices: Any, num_rows: int) -> Tensor | None:
        has_rows = len(getattr(self, f"{kind}_features")) > 0
        had_indices = len(getattr(self, f"{kind}_indices")) > 0
        if has_rows and had_indices != (indices is not None):
            before = "with" if had_indices else "without"
            now = "without" if indices is None else "with"
            raise ValueError(
                f"`indices` must be passed with every update of the {words} images or with none: earlier updates"
                f" came {before} `indices`, this one {now}; call `reset()` to start over."
            )
        if indices is None:
            return None
        rows = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
        if rows.is_floating_point() or rows.dtype == torch.bool or rows.ndim != 1 or rows.shape[0] != num_rows:
            raise ValueError(
                f"`indices` must be a 1-D integer tensor with one dataset index per image ({num_rows}), got dtype"
                f" {rows.dtype} and shape {tuple(rows.shape)}."
            )
        return rows.to(device="cpu" if self.features_on_cpu else rows.device, dtype=torch.int64)

    def _gathered_rows(self, prefix: str, words: str) -> Tensor | None:
        """The (synced) rows of one kind as one tensor, with `indices` applied; None when there are none."""
        state = getattr(self, f"{prefix}_features")
        features = _as_rows(state)
        if features is None:
            return None
        if not self._is_synced and isinstance(state, list) and len(state) > 1:
            # keep one concatenated copy instead of the batches plus a copy per compute()
            setattr(self, f"{prefix}_features", [features])
            indices_state = getattr(self, f"{prefix}_indices")
            if len(indices_state) > 1:
                setattr(self, f"{prefix}_indices", [dim_zero_cat(indices_state)])
        indices = _as_rows(getattr(self, f"{prefix}_indices"))
        if indices is None:
            # only a gather across processes can add the sampler's repeats; one process pays nothing for the check
            duplicates = _count_duplicate_rows(features) if self._is_synced and prefix not in self._warned else 0
            if duplicates:
                self._warned.add(prefix)
                # frames up to the user: two warn helpers, the rank-zero wrapper, this method, compute, the base wrapper
                message = self._duplicate_message(words, duplicates, features.shape[0])
                rank_zero_warn(message, UserWarning, stacklevel=7)
        elif indices.shape[0] == features.shape[0]:
            features, _ = _first_row_per_index(features, indices.to(features.device))
        else:
            raise RuntimeError(
                f"`indices` were passed for {indices.shape[0]} of {features.shape[0]} {words} rows: some processes"
                " (or updates) passed `indices` and others did not; pass them everywhere or nowhere."
            )
        # one float32 copy for the search (none when stored in float32), shared by the index and the functional API
        device = torch.device("cpu") if self.features_on_cpu else features.device
        return features.to(device=device, dtype=torch.float32)

    @staticmethod
    def _duplicate_message(words: str, duplicates: int, total: int) -> str:
        if words == "generated":
            cause = (
                "If every process generates with the same seed, seed each one differently (for example seed + rank)."
            )
        else:
            cause = (
                "A DistributedSampler pads an uneven split by repeating images; those copies inflate `n_train` and"
                " are never retrieved, which biases IRS low."
            )
        return (
            f"`ImageRetrievalScore`: {duplicates} of {total} {words} feature rows are exact copies of another row."
            f" {cause} Pass the dataset indices as `indices=` to `update`/`update_features` so that copies are"
            " removed after the gather (and genuine duplicates with distinct indices are kept)."
        )

    def _index_for(self, train: Tensor) -> ExactIndex:
        """The exact index over the training rows, rebuilt only when they changed."""
        key = (self._train_version, int(train.shape[0]), train.device)
        if self._reference_index is None or self._reference_key != key:
            self._reference_index = ExactIndex(train, backend=self.backend, max_memory_bytes=self.max_memory_bytes)
            self._reference_key = key
        return self._reference_index

    def _invalidate_index(self) -> None:
        self._reference_index = None
        self._reference_key = None
        self._train_version += 1
