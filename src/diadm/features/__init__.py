# SPDX-License-Identifier: Apache-2.0
"""Feature extractors for IRS and DiADM, and the registry that finds them by name.

Every extractor takes images of shape (N, C, H, W) with C in {1, 3} (grayscale is repeated to RGB for the networks
that need it), either uint8 in [0, 255] or floating in [0, 1], and returns float32 features of shape
(N, num_features). Extractors stay in eval mode and run without grad.

- `"swav"`: torchvision ResNet-50 with the SwAV weights (`swav_800ep_pretrain.pth.tar`), 2048-d average pool;
  short side resized to 224 (bilinear, antialiased, aspect kept), ImageNet mean and std.
- `"inception"`: the FID Inception-v3 (`pt_inception-2015-12-05-6726825d.pth`), 2048-d pool; resized to 299 x 299
  with TensorFlow 1 bilinear resampling, then `(255 x - 128) / 128`.
- `"pixels"`: no network and no weights, C * H * W values in [0, 1]; resized to `size` x `size` (bilinear,
  antialiased) when `size` is given.
- `"dinov2"`: not implemented; wrap your own module.

Memory: a 2048-wide float32 feature row takes 8 KiB. The SwAV and Inception networks hold 90 and 91 MiB of float32
weights, and a forward pass on the CPU needs about 15 and 19 MiB more per image of the batch (measured as the peak
resident memory of a batch of 17 against a batch of 1, float32, channels-last); choose the batch size by that.

Example:
    >>> import torch
    >>> extractor = get_feature_extractor("pixels", size=2, grayscale=True)
    >>> extractor(torch.ones(3, 1, 8, 8)).shape
    torch.Size([3, 4])
    >>> [name in available_feature_extractors() for name in ("swav", "inception", "pixels")]
    [True, True, True]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from diadm.features.base import CallableFeatures, FeatureExtractor, extractor_fingerprint
from diadm.features.pixels import PixelFeatures

__all__ = [
    "CallableFeatures",
    "FeatureExtractor",
    "PixelFeatures",
    "available_feature_extractors",
    "extractor_fingerprint",
    "get_feature_extractor",
    "register_feature_extractor",
]

FeatureFactory = Callable[..., nn.Module]


def _pixels(weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    if weights is not None:
        raise ValueError(f"`pixels` features use no weights, so `weights` must be None, got {str(weights)!r}.")
    return PixelFeatures(**kwargs)


def _swav(weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    from diadm.features.swav import SwAVFeatures

    return SwAVFeatures(weights, **kwargs)


def _inception(weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    from diadm.features.inception import InceptionFeatures

    return InceptionFeatures(weights, **kwargs)


def _dinov2(weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    raise NotImplementedError(
        "`dinov2` features are not built into diadm: DINOv2's vision transformer is not part of torchvision, and"
        " diadm does not re-implement it. Load it yourself, for example with"
        " `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`, put its resize to a multiple of 14 and its"
        " ImageNet normalisation in front of it (it receives float images in [0, 1]), and pass that module as"
        " `feature=`; any nn.Module mapping images to (N, D) features is accepted."
    )


_REGISTRY: dict[str, FeatureFactory] = {"pixels": _pixels, "swav": _swav, "inception": _inception, "dinov2": _dinov2}


def available_feature_extractors() -> tuple[str, ...]:
    """The names `get_feature_extractor` accepts, sorted.

    `"dinov2"` is listed, but building it raises `NotImplementedError` naming what to use instead.
    """
    return tuple(sorted(_REGISTRY))


def register_feature_extractor(name: str, factory: FeatureFactory, *, overwrite: bool = False) -> None:
    """Make `get_feature_extractor(name, ...)` call `factory(weights=..., **kwargs)`.

    Args:
        name: The registry name.
        factory: A callable returning an `nn.Module` that maps (N, C, H, W) images to (N, D) features. It
            receives `weights=` only when the caller passes it, and every other keyword argument as given.
        overwrite: Whether to replace an existing entry.

    Raises:
        TypeError: If `name` is not a string or `factory` is not callable.
        ValueError: If `name` is empty or already registered and `overwrite` is False.

    Example:
        >>> register_feature_extractor("tiny_pixels", lambda: PixelFeatures(size=2, grayscale=True), overwrite=True)
        >>> get_feature_extractor("tiny_pixels").num_features
        4
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}.")
    if not name:
        raise ValueError("`name` must be a non-empty string, got ''.")
    if not callable(factory):
        raise TypeError(f"`factory` must be callable, got {type(factory).__name__}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"feature extractor {name!r} is already registered; pass `overwrite=True` to replace it.")
    _REGISTRY[name] = factory


def get_feature_extractor(
    feature: str | nn.Module | Callable[..., Any],
    *,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a feature extractor from a registry name, or wrap a module or callable.

    Args:
        feature: A name from `available_feature_extractors()`; a `FeatureExtractor` (returned as it is); or any
            `nn.Module` or callable mapping float images in [0, 1] of shape (N, C, H, W) to (N, D) features (wrapped
            in `CallableFeatures`, which takes `num_features=`, `example_shape=` and `name=` from `kwargs`).
        weights: A local path to the weights file of a named extractor; None looks in the torch hub cache.
        **kwargs: Passed to the extractor's constructor (for instance `size=` for `"pixels"`, `download=` or
            `pretrained=False` for `"swav"` and `"inception"`).

    Returns:
        The extractor, in eval mode.

    Raises:
        TypeError: If `feature` is neither a string nor callable.
        ValueError: If `feature` is an unknown name, or `weights`/`kwargs` are given with a module.
        NotImplementedError: For `"dinov2"`, with what to use instead.

    Example:
        >>> import torch
        >>> get_feature_extractor(torch.nn.Flatten(), num_features=12)(torch.zeros(2, 3, 2, 2)).shape
        torch.Size([2, 12])
    """
    if isinstance(feature, str):
        factory = _REGISTRY.get(feature)
        if factory is None:
            raise ValueError(
                f"`feature` must be one of {available_feature_extractors()} or an nn.Module, got {feature!r};"
                " register new names with `register_feature_extractor`."
            )
        return factory(**kwargs) if weights is None else factory(weights=weights, **kwargs)
    if isinstance(feature, FeatureExtractor):
        if weights is not None or kwargs:
            raise ValueError(
                f"`weights` and keyword arguments apply to named extractors only; got a ready {type(feature).__name__}"
                f" with weights={weights!r} and {sorted(kwargs)}. Configure it when you build it."
            )
        return feature
    if callable(feature):
        if weights is not None:
            raise ValueError(
                f"`weights` applies to named extractors only, got {str(weights)!r} with a {type(feature).__name__};"
                " load the weights into your module before passing it."
            )
        return CallableFeatures(feature, **kwargs)
    raise TypeError(
        f"`feature` must be an extractor name (str), an nn.Module or a callable, got {type(feature).__name__}."
    )
