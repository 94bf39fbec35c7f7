# SPDX-License-Identifier: Apache-2.0
"""`diadm finetune`: fine-tune an unconditional diffusers model on a folder of images into DiADM.

Writes into `--out`: `checkpoints/` (Lightning checkpoints every `--checkpoint-every` steps, and `last.ckpt`, which
holds the final step, for `--resume`), `runs/` (TensorBoard logs, or W&B with `--logger wandb`) and `pipeline/` (the
EMA weights as a `DiADMPipeline`, or a `DDPMPipeline`/`LDMPipeline` with `--unconditional`). The same `--seed` gives
DiADM and its `--unconditional` baseline the same initial weights, data order, noise and timesteps.
"""

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from diadm.cli._arguments import positive_int

log = logging.getLogger(__name__)

LOGGERS = ("tensorboard", "wandb", "none")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true")


def _seed(text: str) -> int:
    # The bounds of `seed_everything` (numpy's legacy seeding), checked here so the message names the option.
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {2**32 - 1}], got {text!r}") from err
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {2**32 - 1}], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `diadm finetune`."""
    parser.add_argument("--pretrained", type=Path, required=True, help="diffusers pipeline or UNet2DModel folder")
    parser.add_argument("--data", type=Path, required=True, help="folder of training images (searched recursively)")
    parser.add_argument("--feature", default="swav", help="feature extractor name (default: swav)")
    parser.add_argument("--weights", type=Path, default=None, help="local weights file of the feature extractor")
    parser.add_argument("--out", type=Path, default=Path("diadm-finetune"), help="output folder")
    parser.add_argument("--max-steps", type=positive_int, default=10_000, help="optimizer steps (default: 10000)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: 16)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    parser.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up steps (default: 500)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (default: 0.999)")
    parser.add_argument("--condition-dropout", type=float, default=0.1, help="condition dropout (default: 0.1)")
    parser.add_argument("--unconditional", action="store_true", help="train the unconditional baseline instead")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS, help="Trainer precision")
    parser.add_argument("--accumulate", type=positive_int, default=1, help="gradient accumulation batches")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (default: auto)")
    parser.add_argument("--logger", default="tensorboard", choices=LOGGERS, help="experiment logger")
    parser.add_argument("--checkpoint-every", type=positive_int, default=1000, help="steps between checkpoints")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from, or `last` for OUT/checkpoints")
    parser.add_argument("--irs-every", type=positive_int, default=None, help="log IRS every N steps (IRSCallback)")
    parser.add_argument("--irs-samples", type=positive_int, default=1000, help="samples per IRS evaluation")
    parser.add_argument("--num-inference-steps", type=positive_int, default=50, help="sampling steps")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (default: OUT/cache)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of weights, data order, noise (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _logger(kind: str, out: Path) -> Any:
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out / "runs", name="finetune")
    if kind == "wandb":
        from diadm._imports import WANDB_AVAILABLE, require

        require(WANDB_AVAILABLE, "wandb", "wandb", "`diadm finetune --logger wandb`")
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project="diadm", save_dir=str(out))
    if kind == "none":
        return False
    raise ValueError(f"`--logger` must be one of {LOGGERS}, got {kind!r}.")


def _sample(module: Any, num_images: int, generator: Any, num_inference_steps: int) -> Any:
    """`IRSCallback`'s sampler: the module's EMA weights with the command's number of denoising steps."""
    return module.sample(num_images, generator, num_inference_steps=num_inference_steps)


def _last_checkpoint(path: Path, every: int) -> Any:
    """A callback that writes `path` every `every` optimizer steps and at the final step.

    It saves from `on_train_batch_end`, where `ModelCheckpoint` saves, and not after `fit`: Lightning resumes a
    checkpoint written after `fit` as if in the middle of an epoch, and its data order then departs from an
    uninterrupted run's, while one written at the end of an epoch's last batch resumes exactly (with the module's
    `seed`). `ModelCheckpoint(save_last=True)` alone would miss the final steps when they are no multiple of `every`.
    """
    from lightning.pytorch import Callback, LightningModule, Trainer
    from typing_extensions import override

    class LastCheckpoint(Callback):
        def __init__(self) -> None:
            self.saved_step = -1

        @override
        def on_train_batch_end(
            self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            step = trainer.global_step
            final = trainer.max_steps is not None and step >= trainer.max_steps
            if step != self.saved_step and (step % every == 0 or final):
                trainer.save_checkpoint(path)
                self.saved_step = step

    return LastCheckpoint()


def _resume_path(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    path = out / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise ValueError(
            f"`--resume` must name an existing checkpoint file, got {str(path)!r}; checkpoints are written to"
            f" {str(out / 'checkpoints')!r} (use `--resume last` for the latest)."
        )
    return path


def run(args: argparse.Namespace) -> int:
    """Fine-tune, save the pipeline, and return 0."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from diadm.features import get_feature_extractor
    from diadm.training import DiADMModule, image_size, load_image_folder, load_pretrained

    if args.warmup_steps < 0:
        raise ValueError(f"`--warmup-steps` must be non-negative, got {args.warmup_steps}.")
    out = Path(args.out)
    resume = _resume_path(args.resume, out)
    seed_everything(args.seed, verbose=False)

    # 1. Model, images and features.
    unet, scheduler, autoencoder = load_pretrained(args.pretrained)
    if scheduler is None:
        raise ValueError(
            f"`--pretrained` {str(args.pretrained)!r} holds a bare UNet without a scheduler; pass a pipeline folder"
            " (for example a saved DDPMPipeline), which brings its scheduler."
        )
    inner = getattr(unet, "unet", unet)
    channels = autoencoder.config.in_channels if autoencoder is not None else inner.config.in_channels
    images = load_image_folder(args.data, size=image_size(unet, autoencoder), channels=channels)
    log.info("loaded %d training images of shape %s from %s", images.shape[0], tuple(images.shape[1:]), args.data)
    extractor = None
    if not args.unconditional:
        kwargs = {} if args.weights is None else {"weights": args.weights}
        extractor = get_feature_extractor(args.feature, **kwargs)
    module = DiADMModule(
        unet,
        images,
        scheduler=scheduler,
        autoencoder=autoencoder,
        feature=extractor if extractor is not None else "pixels",
        conditional=not args.unconditional,
        condition_dropout=args.condition_dropout,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        cache_dir=args.cache_dir if args.cache_dir is not None else out / "cache",
        seed=args.seed,
    )

    # 2. Trainer: logger, checkpoints, optional IRS.
    logger = _logger(args.logger, out)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.checkpoint_every)]
    if args.irs_every is not None:
        from diadm.callback import IRSCallback

        callbacks.append(
            IRSCallback(
                num_samples=args.irs_samples,
                every_n_train_steps=args.irs_every,
                sample_fn=partial(_sample, num_inference_steps=args.num_inference_steps),
                feature=extractor if extractor is not None else args.feature,
                real_data=images,
                held_out_data=None,
                log_images=logger is not False,
            )
        )
    # Last, so that the IRS of a step is in the checkpoint of that step.
    callbacks.append(_last_checkpoint(out / "checkpoints" / "last.ckpt", args.checkpoint_every))
    trainer = Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=not args.no_progress,
        log_every_n_steps=max(1, min(50, args.max_steps, -(-images.shape[0] // args.batch_size))),
    )
    trainer.fit(module, ckpt_path=resume)

    # 3. The EMA weights as a pipeline.
    saved = module.save(out / "pipeline")
    # The saved folder is the command's result, so it goes to stdout.
    sys.stdout.write(f"Saved the fine-tuned pipeline to {saved} after {trainer.global_step} steps.\n")
    return 0
