# SPDX-License-Identifier: Apache-2.0
"""The FID Inception-v3 and its 2048-d pool features, as torchmetrics and torch-fidelity compute them."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import inception
from typing_extensions import override

from diadm.features.base import PretrainedFeatures, to_rgb
from diadm.features.weights import WeightsFile, hash_prefix_from_name

# The TensorFlow Inception graph of 2015-12-05 that FID was defined with (Heusel et al., 2017), converted to PyTorch
# by pytorch-fid; torch-fidelity (and through it torchmetrics) publishes the same weights under another name.
_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS = WeightsFile(
    extractor="inception",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    filenames=_FILENAMES,
    sha256_prefix=hash_prefix_from_name(_FILENAMES[0]),
)
INPUT_SIZE = 299


def resize_bilinear_tf1(imgs: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x `tf.image.resize_bilinear` (align_corners=False, no half-pixel centers).

    Output pixel `i` samples the input at `i * in_size / out_size` (not at `(i + 0.5) * scale - 0.5` as
    `F.interpolate` does), with the scale and source positions in float32 and the right/bottom neighbour clamped to
    the edge. Rows are interpolated first, then columns, as TensorFlow does. This is the resize of the FID graph, so
    FID and DiADM features computed here match torch-fidelity's.

    Args:
        imgs: Floating images (N, C, H, W).
        size: The output (height, width).

    Returns:
        The resized images (N, C, *size), in the dtype of `imgs`.

    Example:
        >>> import torch
        >>> resize_bilinear_tf1(torch.tensor([[[[0.0, 1.0]]]]), (1, 4))
        tensor([[[[0.0000, 0.5000, 1.0000, 1.0000]]]])
    """

    def axis(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        source = torch.arange(out_size, dtype=torch.float32) * scale
        low = source.floor().to(torch.int64).clamp_(max=in_size - 1)
        high = (low + 1).clamp_(max=in_size - 1)
        return low.to(imgs.device), high.to(imgs.device), (source - low).to(device=imgs.device, dtype=imgs.dtype)

    low, high, frac = axis(imgs.shape[-1], size[1])
    left, right = imgs.index_select(-1, low), imgs.index_select(-1, high)
    imgs = left + (right - left) * frac
    low, high, frac = axis(imgs.shape[-2], size[0])
    top, bottom = imgs.index_select(-2, low), imgs.index_select(-2, high)
    return top + (bottom - top) * frac.view(-1, 1)


def _pool_without_padding(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


# The FID graph differs from torchvision's Inception-v3 in four blocks: the average pools of blocks A, C and E
# exclude the zero padding from the mean (`count_include_pad=False`), and the last block (Mixed_7c) max-pools where
# torchvision average-pools. Parameter names stay torchvision's, so the published state dict loads as it is.
class FIDInceptionA(inception.InceptionA):
    """torchvision's InceptionA with the FID graph's average pool, which ignores the padding."""

    @override
    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_pool_without_padding(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(inception.InceptionC):
    """torchvision's InceptionC with the FID graph's average pool, which ignores the padding."""

    @override
    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(_pool_without_padding(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class FIDInceptionE(inception.InceptionE):
    """torchvision's InceptionE with the FID graph's average pool (Mixed_7b), which ignores the padding."""

    def pool(self, x: Tensor) -> Tensor:
        """The pool of the fourth branch."""
        return _pool_without_padding(x)

    @override
    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))], dim=1)


class FIDInceptionEMaxPool(FIDInceptionE):
    """The last block of the FID graph (Mixed_7c): InceptionE with a 3 x 3 max pool in the fourth branch."""

    @override
    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def fid_inception_v3() -> torch.nn.Module:
    """Build the FID Inception-v3 (1008 classes, no auxiliary head) with random weights on torchvision's `Inception3`.

    Example:
        >>> net = fid_inception_v3()
        >>> net.fc.out_features, type(net.Mixed_7c).__name__
        (1008, 'FIDInceptionEMaxPool')
    """
    blocks = [
        inception.BasicConv2d,
        FIDInceptionA,
        inception.InceptionB,
        FIDInceptionC,
        inception.InceptionD,
        FIDInceptionE,
        inception.InceptionAux,
    ]
    network = inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
    network.Mixed_7c = FIDInceptionEMaxPool(2048)
    return network


class InceptionFeatures(PretrainedFeatures):
    """The 2048-d pool features of the FID Inception-v3, the network of FID and of the paper's DiADM conditioning.

    Images (N, C, H, W), uint8 in [0, 255] or floating in [0, 1], grayscale repeated to RGB, are scaled to
    [0, 255], resized to 299 x 299 with TensorFlow 1.x bilinear resampling (`resize_bilinear_tf1`), mapped to
    [-1, 1] by `(x - 128) / 128` and passed through the Inception-v3 of the 2015 TensorFlow graph up to its global
    average pool. This is what torch-fidelity's `FeatureExtractorInceptionV3` (and torchmetrics'
    `FrechetInceptionDistance`, which uses it) compute for the "2048" feature; a test compares the two on the same
    weights when torch-fidelity is installed.

    Memory: 23.9 million parameters (91 MiB in float32, frozen); a forward pass at 299 x 299 on the CPU needs about
    19 MiB per image of the batch on top (peak resident memory, float32, channels-last). Each output row is 2048
    float32 values, 8 KiB.

    Args:
        weights: A local path to `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) or
            `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity, the same weights), or None to use the torch
            hub cache, where torchmetrics also puts it (and download when allowed, see `diadm.features.weights`).
        **kwargs: `pretrained`, `download`, `sha256`, `channels_last` and `autocast_dtype`, as in
            `PretrainedFeatures`.

    Raises:
        ValueError: If the checkpoint does not fit the network or its SHA-256 does not start with `6726825d`.
        FileNotFoundError: If the weights are neither given, nor cached, nor downloadable.

    Note:
        Only the SHA-256 prefix `6726825d` that the published file name carries (the torch hub convention) is
        checked; the full digest is recorded by `extractor_fingerprint`. Floating input is scaled by 255 without
        rounding, whereas torchmetrics' `normalize=True` truncates to uint8 first (`(imgs * 255).byte()`); pass
        uint8 images to reproduce torchmetrics exactly.

    Example:
        >>> import torch
        >>> extractor = InceptionFeatures(pretrained=False)  # random weights: no file needed
        >>> extractor.num_features, tuple(extractor.preprocess(torch.zeros(1, 1, 16, 16)).shape)
        (2048, (1, 3, 299, 299))
    """

    name = "inception"
    weights_file = INCEPTION_WEIGHTS

    def __init__(self, weights: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(fid_inception_v3(), weights, **kwargs)
        self.num_features = 2048

    @override
    def preprocess(self, imgs: Tensor) -> Tensor:
        imgs = to_rgb(imgs) * 255.0
        if tuple(imgs.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            imgs = resize_bilinear_tf1(imgs, (INPUT_SIZE, INPUT_SIZE))
        return (imgs - 128.0) / 128.0

    @override
    def features(self, inputs: Tensor) -> Tensor:
        net: Any = self.network
        x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(inputs)))  # N x 64 x 147 x 147
        x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(net.maxpool1(x)))  # N x 192 x 71 x 71
        x = net.maxpool2(x)  # N x 192 x 35 x 35
        for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(net, block)(x)  # ends at N x 768 x 17 x 17
        x = net.Mixed_7c(net.Mixed_7b(net.Mixed_7a(x)))  # N x 2048 x 8 x 8
        return torch.flatten(net.avgpool(x), 1)  # N x 2048
