# SPDX-License-Identifier: Apache-2.0
"""DiADM end to end: convert, sample, save, reload, sample again; latent models; the `diadm sample` command."""

import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel
from PIL import Image

from diadm.cli import main
from diadm.models.feature_conditioned_unet import FeatureConditionedUNet
from diadm.pipelines.pipeline_diadm import DiADMPipeline

FEATURE_DIM = 4
STEPS = 3


def tiny_unet(in_channels: int = 3, attention: bool = True) -> UNet2DModel:
    second = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", second[0]),
        up_block_types=(second[1], "UpBlock2D"),
    )


def tiny_vqmodel() -> VQModel:
    """A VQ autoencoder from 16 x 16 RGB images to 8 x 8 x 3 latents."""
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        num_vq_embeddings=16,
        vq_embed_dim=3,
        sample_size=16,
    ).eval()


def fine_tuned(model: FeatureConditionedUNet) -> FeatureConditionedUNet:
    """Stand-in for fine-tuning: move the zero-initialised projection and null embedding."""
    with torch.no_grad():
        model.feature_projection.weight.normal_(0.0, 0.5)
        model.null_embedding.normal_(0.0, 0.5)
    return model.eval()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_save_reload_sample_gives_the_same_pixels(tmp_path):
    model = fine_tuned(FeatureConditionedUNet.from_unet(tiny_unet(), feature_dim=FEATURE_DIM, condition_dropout=0.1))
    pipeline = DiADMPipeline(model, DDPMScheduler(num_train_timesteps=100), feature_bank=torch.randn(9, FEATURE_DIM))
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 3, "num_inference_steps": STEPS, "guidance_scale": 2.0}
    before = pipeline(generator=seeded(4), **kwargs).images
    pipeline.save_pretrained(tmp_path / "pipeline")
    loaded = DiADMPipeline.from_pretrained(tmp_path / "pipeline")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(generator=seeded(4), **kwargs).images
    for image_before, image_after in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(image_after), np.asarray(image_before))
    assert np.asarray(before[0]).std() > 5  # real pixel content, not a constant image


def test_golden_slice_of_a_tiny_seeded_model():
    # Model: torch.manual_seed(0), then tiny_unet() (one attention block), from_unet with feature_dim 4, then
    # fine_tuned(); bank torch.randn(6, 4) right after; DDIM with 100 training steps, 3 inference steps, batch 2,
    # generator seed 0. The slice was computed once with this very code on CPU (torch 2.14, diffusers 0.42.1) and
    # written here; the tolerance 1e-2 follows diffusers' own pipeline tests and absorbs BLAS differences.
    torch.manual_seed(0)
    model = fine_tuned(FeatureConditionedUNet.from_unet(tiny_unet(), feature_dim=FEATURE_DIM))
    bank = torch.randn(6, FEATURE_DIM)
    pipeline = DiADMPipeline(model, DDIMScheduler(num_train_timesteps=100), feature_bank=bank)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, generator=seeded(0), num_inference_steps=STEPS, output_type="np").images
    expected = np.array(
        [7.0727e-04, 5.2800e-01, 1.1447e-02, 3.8714e-01, 9.7866e-01, 8.4852e-01, 4.2069e-04, 2.1946e-04, 3.5706e-04]
    )
    assert images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(images[0, -3:, -3:, -1].flatten(), expected, rtol=0, atol=1e-2)


def test_latent_model_matches_ldm_pipeline_then_round_trips(tmp_path):
    unet, vqvae = tiny_unet(in_channels=3, attention=False).eval(), tiny_vqmodel()
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    pipeline = DiADMPipeline(model, DDIMScheduler(num_train_timesteps=100), vqvae=vqvae)
    baseline = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    for pipe in (pipeline, baseline):
        pipe.set_progress_bar_config(disable=True)
    features = torch.randn(2, FEATURE_DIM)
    kwargs = {"batch_size": 2, "num_inference_steps": STEPS, "output_type": "np"}
    ours = pipeline(features=features, generator=seeded(1), **kwargs).images
    theirs = baseline(generator=seeded(1), **kwargs).images
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)

    fine_tuned(model)
    pipeline.feature_bank = torch.randn(5, FEATURE_DIM)
    before = pipeline(generator=seeded(2), **kwargs).images
    assert np.abs(before - theirs).max() > 1e-3
    pipeline.save_pretrained(tmp_path)
    loaded = DiADMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vqvae, VQModel)
    np.testing.assert_array_equal(loaded(generator=seeded(2), **kwargs).images, before)


@pytest.fixture
def saved_pipeline(tmp_path):
    model = fine_tuned(FeatureConditionedUNet.from_unet(tiny_unet(attention=False), feature_dim=FEATURE_DIM))
    pipeline = DiADMPipeline(model, DDPMScheduler(num_train_timesteps=100), feature_bank=torch.randn(4, FEATURE_DIM))
    pipeline.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_sample_command_writes_the_images(saved_pipeline, tmp_path, monkeypatch):
    counted = []

    class RecordingBar:
        """Stands in for tqdm (disabled in tests by TQDM_DISABLE) to record what the command reports."""

        def __init__(self, total: int, desc: str, unit: str) -> None:
            counted.append((total, desc))

        def __enter__(self) -> "RecordingBar":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            counted.append(n)

    monkeypatch.setattr("diadm.cli.sample.tqdm", RecordingBar)
    out = tmp_path / "samples"
    argv = ["sample", str(saved_pipeline), "--num-images", "5", "--out", str(out), "--batch-size", "2"]
    code = main([*argv, "--steps", "2", "--seed", "3", "--scheduler", "ddim", "--device", "cpu"])
    assert code == 0
    files = sorted(path.name for path in out.iterdir())
    assert files == [f"{index:06d}.png" for index in range(5)]
    with Image.open(out / files[0]) as image:
        assert image.size == (8, 8)
        assert image.mode == "RGB"
    assert counted == [(5, "diadm sample"), 2, 2, 1]


def test_sample_command_writes_what_the_pipeline_samples(saved_pipeline, tmp_path):
    out = tmp_path / "samples"
    argv = ["sample", str(saved_pipeline), "--num-images", "3", "--out", str(out), "--batch-size", "2"]
    assert main([*argv, "--steps", "2", "--seed", "5", "--device", "cpu"]) == 0
    pipeline = DiADMPipeline.from_pretrained(saved_pipeline)
    pipeline.set_progress_bar_config(disable=True)
    generator = seeded(5)
    expected = [pipeline(batch_size=count, generator=generator, num_inference_steps=2).images for count in (2, 1)]
    for index, image in enumerate(expected[0] + expected[1]):
        with Image.open(out / f"{index:06d}.png") as written:
            np.testing.assert_array_equal(np.asarray(written), np.asarray(image))  # PNG is lossless
    assert np.asarray(expected[0][0]).std() > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-images", "0"], "argument --num-images: expected a positive integer, got 0"),
        (["--num-images", "two"], "argument --num-images: expected a positive integer, got 'two'"),
        (["--num-images", "1", "--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    ],
    ids=["zero", "word", "scheduler"],
)
def test_sample_command_usage_errors_exit_2(saved_pipeline, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(saved_pipeline), "--out", str(tmp_path / "samples"), *extra])
    assert exit_info.value.code == 2
    assert re.search(re.escape(message), capsys.readouterr().err)


def test_sample_command_reports_bad_input(saved_pipeline, tmp_path, capsys):
    out = str(tmp_path / "samples")
    assert main(["sample", str(tmp_path / "missing"), "--num-images", "1", "--out", out]) == 2
    expected = "`MODEL_DIR` must be a directory written by DiADMPipeline.save_pretrained, got"
    assert re.search(re.escape(expected) + r" '.*missing' \(no directory\)", capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["sample", str(tmp_path / "empty"), "--num-images", "1", "--out", out]) == 2
    assert "(a directory without model_index.json)" in capsys.readouterr().err
    assert main(["sample", str(saved_pipeline), "--num-images", "1", "--out", out, "--guidance-scale", "-1"]) == 2
    assert re.search(re.escape("`guidance_scale` must be a finite number >= 0, got -1.0"), capsys.readouterr().err)
    assert not (tmp_path / "samples").exists()  # nothing is written before the arguments are checked
