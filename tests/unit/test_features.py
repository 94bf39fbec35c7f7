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
from diadm.features.base import PretrainedFeatures, to_unit_float


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


class _TinyPretrained(PretrainedFeatures):
    name, num_features = "tiny", 2

    def preprocess(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs


def _tiny_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _swav_with(**kwargs):
    from diadm.features.swav import SwAVFeatures

    return SwAVFeatures(pretrained=False, **kwargs)


# every `Raises:` entry of the extractor constructors and helpers that no other test reaches
_CONSTRUCTION_ERRORS = [
    pytest.param(
        lambda: _TinyPretrained(_tiny_network(), pretrained=False, autocast_dtype="bf16"),
        TypeError,
        "`autocast_dtype` must be a torch.dtype or None, got str.",
        id="autocast-str",
    ),
    pytest.param(lambda: _swav_with(size=2.5), TypeError, "`size` must be an int, got float.", id="swav-size-float"),
    pytest.param(lambda: _swav_with(size=0), ValueError, "`size` must be a positive integer, got 0.", id="swav-size-0"),
    pytest.param(
        lambda: register_feature_extractor(3, PixelFeatures), TypeError, "`name` must be a string, got int.", id="name"
    ),
    pytest.param(
        lambda: register_feature_extractor("", PixelFeatures),
        ValueError,
        "`name` must be a non-empty string, got ''.",
        id="empty-name",
    ),
    pytest.param(
        lambda: CallableFeatures(3), TypeError, "`feature` must be an nn.Module or a callable, got int.", id="fn"
    ),
    pytest.param(
        lambda: CallableFeatures(nn.Flatten(), num_features=2.0),
        TypeError,
        "`num_features` must be an int, got float.",
        id="num-features-float",
    ),
    pytest.param(
        lambda: CallableFeatures(nn.Flatten(), num_features=0),
        ValueError,
        "`num_features` must be a positive integer, got 0.",
        id="num-features-0",
    ),
    pytest.param(
        lambda: CallableFeatures(lambda imgs: imgs.flatten(1).tolist(), num_features=3)(torch.zeros(1, 3, 1, 1)),
        TypeError,
        "the wrapped feature extractor `function` must return a tensor, got list.",
        id="returns-list",
    ),
    pytest.param(
        lambda: extractor_fingerprint(3),
        TypeError,
        "`extractor` must be an nn.Module or a callable, got int.",
        id="fingerprint",
    ),
    pytest.param(
        lambda: get_feature_extractor(PixelFeatures(size=2), size=4),
        ValueError,
        "`weights` and keyword arguments apply to named extractors only; got a ready PixelFeatures with weights=None"
        " and ['size']. Configure it when you build it.",
        id="ready-extractor-kwargs",
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), _CONSTRUCTION_ERRORS)
def test_construction_errors(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


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
    first = extractor(imgs)
    # dropout off: the output is the linear layer alone, computed here independently
    module = extractor.module
    expected = imgs.flatten(1) @ module.linear.weight.detach().T + module.linear.bias.detach()
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-6)
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


# ----------------------------------------------------------------------------------------------- weights files
@pytest.fixture(autouse=True)
def _no_download(monkeypatch, tmp_path):
    """Point the torch hub cache at an empty folder and make any download attempt fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download a file")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def _randomise_batch_norm(network: nn.Module) -> None:
    """Give batch-norm layers non-trivial statistics, so that a wrong normalisation shows in the features."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)


def _swav_trunk() -> nn.Module:
    from torchvision.models import resnet50

    network = resnet50(weights=None)
    network.fc = nn.Identity()
    _randomise_batch_norm(network)
    return network.eval()


def _write_swav_checkpoint(path, trunk: nn.Module) -> None:
    """Write a checkpoint laid out as the published SwAV one: DDP `module.` prefix, projection head, prototypes."""
    state = {f"module.{key}": value for key, value in trunk.state_dict().items()}
    state["module.projection_head.0.weight"] = torch.randn(2048, 2048)
    state["module.projection_head.0.bias"] = torch.randn(2048)
    state["module.prototypes.weight"] = torch.randn(3000, 128)
    torch.save(state, path)


def test_missing_weights_name_the_file_the_url_and_the_argument():
    from diadm.features.weights import cache_dir

    expected = (
        "`swav` weights not found: no file swav_800ep_pretrain.pth.tar in the torch hub cache"
        f" {str(cache_dir())!r}, and downloading is off (offline mode). Download"
        " https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar and pass its path as `weights=`"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        get_feature_extractor("swav")
    with pytest.raises(FileNotFoundError, match=re.escape("and downloading is off (`download=False`). Download")):
        get_feature_extractor("inception", download=False)


def test_failed_download_gives_the_same_message(monkeypatch):
    from diadm.features.inception import INCEPTION_WEIGHTS
    from diadm.features.weights import resolve_weights

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    message = "no file pt_inception-2015-12-05-6726825d.pth or weights-inception-2015-12-05-6726825d.pth in the torch"
    with pytest.raises(FileNotFoundError, match=re.escape(message)) as info:
        resolve_weights(INCEPTION_WEIGHTS, download=True)
    assert "the download failed (Network is unreachable)" in str(info.value)
    assert INCEPTION_WEIGHTS.url in str(info.value)
    # the download was allowed and failed, so the message must not suggest allowing it
    assert "download=True" not in str(info.value)
    assert str(info.value).endswith("(`--weights` on the command line), or put it in that folder.")


def test_download_is_allowed_by_default_when_online(monkeypatch, tmp_path):
    from diadm.features.weights import WeightsFile, file_sha256, resolve_weights

    def fake_download(url, dst, hash_prefix=None, progress=True):
        with open(dst, "wb") as handle:
            handle.write(b"weights")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DIADM_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    spec = WeightsFile(extractor="toy", url="https://example.invalid/toy-0123.bin", filenames=("toy.bin",))
    path, digest = resolve_weights(spec)
    assert path == tmp_path / "hub" / "checkpoints" / "toy.bin"
    assert digest == file_sha256(path)
    monkeypatch.setenv("DIADM_OFFLINE", "yes")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("downloading is off (offline mode)")):
        resolve_weights(spec)


def test_cached_file_with_wrong_hash_prefix_is_rejected(tmp_path):
    from diadm.features.inception import INCEPTION_WEIGHTS
    from diadm.features.weights import cache_dir, file_sha256, resolve_weights

    assert INCEPTION_WEIGHTS.sha256_prefix == "6726825d"
    cache_dir().mkdir(parents=True)
    corrupt = cache_dir() / "weights-inception-2015-12-05-6726825d.pth"
    corrupt.write_bytes(b"not the weights")
    message = (
        f"`inception` weights file {str(corrupt)!r} must have the SHA-256 prefix of the published file name 6726825d,"
        f" got SHA-256 {file_sha256(corrupt)}; it is truncated or another file."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_weights(INCEPTION_WEIGHTS)
    with pytest.raises(ValueError, match=re.escape("must have the SHA-256 given as `sha256=` 00ff, got SHA-256")):
        resolve_weights(INCEPTION_WEIGHTS, weights=corrupt, sha256="00ff")
    with pytest.raises(FileNotFoundError, match=re.escape("`weights` must be the path of the `inception` weights")):
        resolve_weights(INCEPTION_WEIGHTS, weights=tmp_path / "nowhere.pth")


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    from diadm.features.weights import file_sha256

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- SwAV
@pytest.fixture(scope="module")
def swav_checkpoint(tmp_path_factory):
    """A random ResNet-50 trunk and its checkpoint in the published SwAV layout."""
    torch.manual_seed(0)
    trunk = _swav_trunk()
    path = tmp_path_factory.mktemp("swav") / "swav_800ep_pretrain.pth.tar"
    _write_swav_checkpoint(path, trunk)
    return trunk, path


@pytest.fixture(scope="module")
def swav_extractor(swav_checkpoint):
    return get_feature_extractor("swav", weights=swav_checkpoint[1], size=32)


def _close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Compare features element-wise to a tolerance relative to their largest magnitude."""
    scale = expected.abs().max().item()
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=rtol * scale)


def test_swav_loads_the_published_layout_and_matches_an_independent_float64_forward(swav_checkpoint, swav_extractor):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    trunk, _ = swav_checkpoint
    assert swav_extractor.num_features == 2048
    imgs = torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8)
    features = swav_extractor(imgs)
    assert features.shape == (2, 2048)
    assert features.dtype == torch.float32
    # Reference: torchvision's resize (short side 24 -> 32, so 32 x 53), manual ImageNet normalisation, float64.
    x = tvf.resize(imgs.double() / 255, 32, interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)
    assert tuple(x.shape[-2:]) == (32, 53)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = trunk.double()((x - mean) / std)
    trunk.float()
    # float32 channels-last against float64 through 50 layers: about 1e-6 of the largest feature.
    _close_to_scale(features, reference, rtol=1e-5)


def test_swav_center_crop_and_grayscale_match_torchvision(swav_extractor, monkeypatch):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    monkeypatch.setattr(swav_extractor, "center_crop", True)
    gray = torch.rand(2, 1, 20, 31)
    expected = tvf.resize(gray.double().expand(-1, 3, -1, -1), 32, antialias=True)
    expected = tvf.center_crop(expected, [32, 32])
    expected = tvf.normalize(expected, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    np.testing.assert_allclose(swav_extractor.preprocess(gray).numpy(), expected.numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(swav_extractor(gray), swav_extractor(gray.expand(-1, 3, -1, -1)), rtol=0, atol=0)


def test_swav_is_batch_invariant_frozen_and_kept_in_eval(swav_extractor):
    swav_extractor.train()
    assert not any(module.training for module in swav_extractor.modules())
    assert not any(parameter.requires_grad for parameter in swav_extractor.parameters())
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    batched = swav_extractor(imgs)
    # One image at a time, and as floats in [0, 1]: checks batch-size invariance and uint8/float equivalence in one
    # pass (each forward of a ResNet-50 costs its 100 MB of weights, whatever the batch).
    single = torch.cat([swav_extractor(imgs[i : i + 1].float() / 255) for i in range(4)])
    # oneDNN picks other kernels per batch size: agreement to float32 rounding, 1e-5 of the largest feature.
    _close_to_scale(batched, single, rtol=1e-5)
    assert not batched.requires_grad


def test_swav_cast_to_bfloat16_runs_the_network_in_bfloat16(swav_extractor):
    import copy

    imgs = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    in_float32 = swav_extractor(imgs)
    # the mean and std buffers are cast too, so the float32 preprocessing would stay float32 without the cast
    # before the network, and the bfloat16 convolutions would refuse it
    half = copy.deepcopy(swav_extractor).to(torch.bfloat16)
    in_bfloat16 = half(imgs)
    assert in_bfloat16.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: about 1 % of the largest feature through 50 random layers (measured)
    _close_to_scale(in_bfloat16, in_float32, rtol=5e-2)
    assert not torch.equal(in_bfloat16, in_float32)
    assert next(swav_extractor.parameters()).dtype == torch.float32  # the shared fixture is untouched


def test_wrapped_module_cast_to_bfloat16_gets_bfloat16_input():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    extractor = get_feature_extractor(linear, num_features=3).to(torch.bfloat16)
    imgs = torch.rand(4, 3, 2, 2)
    features = extractor(imgs)
    assert features.dtype == torch.float32
    with torch.no_grad():
        expected = linear(imgs.to(torch.bfloat16)).float()
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_swav_checkpoint_errors(swav_checkpoint, tmp_path):
    _, path = swav_checkpoint
    with pytest.raises(ValueError, match=re.escape("`swav` weights file")) as info:
        get_feature_extractor("swav", weights=path, sha256="0" * 64)
    assert "must have the SHA-256 given as `sha256=`" in str(info.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"module.conv1.weight": torch.zeros(64, 3, 7, 7), "extra.bias": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=re.escape("must hold the weights of ResNet, got 317 missing keys")):
        get_feature_extractor("swav", weights=wrong)
    with pytest.raises(ValueError, match=re.escape("`weights` and `sha256` select a weights file, so they need")):
        get_feature_extractor("swav", weights=path, pretrained=False)


def test_swav_fingerprint_records_the_weights(swav_checkpoint, swav_extractor, monkeypatch):
    from diadm.features.weights import file_sha256

    assert swav_extractor.weights_sha256() == file_sha256(swav_checkpoint[1])
    fingerprint = extractor_fingerprint(swav_extractor)
    assert fingerprint.startswith("swav-")
    monkeypatch.setattr(swav_extractor, "size", 48)
    assert extractor_fingerprint(swav_extractor) != fingerprint


# ----------------------------------------------------------------------------------------------- Inception
def _resize_tf1_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear (align_corners=False, no half-pixel centers), one float64 pixel at a time."""
    in_h, in_w = image.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = j * in_w / out_w
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, in_w - 1), x - x0
            top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
            bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


@pytest.mark.parametrize("shapes", [((5, 7), (11, 4)), ((8, 8), (29, 29)), ((13, 6), (6, 13))], ids=str)
def test_tf1_resize_matches_the_tensorflow_formula(shapes):
    from diadm.features.inception import resize_bilinear_tf1

    (in_h, in_w), (out_h, out_w) = shapes
    imgs = torch.rand(1, 2, in_h, in_w) * 255
    resized = resize_bilinear_tf1(imgs, (out_h, out_w))
    for channel in range(2):
        reference = _resize_tf1_reference(imgs[0, channel].double().numpy(), out_h, out_w)
        # float32 positions, weights and values up to 255 against float64: a few float32 ulps of 255 (1.5e-5).
        np.testing.assert_allclose(resized[0, channel].numpy(), reference, rtol=0, atol=5e-4)


@pytest.fixture(scope="module")
def inception_checkpoint(tmp_path_factory):
    from diadm.features.inception import fid_inception_v3

    torch.manual_seed(0)
    network = fid_inception_v3()
    _randomise_batch_norm(network)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return network.eval(), path


def _inception(path):
    from diadm.features.weights import file_sha256

    # The test checkpoint has random weights, so its digest stands in for the published prefix.
    return get_feature_extractor("inception", weights=path, sha256=file_sha256(path))


def test_inception_network_has_the_fid_graph_layout():
    from diadm.features.inception import fid_inception_v3

    state = fid_inception_v3().state_dict()
    # Golden values of torch-fidelity's FeatureExtractorInceptionV3 (0.4.0): 566 tensors, 23,885,486 values.
    assert len(state) == 566
    assert sum(tensor.numel() for tensor in state.values()) == 23_885_486
    assert tuple(state["fc.weight"].shape) == (1008, 2048)


def test_inception_preprocessing_and_width(inception_checkpoint):
    _, path = inception_checkpoint
    extractor = _inception(path)
    assert extractor.num_features == 2048
    imgs = torch.randint(0, 256, (1, 1, 6, 9), dtype=torch.uint8)
    inputs = extractor.preprocess(imgs.float() / 255)
    assert tuple(inputs.shape) == (1, 3, 299, 299)
    reference = _resize_tf1_reference(imgs[0, 0].double().numpy(), 299, 299)
    np.testing.assert_allclose(inputs[0, 1].numpy(), (reference - 128) / 128, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_inception_is_batch_invariant_and_kept_in_eval(inception_checkpoint, monkeypatch):
    import diadm.features.inception as inception_module

    extractor = _inception(inception_checkpoint[1])
    # The smallest input Inception-v3 takes (75) keeps the rest of this test fast on CPU; the network is fully
    # convolutional up to its global pool, so batching and dtype behave as at 299.
    monkeypatch.setattr(inception_module, "INPUT_SIZE", 75)
    batch = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    features = extractor(batch)
    assert features.shape == (2, 2048)
    # One image at a time and as floats: batch-size invariance and uint8/float equivalence together.
    single = torch.cat([extractor(batch[i : i + 1].float() / 255) for i in range(2)])
    _close_to_scale(features, single, rtol=1e-5)
    extractor.train()
    assert not any(module.training for module in extractor.modules())


@pytest.mark.slow
def test_inception_matches_torch_fidelity(inception_checkpoint):
    tf_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    _, path = inception_checkpoint
    reference = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    imgs = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    expected = reference(imgs)[0]
    # Same weights, same resize; channels-last convolutions differ from torch-fidelity's by float32 rounding.
    torch.testing.assert_close(_inception(path)(imgs), expected, rtol=1e-5, atol=1e-6)


def _pool_reference(x: np.ndarray, kind: str) -> np.ndarray:
    """3 x 3, stride 1, padding 1 pooling in float64: mean over the valid neighbours only, or max."""
    h, w = x.shape[-2:]
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, :, i, j] = window.mean(axis=(2, 3)) if kind == "mean" else window.max(axis=(2, 3))
    return out


@pytest.mark.parametrize(
    ("fid_block", "torchvision_block", "args", "pool"),
    [
        ("FIDInceptionA", "InceptionA", (8, 4), "mean"),
        ("FIDInceptionC", "InceptionC", (8, 4), "mean"),
        ("FIDInceptionE", "InceptionE", (8,), "mean"),
        ("FIDInceptionEMaxPool", "InceptionE", (8,), "max"),
    ],
    ids=["A", "C", "E", "E-max"],
)
def test_fid_blocks_differ_from_torchvision_only_in_the_pool_branch(fid_block, torchvision_block, args, pool):
    from torchvision.models import inception as tv_inception

    import diadm.features.inception as inception_module

    block = getattr(inception_module, fid_block)(*args).eval()
    reference = getattr(tv_inception, torchvision_block)(*args).eval()
    _randomise_batch_norm(block)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        out, expected = block(x), reference(x)
        width = block.branch_pool.conv.out_channels
        # The FID graph's pool (no padding in the mean, or a max pool) fed to the same 1 x 1 convolution.
        pooled = torch.from_numpy(_pool_reference(x.double().numpy(), pool)).float()
        expected_pool = block.branch_pool(pooled)
    torch.testing.assert_close(out[:, :-width], expected[:, :-width], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, -width:], expected_pool, rtol=1e-5, atol=1e-5)
    # torchvision's pool counts the zero padding: the border outputs must differ, or the test proves nothing.
    assert not torch.allclose(out[:, -width:], expected[:, -width:], atol=1e-3)
