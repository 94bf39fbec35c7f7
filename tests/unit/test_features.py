# SPDX-License-Identifier: Apache-2.0
"""Tests of diadm.features: registry, input checks, pixel features, weights resolution, SwAV and Inception."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from diadm.features import (
    CallableFeatures,
    FeatureExtractor,
    PixelFeatures,
    available_feature_extractors,
    extractor_fingerprint,
    get_feature_extractor,
    register_feature_extractor,
)
from diadm.features.base import to_unit_float


def _uint8_images(n: int, c: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    ("imgs", "error", "message"),
    [
        pytest.param([[0.0]], TypeError, "`imgs` must be a torch.Tensor of shape (N, C, H, W), got list.", id="list"),
        pytest.param(
            torch.zeros(3, 8, 8),
            ValueError,
            "`imgs` must have shape (N, C, H, W), got shape (3, 8, 8) and dtype torch.float32;",
            id="rank3",
        ),
        pytest.param(
            torch.zeros(2, 4, 8, 8),
            ValueError,
            "`imgs` must have 1 (grayscale) or 3 (RGB) channels in dimension 1, got shape (2, 4, 8, 8)",
            id="four-channels",
        ),
        pytest.param(
            torch.zeros(2, 3, 8, 8, dtype=torch.int64),
            TypeError,
            "`imgs` must be uint8 in [0, 255] or floating in [0, 1], got shape (2, 3, 8, 8) and dtype torch.int64",
            id="int64",
        ),
        pytest.param(
            torch.full((1, 3, 2, 2), 255.0),
            ValueError,
            "floating `imgs` must have values in [0, 1], got values in [255, 255]",
            id="float-in-0-255",
        ),
        pytest.param(
            torch.full((1, 1, 2, 2), float("nan")),
            ValueError,
            "floating `imgs` must have values in [0, 1], got values in [nan, nan]",
            id="nan",
        ),
    ],
)
def test_bad_input_is_rejected_with_its_description(imgs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        PixelFeatures()(imgs)


def test_uint8_and_float_inputs_agree():
    imgs = _uint8_images(3, 3, 5, 5)
    expected = imgs.double().numpy().reshape(3, -1) / 255.0
    extractor = PixelFeatures()
    from_uint8 = extractor(imgs)
    from_float = extractor(imgs.float() / 255.0)
    assert from_uint8.dtype == torch.float32
    # float32 division by 255 is correctly rounded, so both paths give the nearest float32 of k / 255.
    np.testing.assert_allclose(from_uint8.numpy(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=0)


def test_to_unit_float_does_not_change_its_input():
    imgs = torch.rand(2, 3, 4, 4)
    before = imgs.clone()
    PixelFeatures(size=2)(imgs)
    torch.testing.assert_close(imgs, before, rtol=0, atol=0)
    assert to_unit_float(imgs).dtype == torch.float32


# ----------------------------------------------------------------------------------------------- pixel features
def test_pixels_flatten_in_channel_row_column_order():
    imgs = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) / 23.0
    features = PixelFeatures()(imgs)
    np.testing.assert_array_equal(features.numpy(), imgs.numpy().reshape(2, 12))


def test_pixels_resize_matches_torchvision_in_float64():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    imgs = torch.rand(2, 3, 9, 7)
    features = PixelFeatures(size=4)(imgs)
    reference = tvf.resize(imgs.double(), [4, 4], interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)
    # float32 against float64 resampling of values in [0, 1]: rounding only.
    np.testing.assert_allclose(features.numpy(), reference.flatten(1).numpy(), rtol=0, atol=1e-6)


def test_pixels_grayscale_uses_bt601_luma():
    imgs = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    luma = 0.299 * imgs[:, 0] + 0.587 * imgs[:, 1] + 0.114 * imgs[:, 2]
    features = PixelFeatures(grayscale=True)(imgs.float())
    np.testing.assert_allclose(features.numpy(), luma.flatten(1).numpy(), rtol=0, atol=1e-6)


def test_pixels_width_known_from_size_and_grayscale_else_from_first_batch():
    assert PixelFeatures(size=8, grayscale=True).num_features == 64
    extractor = PixelFeatures(size=8)
    assert extractor.num_features is None
    assert extractor(torch.zeros(1, 3, 16, 16)).shape == (1, 192)
    assert extractor.num_features == 192
    with pytest.raises(ValueError, match=re.escape("`pixels` features must keep the width of the first batch, 192")):
        extractor(torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"size": 0}, ValueError, "`size` must be a positive integer or None, got 0.", id="zero"),
        pytest.param({"size": 2.5}, TypeError, "`size` must be an int or None, got float.", id="float"),
        pytest.param({"size": True}, TypeError, "`size` must be an int or None, got bool.", id="bool"),
    ],
)
def test_pixels_rejects_bad_size(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        PixelFeatures(**kwargs)


def test_empty_batch_gives_empty_features():
    assert PixelFeatures(size=2, grayscale=True)(torch.zeros(0, 1, 4, 4)).shape == (0, 4)


# ----------------------------------------------------------------------------------------------- eval mode, grad
class _Scale(nn.Module):
    """A module that would behave differently in training mode (dropout), to catch a switch to training."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 5)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(x.flatten(1)))


def test_wrapped_module_stays_in_eval_mode_and_gives_plain_tensors():
    extractor = get_feature_extractor(_Scale(), example_shape=(3, 2, 2))
    assert isinstance(extractor, CallableFeatures)
    assert extractor.num_features == 5
    parent = nn.Sequential(extractor)
    parent.train()
    assert [module.training for module in extractor.modules()] == [False] * len(list(extractor.modules()))
    imgs = torch.rand(4, 3, 2, 2)
    first, second = extractor(imgs), extractor(imgs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout off: deterministic
    assert not first.requires_grad
    assert not any(p.requires_grad for p in extractor.parameters())
    # The output is an ordinary tensor (not an inference tensor), so it can enter autograd as an input.
    weight = torch.ones(5, requires_grad=True)
    (first * weight).sum().backward()
    np.testing.assert_allclose(weight.grad.numpy(), first.sum(0).numpy(), rtol=1e-6)


def test_wrapped_callable_width_from_attribute_or_argument():
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    fn.num_features = 3
    assert get_feature_extractor(fn).num_features == 3
    assert CallableFeatures(fn, num_features=7).num_features == 7


def test_wrapped_module_errors():
    with pytest.raises(ValueError, match=re.escape("could not discover the output width of the wrapped feature")):
        CallableFeatures(nn.Linear(5, 2))
    with pytest.raises(ValueError, match=re.escape("must return features of shape (N, D) with N = 2, got shape")):
        CallableFeatures(nn.Identity(), num_features=3)(torch.zeros(2, 3, 1, 1))
    with pytest.raises(TypeError, match=re.escape("`feature` must be an extractor name (str), an nn.Module or a")):
        get_feature_extractor(3)
    with pytest.raises(ValueError, match=re.escape("`weights` applies to named extractors only, got 'w.pth'")):
        get_feature_extractor(nn.Flatten(), weights="w.pth")


# ----------------------------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    assert {"pixels", "swav", "inception", "dinov2"} <= set(available_feature_extractors())
    with pytest.raises(ValueError, match=re.escape("`feature` must be one of ('dinov2', 'inception', 'pixels'")):
        get_feature_extractor("vgg")
    with pytest.raises(ValueError, match=re.escape("`pixels` features use no weights, so `weights` must be None")):
        get_feature_extractor("pixels", weights="x.pth")
    with pytest.raises(ValueError, match=re.escape("feature extractor 'pixels' is already registered")):
        register_feature_extractor("pixels", PixelFeatures)
    with pytest.raises(TypeError, match=re.escape("`factory` must be callable, got int.")):
        register_feature_extractor("new", 3)


def test_registered_factory_is_used(monkeypatch):
    import diadm.features

    monkeypatch.setattr(diadm.features, "_REGISTRY", dict(diadm.features._REGISTRY))
    register_feature_extractor("test_gray4", lambda **kw: PixelFeatures(size=2, grayscale=True, **kw), overwrite=True)
    extractor = get_feature_extractor("test_gray4")
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.num_features == 4
    assert get_feature_extractor(extractor) is extractor


def test_dinov2_is_not_implemented_and_says_what_to_use():
    with pytest.raises(NotImplementedError, match=re.escape("pass that module as `feature=`")):
        get_feature_extractor("dinov2")


def test_fingerprint_changes_with_config_and_weights():
    assert extractor_fingerprint(PixelFeatures(size=4)) == extractor_fingerprint(PixelFeatures(size=4))
    assert extractor_fingerprint(PixelFeatures(size=4)) != extractor_fingerprint(PixelFeatures(size=4, grayscale=True))
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    assert extractor_fingerprint(first) != extractor_fingerprint(second)
    second.load_state_dict(first.state_dict())
    assert extractor_fingerprint(first) == extractor_fingerprint(second)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", extractor_fingerprint(lambda x: x))
