# SPDX-License-Identifier: Apache-2.0
"""DiADMModule through a real Trainer: fine-tune, save, reload and sample; latent models; the finetune CLI."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from diadm.cli import main
from diadm.pipelines.pipeline_diadm import DiADMPipeline
from diadm.training import DiADMModule

NUM_TRAIN = 16


def tiny_unet(channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )


def quiet_trainer(**kwargs) -> Trainer:
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(kwargs)
    return Trainer(**settings)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(NUM_TRAIN, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05


def test_finetune_save_reload_and_sample(images, tmp_path):
    pretrained = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pretrained.save_pretrained(tmp_path / "pretrained")
    module = DiADMModule(
        tmp_path / "pretrained",
        images,
        feature="pixels",
        batch_size=4,
        learning_rate=1e-2,
        ema_decay=0.5,
        sample_scheduler=DDIMScheduler(num_train_timesteps=100),
        num_inference_steps=4,
    )
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module)
    assert trainer.global_step == 3
    assert int(module.ema_num_updates) == 3  # once per optimizer step, not per batch
    # Training moved the feature projection off zero, and the EMA lags behind the raw weights.
    assert module.unet.feature_projection.weight.abs().sum() > 0
    raw, averaged = module.unet.feature_projection.weight, module.ema_unet.feature_projection.weight
    assert not torch.equal(raw, averaged)

    module.save(tmp_path / "diadm")
    reloaded = DiADMPipeline.from_pretrained(tmp_path / "diadm")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(reloaded.feature_bank, module.feature_bank)
    saved = dict(reloaded.unet.named_parameters())
    for name, parameter in module.ema_unet.named_parameters():
        assert torch.equal(saved[name], parameter), name  # the EMA weights are what is saved

    from_module = module.sample(6, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    indices = module.feature_indices(6, generator)
    output = reloaded(
        batch_size=6, feature_indices=indices, generator=generator, num_inference_steps=4, output_type="np"
    )
    from_disk = torch.from_numpy(output.images).permute(0, 3, 1, 2)
    # Same weights, bank, noise and scheduler; the reloaded tensors may sum in another order (1e-5 in [0, 1]).
    torch.testing.assert_close(from_disk, from_module, atol=1e-5, rtol=0)
    assert from_module.std() > 0


def test_baseline_trains_with_the_same_budget_and_saves_a_ddpm_pipeline(images, tmp_path):
    module = DiADMModule(
        tiny_unet(), images, scheduler=DDPMScheduler(num_train_timesteps=100), conditional=False, batch_size=4
    )
    before = [p.detach().clone() for p in module.unet.parameters()]
    quiet_trainer(max_steps=2, precision="bf16-mixed").fit(module)
    assert int(module.ema_num_updates) == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, module.unet.parameters(), strict=True))
    module.save(tmp_path / "baseline")
    reloaded = DDPMPipeline.from_pretrained(tmp_path / "baseline")
    assert type(reloaded.unet) is UNet2DModel
    saved = dict(reloaded.unet.named_parameters())
    for name, parameter in module.ema_unet.named_parameters():
        assert torch.equal(saved[name], parameter), name  # the EMA weights are what is saved
    reloaded.set_progress_bar_config(disable=True)
    output = reloaded(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np")
    from_disk = torch.from_numpy(output.images).permute(0, 3, 1, 2)
    from_module = module.sample(2, torch.Generator().manual_seed(3), num_inference_steps=2)
    # Same weights, noise and scheduler; the reloaded tensors may sum in another order (1e-5 in [0, 1]).
    torch.testing.assert_close(from_disk, from_module, atol=1e-5, rtol=0)
    assert from_module.std() > 0


def record_training(module: DiADMModule) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Record (image indices, noise, timesteps) of every training step of `module`."""
    seen: list = []
    loss, add_noise = module.loss, module.scheduler.add_noise

    def recording_loss(inputs, indices):
        seen.append([indices.clone()])
        return loss(inputs, indices)

    def recording_add_noise(original, noise, timesteps):
        seen[-1] += [noise.clone(), timesteps.clone()]
        return add_noise(original, noise, timesteps)

    module.loss = recording_loss
    module.scheduler.add_noise = recording_add_noise
    return seen


def train_pair(images, seed, max_steps=8):
    """Train DiADM and its baseline (8 steps of 4 of 16 images: two epochs) as the demo does; return their steps."""
    steps = {}
    for conditional in (True, False):
        seed_everything(0, verbose=False)
        module = DiADMModule(
            tiny_unet(),
            images,
            scheduler=DDPMScheduler(num_train_timesteps=100),
            feature="pixels",
            conditional=conditional,
            condition_dropout=0.5,
            batch_size=4,
            seed=seed,
        )
        steps[conditional] = record_training(module)
        quiet_trainer(max_steps=max_steps).fit(module)
    return steps[True], steps[False]


def test_seeded_baseline_sees_the_same_batches_noise_and_timesteps_as_diadm(images):
    diadm, baseline = train_pair(images, seed=0)
    assert len(diadm) == len(baseline) == 8
    for step, (ours, theirs) in enumerate(zip(diadm, baseline, strict=True)):
        for name, mine, other in zip(("indices", "noise", "timesteps"), ours, theirs, strict=True):
            assert torch.equal(mine, other), (step, name)
    first_epoch = torch.cat([step[0] for step in diadm[:4]])
    second_epoch = torch.cat([step[0] for step in diadm[4:]])
    # Each epoch is a shuffle of all 16 images, and the second is another one.
    assert sorted(first_epoch.tolist()) == sorted(second_epoch.tolist()) == list(range(NUM_TRAIN))
    assert first_epoch.tolist() != list(range(NUM_TRAIN))
    assert not torch.equal(first_epoch, second_epoch)


def test_unseeded_baseline_sees_other_batches_and_noise_than_diadm(images):
    # Pins the documented behaviour of `seed=None`: even after the same `seed_everything`, converting the UNet (a
    # fresh UNet2DModel is initialised before the weights are copied) and condition dropout consume the global stream.
    diadm, baseline = train_pair(images, seed=None, max_steps=1)
    assert not torch.equal(diadm[0][0], baseline[0][0])
    assert not torch.equal(diadm[0][1], baseline[0][1])


def test_latent_pipeline_is_encoded_once_and_sampled_through_the_autoencoder(tmp_path):
    torch.manual_seed(0)
    vqvae = VQModel(
        in_channels=1,
        out_channels=1,
        latent_channels=2,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        num_vq_embeddings=16,
        vq_embed_dim=2,
    )
    unet = tiny_unet(channels=2)
    ldm = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    pixels = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    module = DiADMModule(ldm, pixels, feature="pixels", batch_size=4, num_inference_steps=2)
    with torch.no_grad():
        expected = vqvae.encode(pixels * 2 - 1).latents * vqvae.config.scaling_factor
    torch.testing.assert_close(module._inputs, expected)
    assert module.feature_bank.shape == (8, 256)
    quiet_trainer(max_steps=2).fit(module)
    samples = module.sample(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 16, 16)
    module.save(tmp_path / "latent")
    reloaded = DiADMPipeline.from_pretrained(tmp_path / "latent")
    assert reloaded.vqvae is not None
    reloaded.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    indices = module.feature_indices(3, generator)
    output = reloaded(
        batch_size=3, feature_indices=indices, generator=generator, num_inference_steps=2, output_type="pt"
    )
    # Decoded through the reloaded autoencoder; summation order may differ on the fresh tensors (1e-5 in [0, 1]).
    torch.testing.assert_close(output.images, samples, atol=1e-5, rtol=0)
    assert samples.std() > 0


def write_digit_folder(folder, count: int = 12) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        array = rng.integers(20, 255, size=(8, 8), dtype=np.uint8)
        Image.fromarray(array, mode="L").save(folder / f"{index:03d}.png")


@pytest.mark.slow
def test_finetune_cli_end_to_end_with_resume(tmp_path, capsys, monkeypatch):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pre")
    write_digit_folder(tmp_path / "data")
    out = tmp_path / "out"
    common = ["finetune", "--pretrained", str(tmp_path / "pre"), "--data", str(tmp_path / "data"), "--out", str(out)]
    common += ["--feature", "pixels", "--batch-size", "4", "--checkpoint-every", "2", "--no-progress"]
    common += ["--num-inference-steps", "2", "--warmup-steps", "1"]
    trained_steps = []
    training_step = DiADMModule.training_step

    def counting_step(self, batch, batch_idx):
        trained_steps.append(batch_idx)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(DiADMModule, "training_step", counting_step)
    assert main([*common, "--max-steps", "3"]) == 0
    assert "after 3 steps" in capsys.readouterr().out
    assert len(trained_steps) == 3
    # The final step is resumable although 3 is no multiple of --checkpoint-every.
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    first = DiADMPipeline.from_pretrained(out / "pipeline")
    assert first.feature_bank.shape == (12, 64)

    trained_steps.clear()
    assert main([*common, "--max-steps", "5", "--resume", "last", "--irs-every", "4", "--irs-samples", "4"]) == 0
    assert "after 5 steps" in capsys.readouterr().out
    assert len(trained_steps) == 2  # a run that ignored --resume would train 5 steps from scratch
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 5
    assert int(checkpoint["state_dict"]["ema_num_updates"]) == 5  # 3 before the resume, 2 after
    callback_states = [state for key, state in checkpoint["callbacks"].items() if key.startswith("IRSCallback")]
    assert [entry["global_step"] for entry in callback_states[0]["history"]] == [4]

    # Resumed at an epoch boundary (12 images, batches of 4), the seeded run ends where an uninterrupted one ends.
    straight = tmp_path / "straight"
    assert main([*common, "--out", str(straight), "--max-steps", "5", "--logger", "none"]) == 0  # the last --out wins
    resumed_unet = DiADMPipeline.from_pretrained(out / "pipeline").unet
    straight_parameters = dict(DiADMPipeline.from_pretrained(straight / "pipeline").unet.named_parameters())
    for name, parameter in resumed_unet.named_parameters():
        assert torch.equal(parameter, straight_parameters[name]), name
    assert not torch.equal(resumed_unet.feature_projection.weight, first.unet.feature_projection.weight)


def test_finetune_cli_unconditional(tmp_path, capsys):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pre")
    write_digit_folder(tmp_path / "data", count=4)
    out = tmp_path / "out"
    argv = ["finetune", "--pretrained", str(tmp_path / "pre"), "--data", str(tmp_path / "data"), "--out", str(out)]
    argv += ["--unconditional", "--max-steps", "1", "--batch-size", "2", "--logger", "none", "--no-progress"]
    assert main(argv) == 0
    assert type(DDPMPipeline.from_pretrained(out / "pipeline").unet) is UNet2DModel


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume", "missing.ckpt"], "`--resume` must name an existing checkpoint file, got 'missing.ckpt'"),
        (["--max-steps", "1", "--lr", "-1"], "`learning_rate` must be positive, got -1.0."),
        (["--warmup-steps", "-1"], "`--warmup-steps` must be non-negative, got -1."),
        (["--data", "no-such-folder"], "`folder` must be a directory of images"),
        (["--pretrained", "no-such-model"], "`pretrained` must be a diffusers pipeline folder (with model_index.json)"),
    ],
    ids=["resume", "lr", "warmup", "data", "pretrained"],
)
def test_finetune_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "pre")
    write_digit_folder(tmp_path / "data", count=2)
    argv = ["finetune", "--pretrained", str(tmp_path / "pre"), "--data", str(tmp_path / "data")]
    argv += ["--out", str(tmp_path / "out"), "--feature", "pixels", "--logger", "none", *extra]
    assert main(argv) == 2
    assert re.search(re.escape(message), capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-steps", "0"], "argument --max-steps: expected a positive integer, got 0"),
        (["--batch-size", "four"], "argument --batch-size: expected a positive integer, got 'four'"),
        (["--logger", "mlflow"], "argument --logger: invalid choice: 'mlflow'"),
        (["--precision", "8-bit"], "argument --precision: invalid choice: '8-bit'"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got -1"),
    ],
    ids=["max-steps", "batch-size", "logger", "precision", "seed"],
)
def test_finetune_cli_usage_errors_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--pretrained", str(tmp_path), "--data", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert re.search(re.escape(message), capsys.readouterr().err)


def test_finetune_cli_loggers(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from diadm.cli.finetune import _logger

    tensorboard = _logger("tensorboard", tmp_path)
    assert isinstance(tensorboard, TensorBoardLogger)
    assert Path(tensorboard.root_dir) == tmp_path / "runs" / "finetune"
    assert isinstance(_logger("wandb", tmp_path), WandbLogger)  # no run starts before the first log call
    assert _logger("none", tmp_path) is False
    monkeypatch.setattr("diadm._imports.WANDB_AVAILABLE", False)
    message = "`diadm finetune --logger wandb` needs `wandb`, which is not installed. Install it with"
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        _logger("wandb", tmp_path)


def test_finetune_cli_bare_unet_needs_a_scheduler(tmp_path, capsys):
    tiny_unet().save_pretrained(tmp_path / "unet")
    write_digit_folder(tmp_path / "data", count=2)
    argv = ["finetune", "--pretrained", str(tmp_path / "unet"), "--data", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "holds a bare UNet without a scheduler" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_example_runs_in_tiny_mode():
    script = Path(__file__).resolve().parents[2] / "examples" / "finetune_tiny.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--tiny"], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert re.search(r"^5 steps: \d+ of 64 training digits retrieved by 32$", completed.stdout, flags=re.MULTILINE)
    assert "adjusted IRS" in completed.stdout
