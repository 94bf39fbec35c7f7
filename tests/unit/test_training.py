# SPDX-License-Identifier: Apache-2.0
"""Unit tests of DiADMModule: conversion, loss targets, EMA, condition dropout, bank draws, baseline, bad input."""

import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel, VQModel
from PIL import Image
from torch.utils.data import TensorDataset

from diadm.features import PixelFeatures
from diadm.models.feature_conditioned_unet import FeatureConditionedUNet
from diadm.training import DiADMModule, ema_decay_at, image_size, load_image_folder, load_pretrained

NUM_TRAIN = 12


def make_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(NUM_TRAIN, 1, 8, 8, generator=generator)


def make_module(images, **kwargs) -> DiADMModule:
    pretrained = kwargs.pop("pretrained", None)
    defaults = {"scheduler": DDPMScheduler(num_train_timesteps=50), "feature": "pixels", "num_inference_steps": 2}
    defaults.update(kwargs)
    return DiADMModule(make_unet() if pretrained is None else pretrained, images, **defaults)


def test_converted_module_reproduces_the_original_unet_at_step_zero(images):
    original = make_unet()
    module = make_module(images, pretrained=original)
    sample = torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([0, 7, 23, 49])
    module.eval()
    with torch.no_grad():
        expected = original(sample, timesteps).sample
        trained = module(sample, timesteps, module.feature_bank[:4])
        averaged = module.ema_unet(sample, timesteps, module.feature_bank[:4]).sample
    assert isinstance(module.unet, FeatureConditionedUNet)
    assert torch.equal(trained, expected)
    assert torch.equal(averaged, expected)
    # The caller's model is copied, not trained in place.
    assert module.unet.unet is not original


def test_feature_bank_is_the_extractor_output(images):
    module = make_module(images)
    np.testing.assert_array_equal(module.feature_bank.numpy(), images.reshape(NUM_TRAIN, -1).numpy())
    assert module.unet.config.feature_dim == 64


def test_precomputed_features_skip_the_extractor(images):
    features = torch.randn(NUM_TRAIN, 5)
    module = make_module(images, train_features=features, feature=object())
    assert torch.equal(module.feature_bank, features)
    assert module.unet.config.feature_dim == 5


def test_features_are_cached_by_content(images, tmp_path):
    calls = []

    class CountingPixels(PixelFeatures):
        def extract(self, imgs):
            calls.append(imgs.shape[0])
            return super().extract(imgs)

    first = make_module(images, feature=CountingPixels(), cache_dir=tmp_path)
    second = make_module(images, feature=CountingPixels(), cache_dir=tmp_path)
    assert calls == [NUM_TRAIN]
    assert torch.equal(first.feature_bank, second.feature_bank)
    changed = images.clone()
    changed[0, 0, 0, 0] = 1.0 - changed[0, 0, 0, 0]
    make_module(changed, feature=CountingPixels(), cache_dir=tmp_path)
    assert calls == [NUM_TRAIN, NUM_TRAIN]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_regresses_the_scheduler_target(images, prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    module = make_module(images, scheduler=scheduler)
    # A model that predicts zero makes the loss the mean square of the target.
    module.forward = lambda sample, timestep, features=None: torch.zeros_like(sample)
    inputs = images * 2 - 1
    torch.manual_seed(11)
    loss = module.loss(inputs, torch.arange(NUM_TRAIN))
    torch.manual_seed(11)
    noise = torch.randn_like(inputs).double()
    timesteps = torch.randint(0, 50, (NUM_TRAIN,))
    # Reference: DDPM with linear betas 1e-4..0.02, in float64 (Ho et al. 2020; v of Salimans and Ho 2022).
    betas = np.linspace(1e-4, 0.02, 50, dtype=np.float64)
    alpha_bar = torch.from_numpy(np.cumprod(1.0 - betas))[timesteps].view(-1, 1, 1, 1)
    clean = inputs.double()
    target = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean,
    }[prediction_type]
    # float32 noise scaling against float64: a few ulps.
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_ema_update_matches_float64_recursion(images):
    module = make_module(images, ema_decay=0.9)
    parameters = list(module.unet.parameters())
    reference = [p.detach().double().clone() for p in module.ema_unet.parameters()]
    generator = torch.Generator().manual_seed(5)
    for step in range(25):
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        module.update_ema()
        decay = min(0.9, (1 + step) / (10 + step))
        reference = [decay * r + (1 - decay) * p.detach().double() for r, p in zip(reference, parameters, strict=True)]
    assert int(module.ema_num_updates) == 25
    for average, expected in zip(module.ema_unet.parameters(), reference, strict=True):
        # float32 accumulation over 25 updates of values of order 1: within 1e-6.
        np.testing.assert_allclose(average.double().numpy(), expected.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("step", "decay", "expected"),
    [(0, 0.999, 0.1), (8, 0.999, 0.5), (90, 0.999, 0.91), (10**6, 0.999, 0.999), (5, 0.0, 0.0)],
    ids=["first", "ninth", "warming", "settled", "no-averaging"],
)
def test_ema_decay_schedule(step, decay, expected):
    assert ema_decay_at(step, decay) == pytest.approx(expected)


def test_ema_decay_zero_copies_the_weights(images):
    module = make_module(images, ema_decay=0.0)
    with torch.no_grad():
        for parameter in module.unet.parameters():
            parameter.add_(1.0)
    module.update_ema()
    for average, current in zip(module.ema_unet.parameters(), module.unet.parameters(), strict=True):
        assert torch.equal(average, current)


def test_condition_dropout_rate_in_training_only():
    count, probability = 4000, 0.3
    images = torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    module = make_module(images, condition_dropout=probability)
    with torch.no_grad():
        module.unet.null_embedding.fill_(7.0)
        module.unet.feature_projection.weight.fill_(0.01)
    seen = []
    hook = module.unet.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["class_labels"].detach()), with_kwargs=True
    )
    module.train()
    module.loss(images * 2 - 1, torch.arange(count))
    module.eval()
    module.loss(images * 2 - 1, torch.arange(count))
    hook.remove()
    dropped_train = (seen[0] == 7.0).all(dim=1).float().mean().item()
    dropped_eval = (seen[1] == 7.0).all(dim=1).float().mean().item()
    # Binomial standard error sqrt(0.3 * 0.7 / 4000) = 0.0072; allow 4 of them.
    assert abs(dropped_train - probability) < 4 * math.sqrt(probability * (1 - probability) / count)
    assert dropped_eval == 0.0


def test_feature_indices_use_every_bank_row_once_per_round(images):
    module = make_module(images)
    generator = torch.Generator().manual_seed(0)
    few = module.feature_indices(5, generator)
    assert few.unique().numel() == 5
    exactly = module.feature_indices(NUM_TRAIN, generator)
    assert sorted(exactly.tolist()) == list(range(NUM_TRAIN))
    twice = module.feature_indices(2 * NUM_TRAIN + 3, generator)
    assert torch.bincount(twice, minlength=NUM_TRAIN).min().item() >= 2


def test_sample_conditions_each_image_on_its_own_bank_row(images, monkeypatch):
    module = make_module(images, sample_batch_size=4)
    calls = []
    pipeline_class = type(module.pipeline())
    original_call = pipeline_class.__call__

    def recording_call(self, *args, **kwargs):
        calls.append(kwargs["feature_indices"].tolist())
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording_call)
    samples = module.sample(10, torch.Generator().manual_seed(1))
    expected = module.feature_indices(10, torch.Generator().manual_seed(1)).tolist()
    assert [index for chunk in calls for index in chunk] == expected
    assert [len(chunk) for chunk in calls] == [4, 4, 2]
    assert samples.shape == (10, 1, 8, 8)
    assert samples.min() >= 0
    assert samples.max() <= 1


def test_sample_with_independent_features_draws_with_repeats(images, monkeypatch):
    module = make_module(images)
    calls = []
    pipeline_class = type(module.pipeline())
    original_call = pipeline_class.__call__

    def recording_call(self, *args, **kwargs):
        calls.append(kwargs["feature_indices"].tolist())
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording_call)
    module.sample(40, torch.Generator().manual_seed(2), distinct_features=False)
    expected = torch.randint(NUM_TRAIN, (40,), generator=torch.Generator().manual_seed(2))
    assert calls == [expected.tolist()]
    assert len(set(calls[0])) < NUM_TRAIN  # 40 draws from 12 rows repeat


def test_sample_restores_the_ema_mode(images):
    module = make_module(images)
    module.ema_unet.train()
    module.sample(2, torch.Generator().manual_seed(0))
    assert module.ema_unet.training


def test_baseline_path(images):
    original = make_unet()
    module = make_module(images, pretrained=original, conditional=False, sample_scheduler=DDIMScheduler())
    assert type(module.unet) is UNet2DModel
    assert module.feature_bank is None
    pipeline = module.pipeline()
    assert isinstance(pipeline, DDPMPipeline)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.unet is module.ema_unet
    sample = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(module(sample, torch.tensor([3, 4])), original(sample, torch.tensor([3, 4])).sample)
    samples = module.sample(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8)


def test_optimizer_warmup_is_linear(images):
    module = make_module(images, warmup_steps=4, learning_rate=0.1)
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(rates, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    trained = {id(p) for p in module.unet.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == trained


def test_checkpoint_of_other_images_is_refused(images):
    module = make_module(images)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)
    other = make_module(images.flip(0))
    with pytest.raises(ValueError, match=re.escape("the checkpoint was trained on other images")):
        other.on_load_checkpoint(checkpoint)


def test_seeded_generators_are_saved_and_restored_with_the_checkpoint(images):
    module = make_module(images, seed=4)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    inputs = module._inputs[:2]
    noise = torch.randn(inputs.shape, generator=module._generators["noise"])
    dropout = torch.rand(4, generator=module._generators["dropout"])
    order = list(module.train_dataloader())
    module.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(torch.randn(inputs.shape, generator=module._generators["noise"]), noise, atol=0, rtol=0)
    torch.testing.assert_close(torch.rand(4, generator=module._generators["dropout"]), dropout, atol=0, rtol=0)
    assert not torch.equal(noise.flatten()[:4], dropout)  # separate streams
    again = list(module.train_dataloader())
    assert [batch[1].tolist() for batch in again] == [batch[1].tolist() for batch in order]
    # Another seed gives another order; the same seed in a fresh module gives this one.
    fresh, other = make_module(images, seed=4), make_module(images, seed=5)
    assert [batch[1].tolist() for batch in fresh.train_dataloader()] == [batch[1].tolist() for batch in order]
    assert [batch[1].tolist() for batch in other.train_dataloader()] != [batch[1].tolist() for batch in order]


def test_load_pretrained_folders(tmp_path):
    unet = make_unet()
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipeline.save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "unet")
    loaded_unet, scheduler, autoencoder = load_pretrained(tmp_path / "pipe")
    assert scheduler.config.num_train_timesteps == 50
    assert autoencoder is None
    sample = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        # Reloaded weights are equal; the kernels may pick another summation order on the fresh tensors (1e-6).
        torch.testing.assert_close(loaded_unet(sample, 3).sample, unet(sample, 3).sample, atol=1e-6, rtol=0)
    bare, no_scheduler, _ = load_pretrained(tmp_path / "unet")
    assert isinstance(bare, UNet2DModel)
    assert no_scheduler is None
    assert image_size(bare) == 8


def test_load_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4), 255).save(tmp_path / "b.png")
    Image.new("RGB", (8, 4), (0, 0, 0)).save(tmp_path / "sub" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path, size=2, channels=1)
    # Sorted by relative path: "b.png" before "sub/a.png".
    assert images.shape == (2, 1, 2, 2)
    assert images[:, 0, 0, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"learning_rate": 0.0}, ValueError, "`learning_rate` must be positive, got 0.0."),
        ({"learning_rate": float("nan")}, ValueError, "`learning_rate` must be finite, got nan."),
        ({"ema_decay": 1.0}, ValueError, "`ema_decay` must be in [0, 1), got 1.0"),
        ({"condition_dropout": 1.5}, ValueError, "`condition_dropout` must be a probability in [0, 1], got 1.5."),
        ({"batch_size": 0}, ValueError, "`batch_size` must be an integer >= 1, got 0."),
        ({"warmup_steps": 2.5}, TypeError, "`warmup_steps` must be an integer, got 2.5 (float)."),
        ({"ema_decay": "0.9"}, TypeError, "`ema_decay` must be a number, got '0.9' (str)."),
        ({"scheduler": None}, TypeError, "`scheduler` must be a diffusers scheduler"),
        (
            {"scheduler": DDPMScheduler(num_train_timesteps=50, prediction_type="flow")},
            ValueError,
            "the scheduler's `prediction_type` must be one of ('epsilon', 'sample', 'v_prediction'), got 'flow'.",
        ),
        ({"train_features": torch.randn(3, 4)}, ValueError, f"`train_features` must have shape ({NUM_TRAIN}, D)"),
        ({"train_features": torch.ones(NUM_TRAIN, 4, dtype=torch.long)}, TypeError, "`train_features` must be a"),
        ({"autoencoder": torch.nn.Linear(2, 2)}, TypeError, "`autoencoder` must be a diffusers VQModel"),
        ({"pretrained": "no/such/folder"}, ValueError, "`pretrained` must be a diffusers pipeline folder"),
        ({"pretrained": 3}, TypeError, "`pretrained` must be a folder path, a diffusers pipeline"),
        ({"weight_decay": -0.1}, ValueError, "`weight_decay` must be non-negative, got -0.1."),
        ({"sample_scheduler": "ddim"}, TypeError, "`sample_scheduler` must be a diffusers scheduler, got str."),
        ({"seed": 1.5}, TypeError, "`seed` must be an integer or None, got 1.5 (float)."),
        ({"seed": -1}, ValueError, "`seed` must be a non-negative integer or None, got -1."),
        (
            {"train_features": torch.full((NUM_TRAIN, 4), float("nan"))},
            ValueError,
            "the training features must be finite, got NaN or infinite values.",
        ),
        (
            {"autoencoder": VQModel(in_channels=3, block_out_channels=(8,), norm_num_groups=8, latent_channels=1)},
            ValueError,
            "`train_images` must have the autoencoder's 3 channels, got shape (12, 1, 8, 8).",
        ),
    ],
    ids=lambda value: None,
)
def test_bad_arguments_raise(images, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make_module(images, **kwargs)


@pytest.mark.parametrize(
    ("train_images", "error", "message"),
    [
        (torch.rand(3, 1, 4, 4), ValueError, "the UNet expects inputs of shape (N, 1, 8, 8)"),
        (torch.rand(3, 8, 8), ValueError, "`train_images` must have shape (N, C, H, W)"),
        (torch.full((3, 1, 8, 8), 2.0), ValueError, "floating `train_images` must have values in [0, 1]"),
        ([[0.0]], TypeError, "`train_images` must be a torch.Tensor or numpy array"),
        (TensorDataset(torch.rand(3, 1, 8, 8)), NotImplementedError, "`train_images` as a torch Dataset"),
        (torch.zeros(3, 1, 8, 8), ValueError, "every training feature vector must have a non-zero norm"),
    ],
    ids=["size", "ndim", "range", "type", "dataset", "zero-features"],
)
def test_bad_images_raise(train_images, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make_module(train_images)


def test_baseline_refuses_a_conditioned_model(images):
    converted = FeatureConditionedUNet.from_unet(make_unet(), feature_dim=64)
    with pytest.raises(ValueError, match=re.escape("`conditional=False` trains an unconditional baseline")):
        make_module(images, pretrained=converted, conditional=False)
    with pytest.raises(ValueError, match=re.escape("feature_dim=64, but the features have width 5")):
        make_module(images, pretrained=converted, train_features=torch.randn(NUM_TRAIN, 5))


@pytest.mark.parametrize(
    ("num_images", "error", "message"),
    [(0, ValueError, "`num_images` must be at least 1, got 0."), (2.0, TypeError, "`num_images` must be an integer")],
    ids=["zero", "float"],
)
def test_bad_sample_requests_raise(images, num_images, error, message):
    module = make_module(images)
    with pytest.raises(error, match=re.escape(message)):
        module.sample(num_images)
    with pytest.raises(error, match=re.escape(message)):
        module.feature_indices(num_images)


def test_load_pretrained_refuses_a_pipeline_without_unet():
    from diffusers import DiffusionPipeline

    class SchedulerOnly(DiffusionPipeline):
        def __init__(self, scheduler) -> None:
            super().__init__()
            self.register_modules(scheduler=scheduler)

    message = "`pretrained` must be an unconditional image pipeline with a `unet`, got SchedulerOnly with components"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pretrained(SchedulerOnly(DDPMScheduler()))


def test_load_image_folder_bad_input(tmp_path):
    with pytest.raises(TypeError, match=re.escape("`size` must be an integer, got 4.0 (float).")):
        load_image_folder(tmp_path, size=4.0, channels=3)
    with pytest.raises(ValueError, match=re.escape("`size` must be a positive integer, got 0.")):
        load_image_folder(tmp_path, size=0, channels=3)
    with pytest.raises(ValueError, match=re.escape("`folder` must hold at least one image")):
        load_image_folder(tmp_path, size=4, channels=3)
    with pytest.raises(ValueError, match=re.escape("`folder` must be a directory of images")):
        load_image_folder(tmp_path / "missing", size=4, channels=3)
    with pytest.raises(ValueError, match=re.escape("`channels` must be 1 (grayscale) or 3 (RGB), got 2.")):
        load_image_folder(tmp_path, size=4, channels=2)
