# SPDX-License-Identifier: Apache-2.0
"""The common interface of feature extractors: input checks, eval-only inference, float32 output."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from diadm.features.weights import WeightsFile, load_state_dict, resolve_weights

# Luma weights of ITU-R BT.601, the ones PIL's "L" conversion uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_ALLOWED_CHANNELS = (1, 3)


def _describe(imgs: Tensor) -> str:
    return f"shape {tuple(imgs.shape)} and dtype {imgs.dtype}"


def to_unit_float(imgs: Any, name: str = "imgs") -> Tensor:
    """Check a batch of images and return it as float32 in [0, 1].

    Args:
        imgs: A tensor of shape (N, C, H, W) with C in {1, 3}: uint8 in [0, 255], or floating in [0, 1].
        name: The argument name used in error messages.

    Returns:
        A float32 tensor of the same shape and device, with values in [0, 1].

    Raises:
        TypeError: If `imgs` is not a tensor, or its dtype is neither uint8 nor floating.
        ValueError: If `imgs` is not 4-D, has a channel count other than 1 or 3, or is a floating tensor with values
            outside [0, 1] (NaN included).

    Example:
        >>> import torch
        >>> to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3))
        tensor([[[[0.0000, 0.2000, 1.0000]]]])
    """
    if not isinstance(imgs, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, C, H, W), got {type(imgs).__name__}.")
    if imgs.ndim != 4:
        raise ValueError(
            f"`{name}` must have shape (N, C, H, W), got {_describe(imgs)}; add a batch dimension with `unsqueeze(0)`"
            " for a single image."
        )
    if imgs.shape[1] not in _ALLOWED_CHANNELS:
        raise ValueError(
            f"`{name}` must have 1 (grayscale) or 3 (RGB) channels in dimension 1, got {_describe(imgs)};"
            " channels-last images need `permute(0, 3, 1, 2)`."
        )
    if imgs.dtype == torch.uint8:
        return imgs.to(torch.float32) / 255.0
    if not imgs.is_floating_point():
        raise TypeError(
            f"`{name}` must be uint8 in [0, 255] or floating in [0, 1], got {_describe(imgs)}; convert with"
            " `.to(torch.uint8)` or `.float() / 255`."
        )
    imgs = imgs.to(torch.float32)
    if imgs.numel() > 0:
        low, high = (value.item() for value in torch.aminmax(imgs))
        # NaN fails both comparisons, so it is reported here too.
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(
                f"floating `{name}` must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]"
                f" ({_describe(imgs)}); divide images in [0, 255] by 255, or pass them as uint8."
            )
    return imgs


def to_rgb(imgs: Tensor) -> Tensor:
    """Repeat a grayscale batch (N, 1, H, W) to three channels; return an RGB batch unchanged."""
    return imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs


def to_grayscale(imgs: Tensor) -> Tensor:
    """Convert an RGB batch (N, 3, H, W) to luma (N, 1, H, W) with BT.601 weights; return grayscale unchanged."""
    if imgs.shape[1] == 1:
        return imgs
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=imgs.dtype, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * weights).sum(dim=1, keepdim=True)


def _qualified_name(obj: Any) -> str:
    if isinstance(obj, type):
        kind = obj
    elif isinstance(obj, nn.Module) or not hasattr(obj, "__qualname__"):
        kind = type(obj)
    else:  # a function or another object with its own qualified name
        kind = obj
    return f"{kind.__module__}.{kind.__qualname__}"


def _state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) of a module."""
    hasher = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        hasher.update(f"{key};{data.dtype};{tuple(data.shape)};".encode())
        if data.numel():
            hasher.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


class FeatureExtractor(nn.Module):
    """Base class of the feature extractors: checks the input, runs the network in eval mode without grad.

    A subclass sets `name` and `num_features` and implements `extract`, which receives float32 images in [0, 1] of
    shape (N, C, H, W), C in {1, 3}, on the extractor's device, and returns (N, num_features) features. `forward`
    does the rest: it checks the rank, channel count, dtype and value range of its input, converts uint8 in
    [0, 255] to [0, 1], moves the batch to the extractor's device, runs `extract` under `torch.inference_mode` and
    returns float32 features that are ordinary tensors (usable later in autograd, e.g. as conditioning inputs).
    When the extractor's parameters were cast (`.to(torch.float64)`, `.half()`, a Lightning "16-true" precision),
    the network runs in their dtype: preprocessing stays in float32 and its result is cast just before the network.

    The extractor never leaves eval mode: `train()` keeps every submodule in eval mode, so batch-norm statistics
    and dropout cannot change the features, even when the extractor sits inside a LightningModule whose
    `train()` is called each epoch. Parameters are frozen (`requires_grad=False`).

    Attributes:
        name: The registry name of the extractor (for messages and cache keys).
        num_features: The width of the output, or None while it depends on the first batch (only `PixelFeatures`
            without `size` or `grayscale`).

    Example:
        >>> import torch
        >>> class MeanColour(FeatureExtractor):
        ...     name, num_features = "mean_colour", 1
        ...     def extract(self, imgs):
        ...         return imgs.mean(dim=(1, 2, 3)).unsqueeze(1)
        >>> MeanColour()(torch.full((2, 1, 4, 4), 51, dtype=torch.uint8))
        tensor([[0.2000],
                [0.2000]])
    """

    name: str = "feature_extractor"
    num_features: int | None = None

    def __init__(self) -> None:
        super().__init__()
        super().train(False)

    def extract(self, imgs: Tensor) -> Tensor:
        """Compute features of a checked batch.

        Args:
            imgs: float32 images in [0, 1], shape (N, C, H, W), C in {1, 3}, on the extractor's device.

        Returns:
            Features of shape (N, num_features).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `extract(imgs)`.")

    def config(self) -> dict[str, Any]:
        """The settings that change the features, as JSON-serialisable values (used by `extractor_fingerprint`)."""
        return {}

    def weights_sha256(self) -> str | None:
        """The SHA-256 of the weights, for `extractor_fingerprint`.

        Returns:
            The digest of the loaded weights file, `"random:<digest of the parameters>"` for random weights, or
            None when the extractor has no weights.
        """
        return None

    def _device(self) -> torch.device | None:
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return None

    def _parameter_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point parameter (changed by `.to(dtype)` or `.half()`), or None."""
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return None

    @override
    def forward(self, imgs: Tensor) -> Tensor:
        """Extract features of a batch of images.

        Args:
            imgs: (N, C, H, W), C in {1, 3}; uint8 in [0, 255] or floating in [0, 1].

        Returns:
            float32 features of shape (N, num_features).

        Raises:
            TypeError: If `imgs` is not a tensor, or is neither uint8 nor floating.
            ValueError: If `imgs` has the wrong rank, channel count or value range.
        """
        imgs = to_unit_float(imgs)
        device = self._device()
        if device is not None:
            imgs = imgs.to(device)
        with torch.inference_mode():
            features = self.extract(imgs).to(torch.float32)
        # A clone made outside inference mode is an ordinary tensor, so callers may feed it to autograd.
        return features.clone()

    @override
    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the extractor in eval mode whatever `mode` is, so its features never depend on training state."""
        return super().train(False)

    @override
    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config().items())


class CallableFeatures(FeatureExtractor):
    """Wrap a user `nn.Module` or callable as a feature extractor.

    The wrapped object receives float32 images in [0, 1] of shape (N, C, H, W) exactly as the caller passed them
    (uint8 input is divided by 255; no resize, no channel repeat and no normalisation are applied, so include them
    in the module if the network needs them) and must return a tensor of shape (N, D). A module is put in eval mode
    and frozen. The width `D` is read from `num_features`, from a `num_features` attribute of the module, or from
    one forward pass of zeros of shape (1, *example_shape).

    Args:
        fn: The module or callable mapping images to features.
        num_features: The output width `D`, when known.
        example_shape: The (C, H, W) of the dummy batch used to discover `D` when it is not given.
        name: A name for messages and fingerprints; defaults to the class name of `fn`.

    Raises:
        TypeError: If `fn` is not callable, or `num_features` is not an int.
        ValueError: If `num_features` is not positive, or the dummy forward pass fails or returns no (1, D) tensor.

    Example:
        >>> import torch
        >>> wrapped = CallableFeatures(torch.nn.Flatten(), example_shape=(1, 4, 4))
        >>> wrapped.num_features
        16
        >>> wrapped(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)).sum().item()
        32.0
    """

    def __init__(
        self,
        fn: nn.Module | Callable[[Tensor], Tensor],
        *,
        num_features: int | None = None,
        example_shape: tuple[int, int, int] = (3, 224, 224),
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"`feature` must be an nn.Module or a callable, got {type(fn).__name__}.")
        if isinstance(fn, nn.Module):
            fn.eval()
            fn.requires_grad_(False)
            self.module: nn.Module | None = fn
            self._fn: Callable[[Tensor], Tensor] | None = None
        else:
            self.module = None
            self._fn = fn
        self.name = name if name is not None else type(fn).__name__
        if num_features is None:
            num_features = getattr(fn, "num_features", None)
        if num_features is None:
            num_features = self._discover_width(example_shape)
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"`num_features` must be an int, got {type(num_features).__name__}.")
        if num_features < 1:
            raise ValueError(f"`num_features` must be a positive integer, got {num_features}.")
        self.num_features = num_features

    def _call(self, imgs: Tensor) -> Tensor:
        fn = self.module if self.module is not None else self._fn
        assert fn is not None  # one of the two is always set in __init__
        dtype = self._parameter_dtype()
        out = fn(imgs if dtype is None else imgs.to(dtype))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the wrapped feature extractor `{self.name}` must return a tensor, got {type(out).__name__}."
            )
        if out.ndim != 2 or out.shape[0] != imgs.shape[0]:
            raise ValueError(
                f"the wrapped feature extractor `{self.name}` must return features of shape (N, D) with"
                f" N = {imgs.shape[0]}, got shape {tuple(out.shape)}; flatten or pool its output."
            )
        return out

    def _discover_width(self, example_shape: tuple[int, int, int]) -> int:
        device = self._device()
        dummy = torch.zeros((1, *example_shape), device=device)
        try:
            with torch.inference_mode():
                out = self._call(dummy)
        except Exception as err:
            raise ValueError(
                f"could not discover the output width of the wrapped feature extractor `{self.name}` from a dummy"
                f" batch of shape {tuple(dummy.shape)}: {err}. Pass `num_features=` or an `example_shape=` it accepts."
            ) from err
        return int(out.shape[1])

    @override
    def extract(self, imgs: Tensor) -> Tensor:
        return self._call(imgs)

    @override
    def config(self) -> dict[str, Any]:
        return {"wrapped": _qualified_name(self.module or self._fn), "num_features": self.num_features}

    @override
    def weights_sha256(self) -> str | None:
        return None if self.module is None else _state_digest(self.module)


def extractor_fingerprint(extractor: nn.Module | Callable[..., Any]) -> str:
    """A short string that changes whenever the features an extractor computes can change.

    It combines the class, the settings that affect the output (`config()`) and the SHA-256 of the weights (of
    the weights file, or of the parameters and buffers of a wrapped module), and is safe as a file name. Use it as
    part of the key of a feature cache, so that features computed with other weights or another resize are never
    mixed up.

    Args:
        extractor: A `FeatureExtractor`, or a module or callable (identified by its class or qualified name and,
            for a module, the digest of its state dict).

    Returns:
        `"<name>-<24 hex digits>"`.

    Raises:
        TypeError: If `extractor` is not callable.

    Example:
        >>> from diadm.features import PixelFeatures
        >>> extractor_fingerprint(PixelFeatures(size=8)) == extractor_fingerprint(PixelFeatures(size=8))
        True
        >>> extractor_fingerprint(PixelFeatures(size=8)) == extractor_fingerprint(PixelFeatures(size=4))
        False
        >>> extractor_fingerprint(PixelFeatures(size=8))[:7]
        'pixels-'
    """
    if isinstance(extractor, FeatureExtractor):
        name = extractor.name
        payload = {
            "class": _qualified_name(extractor),
            "config": extractor.config(),
            "weights_sha256": extractor.weights_sha256(),
        }
    elif callable(extractor):
        name = type(extractor).__name__ if isinstance(extractor, nn.Module) else "callable"
        digest = _state_digest(extractor) if isinstance(extractor, nn.Module) else None
        payload = {"class": _qualified_name(CallableFeatures), "config": {"wrapped": _qualified_name(extractor)}}
        payload["weights_sha256"] = digest
    else:
        raise TypeError(f"`extractor` must be an nn.Module or a callable, got {type(extractor).__name__}.")
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "features"
    return f"{safe_name}-{digest[:24]}"


class PretrainedFeatures(FeatureExtractor):
    """Shared machinery of the extractors built on a published network: weights, memory format and precision.

    A subclass gives the network, the published `weights_file`, `adapt_state_dict` (key renames of the published
    checkpoint), `preprocess` (resize and normalisation of images in [0, 1]) and `features` (the forward pass up to
    the pooled features).

    Args:
        network: The network, with random weights.
        weights: A local path to the weights file, or None to use the torch hub cache (see `diadm.features.weights`).
        pretrained: Whether to load the published weights; False keeps the random weights (for tests and timing).
        download: Whether a missing file may be downloaded: True, False, or None for "unless `HF_HUB_OFFLINE` or
            `DIADM_OFFLINE` is set".
        sha256: The SHA-256 (or its start) the weights file must have instead of the published one, for a
            checkpoint of the same architecture made elsewhere.
        channels_last: Whether to run the convolutions in channels-last memory format (faster with oneDNN on CPU
            and with cuDNN on GPU; the features agree with the default format to float32 rounding).
        autocast_dtype: A dtype such as `torch.bfloat16` to run the network under `torch.autocast`, or None for
            float32 throughout. Lower precision moves the features (see the benchmark) and is meant for a GPU.

    Raises:
        TypeError: If `autocast_dtype` is not a torch.dtype.
        ValueError: If `weights` or `sha256` is given with `pretrained=False`, or the checkpoint does not fit the
            network, or its SHA-256 does not match.
        FileNotFoundError: If the weights file is neither given, nor cached, nor downloadable.

    Example:
        >>> import torch
        >>> class TinyFeatures(PretrainedFeatures):
        ...     name, num_features = "tiny", 4
        ...     weights_file = WeightsFile("tiny", "https://example.invalid/tiny-00ff.pt", ("tiny-00ff.pt",))
        ...     def preprocess(self, imgs):
        ...         return imgs * 2 - 1
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> TinyFeatures(net, pretrained=False)(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 4])
    """

    weights_file: WeightsFile

    def __init__(
        self,
        network: nn.Module,
        weights: str | os.PathLike | None = None,
        *,
        pretrained: bool = True,
        download: bool | None = None,
        sha256: str | None = None,
        channels_last: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not pretrained and (weights is not None or sha256 is not None):
            raise ValueError(
                f"`weights` and `sha256` select a weights file, so they need `pretrained=True`; got weights={weights!r}"
                f" and sha256={sha256!r} with `pretrained=False`."
            )
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"`autocast_dtype` must be a torch.dtype or None, got {type(autocast_dtype).__name__}.")
        self.network = network
        self.pretrained = bool(pretrained)
        self.channels_last = bool(channels_last)
        self.autocast_dtype = autocast_dtype
        self.weights_path: Path | None = None
        self._sha256: str | None = None
        if self.pretrained:
            path, self._sha256 = resolve_weights(self.weights_file, weights, download=download, sha256=sha256)
            self._load(path)
            self.weights_path = path
        network.requires_grad_(False)
        network.eval()
        if self.channels_last:
            network.to(memory_format=torch.channels_last)

    def _load(self, path: Path) -> None:
        state = self.adapt_state_dict(load_state_dict(path, self.name))
        expected = self.network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"`{self.name}` weights file {str(path)!r} must hold the weights of {type(self.network).__name__},"
                f" got {len(missing)} missing keys {missing[:4]} and {len(unexpected)} unexpected keys"
                f" {unexpected[:4]}; pass the published file {self.weights_file.url}."
            )
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"`{self.name}` weights file {str(path)!r} does not fit the network: {err}") from err

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename or drop keys of the published checkpoint so that they match `self.network`."""
        return state

    def preprocess(self, imgs: Tensor) -> Tensor:
        """Map checked images in [0, 1] to the network's input (resize, channels, normalisation)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `preprocess(imgs)`.")

    def features(self, inputs: Tensor) -> Tensor:
        """Run the network on preprocessed inputs and return the pooled (N, num_features) features."""
        return self.network(inputs)

    @override
    def extract(self, imgs: Tensor) -> Tensor:
        inputs = self.preprocess(imgs)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            # a network cast to another dtype takes its input in that dtype (resizing stays in float32, which the
            # antialiased CPU resize needs)
            dtype = self._parameter_dtype()
            return self.features(inputs if dtype is None else inputs.to(dtype))
        with torch.autocast(device_type=inputs.device.type, dtype=self.autocast_dtype):
            return self.features(inputs).float()

    @override
    def config(self) -> dict[str, Any]:
        return {"autocast_dtype": str(self.autocast_dtype) if self.autocast_dtype else None}

    @override
    def weights_sha256(self) -> str | None:
        return self._sha256 if self.pretrained else "random:" + _state_digest(self.network)
