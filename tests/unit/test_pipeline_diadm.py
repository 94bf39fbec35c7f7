# SPDX-License-Identifier: Apache-2.0
"""Tests of `DiADMPipeline` against diffusers' unconditional pipelines and hand-written sampling loops."""

import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

from diadm.models.feature_conditioned_unet import FeatureConditionedUNet
from diadm.pipelines.pipeline_diadm import FEATURE_BANK_FILE, DiADMPipeline

FEATURE_DIM = 6
STEPS = 3
SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=100),
    "ddim": lambda: DDIMScheduler(num_train_timesteps=100),
    "dpm": lambda: DPMSolverMultistepScheduler(num_train_timesteps=100),
}


def make_unet(out_channels: int = 3) -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def make_model(unet: UNet2DModel, condition_dropout: float = 0.1) -> FeatureConditionedUNet:
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=condition_dropout)
    with torch.no_grad():
        model.feature_projection.weight.normal_(0.0, 0.5)
        model.null_embedding.normal_(0.0, 0.5)
    return model.eval()


def make_pipeline(scheduler: str = "ddim", bank_rows: int = 5, **model_kwargs: float) -> DiADMPipeline:
    bank = torch.randn(bank_rows, FEATURE_DIM) if bank_rows else None
    pipeline = DiADMPipeline(make_model(make_unet(), **model_kwargs), SCHEDULERS[scheduler](), feature_bank=bank)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_converted_model_samples_what_the_unconditional_pipeline_samples(scheduler):
    unet = make_unet()
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    pipeline = DiADMPipeline(model, SCHEDULERS[scheduler]())
    baseline_class = DDIMPipeline if scheduler == "ddim" else DDPMPipeline
    baseline = baseline_class(unet=unet, scheduler=SCHEDULERS[scheduler]())
    for pipe in (pipeline, baseline):
        pipe.set_progress_bar_config(disable=True)
    features = torch.randn(1, FEATURE_DIM)
    kwargs = {"batch_size": 2, "num_inference_steps": STEPS, "output_type": "np"}
    ours = pipeline(features=features, generator=seeded(), **kwargs).images
    theirs = baseline(generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(ours, theirs)
    assert ours.std() > 0.05


@pytest.mark.parametrize(
    ("out_channels", "scheduler", "guidance_scale"),
    [(3, "ddim", 2.5), (3, "ddim", 0.0), (6, "ddpm", 3.0)],
    ids=["ddim-g2.5", "ddim-g0-unconditional", "ddpm-learned-variance-g3"],
)
def test_guidance_matches_a_hand_written_loop(out_channels, scheduler, guidance_scale):
    model = make_model(make_unet(out_channels), condition_dropout=0.1)
    make_scheduler = (
        (lambda: DDPMScheduler(num_train_timesteps=100, variance_type="learned_range"))
        if out_channels == 6
        else SCHEDULERS[scheduler]
    )
    pipeline = DiADMPipeline(model, make_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    features = torch.randn(2, FEATURE_DIM)
    images = pipeline(
        batch_size=2,
        features=features,
        generator=seeded(3),
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        output_type="pt",
    ).images

    # Reference: separate conditional and unconditional forward passes, guidance on the first 3 channels.
    reference_scheduler = make_scheduler()
    reference_scheduler.set_timesteps(STEPS)
    generator = seeded(3)
    x = randn_tensor((2, 3, 8, 8), generator=generator)
    with torch.no_grad():
        for t in reference_scheduler.timesteps:
            conditional = model(x, t, features).sample
            unconditional = model(x, t).sample
            prediction = conditional.clone()
            prediction[:, :3] = unconditional[:, :3] + guidance_scale * (conditional[:, :3] - unconditional[:, :3])
            x = reference_scheduler.step(prediction, t, x, generator=generator).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1)
    # Batched (2B) against separate (B) convolutions: float32 summation order only.
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    unguided = pipeline(
        batch_size=2, features=features, generator=seeded(3), num_inference_steps=STEPS, output_type="pt"
    ).images
    assert (unguided - images).abs().max() > 1e-3


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone():
    pipeline = make_pipeline("ddpm")
    state = torch.get_rng_state()
    first = pipeline(batch_size=3, generator=seeded(7), num_inference_steps=STEPS, output_type="np").images
    assert torch.equal(torch.get_rng_state(), state)
    second = pipeline(batch_size=3, generator=seeded(7), num_inference_steps=STEPS, output_type="np").images
    other = pipeline(batch_size=3, generator=seeded(8), num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 0.05


def test_bank_draws_follow_the_generator_and_indices_pick_rows():
    pipeline = make_pipeline("ddim", bank_rows=4)
    kwargs = {"batch_size": 3, "num_inference_steps": STEPS, "output_type": "np"}
    # Documented order: the initial noise first, then one bank row per image, uniformly.
    generator = seeded(11)
    randn_tensor((3, 3, 8, 8), generator=generator)
    drawn = torch.randint(4, (3,), generator=generator)
    expected = pipeline(feature_indices=drawn.tolist(), generator=seeded(11), **kwargs).images
    np.testing.assert_array_equal(pipeline(generator=seeded(11), **kwargs).images, expected)
    by_index = pipeline(feature_indices=torch.tensor([2]), generator=seeded(11), **kwargs).images
    by_feature = pipeline(features=pipeline.feature_bank[2:3] * 4.0, generator=seeded(11), **kwargs).images
    # Scaling a feature vector does not change it after L2 normalisation; float32 rounding only.
    np.testing.assert_allclose(by_index, by_feature, rtol=0, atol=1e-5)
    assert np.abs(by_index - expected).max() > 1e-3


def test_output_types_agree():
    pipeline = make_pipeline("dpm")
    outputs = {
        output_type: pipeline(
            batch_size=2, generator=seeded(5), num_inference_steps=STEPS, output_type=output_type
        ).images
        for output_type in ("pil", "np", "pt")
    }
    array = outputs["np"]
    assert array.shape == (2, 8, 8, 3)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(outputs["pt"].permute(0, 2, 3, 1).numpy(), array)
    pil = np.stack([np.asarray(image) for image in outputs["pil"]])
    np.testing.assert_array_equal(pil, (array * 255).round().astype(np.uint8))
    (images,) = pipeline(
        batch_size=2, generator=seeded(5), num_inference_steps=STEPS, output_type="np", return_dict=False
    )
    np.testing.assert_array_equal(images, array)


def test_progress_bar_shows_and_switches_off(capsys):
    pipeline = make_pipeline("ddim")
    pipeline.set_progress_bar_config(disable=False, desc="DiADM sampling")
    pipeline(num_inference_steps=2, generator=seeded(), output_type="np")
    assert "DiADM sampling" in capsys.readouterr().err
    pipeline.set_progress_bar_config(disable=True)
    pipeline(num_inference_steps=2, generator=seeded(), output_type="np")
    assert capsys.readouterr().err == ""


def test_save_and_load_keeps_the_feature_bank(tmp_path):
    pipeline = make_pipeline("ddpm", bank_rows=7)
    pipeline.save_pretrained(tmp_path)
    assert (tmp_path / FEATURE_BANK_FILE).is_file()
    loaded = DiADMPipeline.from_pretrained(tmp_path)
    assert torch.equal(loaded.feature_bank, pipeline.feature_bank)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.vqvae is None
    replaced = DiADMPipeline.from_pretrained(tmp_path, feature_bank=torch.ones(2, FEATURE_DIM))
    assert torch.equal(replaced.feature_bank, torch.ones(2, FEATURE_DIM))
    # Saving without a bank removes the stale file, so a reload has no bank either.
    pipeline.feature_bank = None
    pipeline.save_pretrained(tmp_path)
    assert not (tmp_path / FEATURE_BANK_FILE).exists()
    assert DiADMPipeline.from_pretrained(tmp_path).feature_bank is None


def test_from_pretrained_needs_a_local_directory(tmp_path):
    missing = str(tmp_path / "not-there")
    with pytest.raises(NotImplementedError, match=re.escape(f"from a local directory, got {missing!r}")):
        DiADMPipeline.from_pretrained(missing)


def test_guidance_needs_condition_dropout():
    pipeline = make_pipeline("ddim", condition_dropout=0.0)
    with pytest.raises(ValueError, match=re.escape("this model has condition_dropout=0. Use guidance_scale=1")):
        pipeline(guidance_scale=2.0, generator=seeded(), num_inference_steps=2)
    assert pipeline(generator=seeded(), num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


BAD_CALLS = [
    ({"batch_size": 0}, ValueError, "`batch_size` must be a positive integer, got 0 (int); pass at least 1."),
    ({"num_inference_steps": -3}, ValueError, "`num_inference_steps` must be a positive integer, got -3 (int)"),
    ({"output_type": "latent"}, ValueError, "`output_type` must be one of ('pil', 'np', 'pt'), got 'latent'."),
    ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be a finite number >= 0, got nan"),
    ({"guidance_scale": "2"}, TypeError, "`guidance_scale` must be a number, got str."),
    ({"eta": -1.0}, ValueError, "`eta` must be a finite number >= 0, got -1.0; 0 is deterministic DDIM"),
    ({"eta": None}, TypeError, "`eta` must be a number, got NoneType."),
    ({"generator": 0}, TypeError, "`generator` must be a torch.Generator, a list of them or None, got int; seed"),
    ({"generator": [0]}, TypeError, "a list of them or None, got a list holding other objects;"),
    ({"guidance_scale": -0.5}, ValueError, "`guidance_scale` must be a finite number >= 0, got -0.5; 1 means no"),
    (
        {"features": torch.ones(1, FEATURE_DIM, dtype=torch.long)},
        TypeError,
        "`features` must be a floating tensor, got dtype torch.int64; convert it with `.float()`.",
    ),
    ({"features": [[1.0] * FEATURE_DIM]}, TypeError, "`features` must be a torch.Tensor of shape (batch, 6)"),
    (
        {"batch_size": 2, "generator": [torch.Generator()]},
        ValueError,
        "list of `batch_size`=2 generators, got a list of 1.",
    ),
    (
        {"features": torch.ones(1, FEATURE_DIM), "feature_indices": [0]},
        ValueError,
        "Pass `features` or `feature_indices`, not both.",
    ),
    (
        {"features": torch.ones(1, 3)},
        ValueError,
        "`features` must have shape (batch, feature_dim) with feature_dim=6, got shape (1, 3)",
    ),
    (
        {"batch_size": 2, "features": torch.ones(3, FEATURE_DIM)},
        ValueError,
        "`features` must have 1 row (shared by every sample) or 2 rows (one per sample), got 3 rows",
    ),
    (
        {"features": torch.full((1, FEATURE_DIM), float("nan"))},
        ValueError,
        "`features` must be finite, got NaN or infinite values in rows [0].",
    ),
    (
        {"feature_indices": [5]},
        ValueError,
        "`feature_indices` must lie in [0, 4] (the feature bank has 5 rows), got [5].",
    ),
    ({"feature_indices": [-1]}, ValueError, "got [-1]."),
    (
        {"batch_size": 3, "feature_indices": [0, 1]},
        ValueError,
        "`feature_indices` must be a sequence of 1 or `batch_size`=3 bank rows, got shape (2,).",
    ),
    ({"feature_indices": [0.5]}, TypeError, "`feature_indices` must be integers, got dtype torch.float32."),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CALLS, ids=[message[:40] for _, _, message in BAD_CALLS])
def test_bad_call_arguments_raise(kwargs, error, message):
    pipeline = make_pipeline("ddim", bank_rows=5)
    with pytest.raises(error, match=re.escape(message)):
        pipeline(**{"num_inference_steps": 2, **kwargs})


def test_no_bank_and_no_features_raises():
    pipeline = make_pipeline("ddim", bank_rows=0)
    with pytest.raises(ValueError, match=re.escape("This pipeline has no `feature_bank` to draw conditions from")):
        pipeline(num_inference_steps=2)
    features = torch.randn(1, FEATURE_DIM, generator=seeded(3))
    given = pipeline(features=features, generator=seeded(1), num_inference_steps=2, output_type="pt").images
    pipeline.feature_bank = features
    from_bank = pipeline(feature_indices=[0], generator=seeded(1), num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(given, from_bank, rtol=0, atol=0)
    assert given.std() > 0


def test_bad_components_raise():
    model = make_model(make_unet())
    with pytest.raises(TypeError, match=re.escape("`unet` must be a FeatureConditionedUNet, got UNet2DModel")):
        DiADMPipeline(make_unet(), DDIMScheduler())
    with pytest.raises(TypeError, match=re.escape("`scheduler` must be a diffusers scheduler, got str.")):
        DiADMPipeline(model, "ddim")
    with pytest.raises(TypeError, match=re.escape("`vqvae` must be a diffusers autoencoder")):
        DiADMPipeline(model, DDIMScheduler(), vqvae=torch.nn.Identity())
    with pytest.raises(ValueError, match=re.escape("`feature_bank` must have shape (batch, feature_dim) with")):
        DiADMPipeline(model, DDIMScheduler(), feature_bank=torch.ones(4, FEATURE_DIM + 1))
    with pytest.raises(ValueError, match=re.escape("`feature_bank` must be finite")):
        DiADMPipeline(model, DDIMScheduler(), feature_bank=torch.full((2, FEATURE_DIM), float("inf")))
    with pytest.raises(TypeError, match=re.escape("`feature_bank` must be a floating tensor")):
        DiADMPipeline(model, DDIMScheduler(), feature_bank=torch.ones(2, FEATURE_DIM, dtype=torch.int32))


def test_assigned_feature_bank_is_checked_and_stored_as_float32():
    pipeline = make_pipeline("ddim")
    pipeline.feature_bank = torch.ones(3, FEATURE_DIM, dtype=torch.float64)
    assert pipeline.feature_bank.dtype == torch.float32
    assert pipeline.feature_bank.shape == (3, FEATURE_DIM)
    with pytest.raises(ValueError, match=re.escape("`feature_bank` rows must have a non-zero L2 norm")):
        pipeline.feature_bank = torch.zeros(3, FEATURE_DIM)
