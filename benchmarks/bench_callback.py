# SPDX-License-Identifier: Apache-2.0
"""Benchmark IRSCallback: its overhead per evaluation over sampling alone, and the samples `target_ci_width` needs.

Part 1 trains a tiny diffusers UNet on scikit-learn's digits (1,797 8x8 images, bundled, no download) with the
callback on every epoch, pixel features, FID and TensorBoard pictures on, and times each evaluation against the
time the sampler alone took inside it. Part 2 runs the callback's precision loop (`target_ci_width`, rounds of
1,000 samples) against a 50,000-image training set for models that cover 10 %, 50 % and 90 % of it, and reports
the samples used next to the interval the paper's fixed 50,000 samples give.

Run: `.venv/bin/python benchmarks/bench_callback.py` (about a minute on two CPU cores; `--quick` for a smoke run).
"""

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from diadm.callback import IRSCallback
from diadm.estimator import estimate_irs


class TinyDiffusion(pl.LightningModule):
    """A two-level UNet2DModel trained with DDPM's epsilon loss."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images
        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=100)

    def training_step(self, batch, batch_idx):
        """The denoising loss of one batch."""
        clean = batch[0] * 2 - 1
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 100, (clean.shape[0],))
        return F.mse_loss(self.unet(self.scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)

    def configure_optimizers(self):
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        """The training images, shuffled."""
        return DataLoader(TensorDataset(self.images), batch_size=64, shuffle=True)


class TimedIRSCallback(IRSCallback):
    """Records the wall time of each evaluation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.evaluation_seconds: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Evaluate as IRSCallback does, and time it."""
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.evaluation_seconds.append(time.perf_counter() - start)


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16


def overhead(num_samples: int, num_steps: int, epochs: int) -> None:
    sampling_seconds: list[float] = []

    def sample_fn(pl_module, num_images, generator):
        start = time.perf_counter()
        pipe = DDPMPipeline(unet=pl_module.unet, scheduler=DDPMScheduler.from_config(pl_module.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=num_images, generator=generator, num_inference_steps=num_steps, output_type="np")
        sampling_seconds.append(time.perf_counter() - start)
        return torch.from_numpy(images.images).permute(0, 3, 1, 2)

    images = digits()
    with tempfile.TemporaryDirectory() as folder:
        irs = TimedIRSCallback(
            num_samples=num_samples, sample_batch_size=num_samples, sample_fn=sample_fn, feature="pixels"
        )
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=2,
            callbacks=[irs],
            logger=TensorBoardLogger(folder),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(TinyDiffusion(images))
    total, sampled = irs.evaluation_seconds, sampling_seconds
    extra = [t - s for t, s in zip(total, sampled, strict=True)]
    print(f"Part 1: {images.shape[0]} training digits, {num_samples} samples x {num_steps} DDPM steps per evaluation")
    print(f"  first evaluation (real features, index, FID statistics): {total[0]:.3f} s, sampling {sampled[0]:.3f} s")
    later = slice(1, None) if len(total) > 1 else slice(None)
    print(
        f"  later evaluations, median of {len(total[later])}: total {statistics.median(total[later]):.3f} s,"
        f" sampling {statistics.median(sampled[later]):.3f} s, callback overhead"
        f" {statistics.median(extra[later]):.3f} s"
        f" ({100 * statistics.median(extra[later]) / statistics.median(sampled[later]):.0f} % of sampling)"
    )


def samples_needed(num_train: int, coverages: list[float], targets: list[float], round_size: int) -> None:
    # Distinct random 4x4 "images": pixel features are the images, and exact retrieval finds each one itself.
    real = torch.rand(num_train, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    features = real.flatten(1)
    print(f"Part 2: samples `target_ci_width` needs, N_train = {num_train}, rounds of {round_size}")
    print("  coverage  target  samples used  width reached  irs_inf   | fixed 50,000: width  irs_inf")
    for coverage in coverages:
        covered = int(coverage * num_train)

        def sample_fn(pl_module, num_images, generator, covered=covered):
            return real[torch.randint(0, covered, (num_images,), generator=generator)]

        fixed = estimate_irs(num_train, 50_000, int(covered * (1 - (1 - 1 / covered) ** 50_000)))
        for target in targets:
            irs = IRSCallback(
                num_samples=round_size,
                sample_batch_size=10_000,
                sample_fn=sample_fn,
                feature="pixels",
                real_features=features,
                target_ci_width=target,
                max_samples=50_000,
                log_images=False,
                compute_fid=False,
            )
            trainer = pl.Trainer(
                max_epochs=1,
                limit_train_batches=1,
                callbacks=[irs],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(TinyDiffusion(torch.rand(2, 1, 8, 8)))
            entry = irs.history[0]
            width = entry["irs_inf_upper"] - entry["irs_inf_lower"]
            print(
                f"  {coverage:8.0%}  {target:6.2f}  {entry['num_samples']:12d}  {width:13.4f}  {entry['irs_inf']:.4f}"
                f"    | {fixed.irs_inf_upper - fixed.irs_inf_lower:19.4f}  {fixed.irs_inf:.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the trainers' banners would split the tables
    torch.manual_seed(0)
    if args.quick:
        overhead(num_samples=32, num_steps=2, epochs=2)
        samples_needed(2_000, [0.5], [0.1], round_size=200)
    else:
        overhead(num_samples=256, num_steps=10, epochs=4)
        samples_needed(50_000, [0.1, 0.5, 0.9], [0.1, 0.05, 0.02], round_size=1_000)


if __name__ == "__main__":
    main()
