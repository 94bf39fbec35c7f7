# SPDX-License-Identifier: Apache-2.0
"""Pixel features: the image itself, optionally resized, flattened. Needs no weights (the embedded default)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from diadm.features.base import FeatureExtractor, to_grayscale


class PixelFeatures(FeatureExtractor):
    """Use the pixels of an image, scaled to [0, 1] and flattened, as its feature vector.

    With `size`, every image is first resized to `size` x `size` (bilinear, antialiased,
    `align_corners=False`). With `grayscale`, RGB images are reduced to luma (ITU-R BT.601 weights, as PIL's "L"
    mode) and grayscale images pass unchanged. Values stay in [0, 1] (uint8 input is divided by 255), and the
    features of a (C, H, W) image are its C * H * W values in channel, row, column order.

    These are the features of the embedded demo (scikit-learn's 8x8 digits), where no pretrained network can be
    downloaded; Euclidean distance between them is the distance between images.

    Memory: a feature row holds C * H * W float32 values, 256 bytes for an 8x8 grayscale digit but 588 KiB for a
    224 x 224 RGB image (73 times a 2048-d SwAV row); pass `size` to keep the stored features and the search small.

    Args:
        size: The side of the square the images are resized to, or None to keep their size.
        grayscale: Whether to convert RGB input to one luma channel.

    Raises:
        TypeError: If `size` is not an int or None.
        ValueError: If `size` is not positive, or (at `forward`) a batch gives another width than the first one
            when the width was not fixed by `size` and `grayscale`.

    Note:
        `num_features` is `size * size` with `grayscale=True`. Otherwise the channel count (and, without `size`,
        the image size) is read from the first batch, and `num_features` is None until then.

    Example:
        >>> import torch
        >>> extractor = PixelFeatures(size=4, grayscale=True)
        >>> extractor.num_features
        16
        >>> imgs = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
        >>> extractor(imgs).sum(dim=1)
        tensor([16., 16.])
    """

    name = "pixels"

    def __init__(self, size: int | None = None, grayscale: bool = False) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise TypeError(f"`size` must be an int or None, got {type(size).__name__}.")
        if size is not None and size < 1:
            raise ValueError(f"`size` must be a positive integer or None, got {size}.")
        self.size = size
        self.grayscale = bool(grayscale)
        self.num_features = size * size if (size is not None and self.grayscale) else None

    @override
    def extract(self, imgs: Tensor) -> Tensor:
        if self.grayscale:
            imgs = to_grayscale(imgs)
        if self.size is not None and tuple(imgs.shape[-2:]) != (self.size, self.size):
            imgs = F.interpolate(
                imgs, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        features = imgs.flatten(start_dim=1)
        width = features.shape[1]
        if self.num_features is None:
            self.num_features = width
        elif width != self.num_features:
            raise ValueError(
                f"`pixels` features must keep the width of the first batch, {self.num_features}, got {width} from"
                f" images of shape {tuple(imgs.shape[1:])}; pass `size=` (and `grayscale=True`) to fix the width."
            )
        return features

    @override
    def config(self) -> dict[str, Any]:
        return {"size": self.size, "grayscale": self.grayscale}
