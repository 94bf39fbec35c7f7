# SPDX-License-Identifier: Apache-2.0
"""SwAV ResNet-50 average-pool features, the paper's recommended features for IRS (2048-d)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from diadm.features.base import PretrainedFeatures, to_rgb
from diadm.features.weights import WeightsFile

# Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020: the
# 800-epoch ResNet-50 checkpoint of facebookresearch/swav. Its name carries no hash and no digest is published.
SWAV_WEIGHTS = WeightsFile(
    extractor="swav",
    url="https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
    filenames=("swav_800ep_pretrain.pth.tar",),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys of the SwAV training checkpoint that are not part of the ResNet-50 trunk.
_HEAD_PREFIXES = ("projection_head.", "prototypes.", "fc.")


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) after resizing the short side to `size`, with torchvision's `Resize(int)` rounding.

    Example:
        >>> short_side_size(480, 640, 224)
        (224, 298)
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


class SwAVFeatures(PretrainedFeatures):
    """Average-pool features (2048-d) of a ResNet-50 trained with SwAV, as the paper uses for IRS.

    Images (N, C, H, W), uint8 in [0, 255] or floating in [0, 1], grayscale repeated to RGB, are resized so that
    their short side is `size` (bilinear, antialiased, aspect ratio kept, torchvision's `Resize(size)` rounding),
    optionally center-cropped to `size` x `size`, normalised with the ImageNet mean and std, and passed through the
    torchvision ResNet-50 trunk without its classifier. The output is the 2048-d average-pool vector, not
    L2-normalised (IRS uses the Euclidean distance on raw features).

    The network is torchvision's `resnet50` with the published checkpoint `swav_800ep_pretrain.pth.tar`, whose keys
    carry a `module.` prefix (it was saved from DistributedDataParallel) and include the projection head and the
    prototypes; the prefix is removed and the head dropped.

    Memory: 23.5 million parameters (90 MiB in float32, frozen); a forward pass at 224 on the CPU needs about
    15 MiB per image of the batch on top (peak resident memory, float32, channels-last). Each output row is 2048
    float32 values, 8 KiB.

    Args:
        weights: A local path to `swav_800ep_pretrain.pth.tar`, or None to use the torch hub cache (and download
            when allowed, see `diadm.features.weights`).
        size: The short side the images are resized to. The paper resizes to 224.
        center_crop: Whether to crop the resized image to `size` x `size` (the usual ImageNet evaluation). Off by
            default: the paper resizes without cropping, so the whole image is seen; square images are the same
            either way.
        **kwargs: `pretrained`, `download`, `sha256`, `channels_last` and `autocast_dtype`, as in
            `PretrainedFeatures`.

    Raises:
        TypeError: If `size` is not an int.
        ValueError: If `size` is not positive; see also `PretrainedFeatures`.
        FileNotFoundError: If the weights are neither given, nor cached, nor downloadable.

    Warning:
        The published file name carries no hash and facebookresearch/swav publishes no digest, so the file's SHA-256
        is not checked unless you pass `sha256=`. It is still computed and recorded by `extractor_fingerprint`, and
        the checkpoint must have exactly the keys of the ResNet-50 trunk.

    Example:
        >>> import torch
        >>> extractor = SwAVFeatures(pretrained=False, size=32)  # random weights: no file needed
        >>> extractor(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape
        torch.Size([2, 2048])
    """

    name = "swav"
    weights_file = SWAV_WEIGHTS

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        size: int = 224,
        center_crop: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"`size` must be an int, got {type(size).__name__}.")
        if size < 1:
            raise ValueError(f"`size` must be a positive integer, got {size}.")
        from torchvision.models import resnet50

        network = resnet50(weights=None)
        network.fc = nn.Identity()
        super().__init__(network, weights, **kwargs)
        self.size = size
        self.center_crop = bool(center_crop)
        self.num_features = 2048
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @override
    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {key.removeprefix("module."): value for key, value in state.items()}
        return {key: value for key, value in state.items() if not key.startswith(_HEAD_PREFIXES)}

    @override
    def preprocess(self, imgs: Tensor) -> Tensor:
        imgs = to_rgb(imgs)
        height, width = short_side_size(imgs.shape[-2], imgs.shape[-1], self.size)
        if (height, width) != tuple(imgs.shape[-2:]):
            imgs = F.interpolate(imgs, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        if self.center_crop:
            # torchvision's center_crop offsets: round((side - size) / 2).
            top, left = round((height - self.size) / 2), round((width - self.size) / 2)
            imgs = imgs[..., top : top + self.size, left : left + self.size]
        return (imgs - self.mean) / self.std

    @override
    def config(self) -> dict[str, Any]:
        return {"size": self.size, "center_crop": self.center_crop, **super().config()}
