# SPDX-License-Identifier: Apache-2.0
"""`diadm sample`: write PNG images sampled from a saved `DiADMPipeline`."""

import argparse
import logging
import os
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from diadm.cli._arguments import positive_int

# --scheduler name -> diffusers scheduler class name; None keeps the scheduler saved with the pipeline.
SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of `diadm sample`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", type=Path, help="directory written by DiADMPipeline.save_pretrained"
    )
    parser.add_argument("--num-images", type=positive_int, required=True, help="number of images to write")
    parser.add_argument("--out", type=Path, required=True, help="output directory, created if missing")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument(
        "--guidance-scale", type=float, default=1.0, help="1 (default) samples the conditional model alone"
    )
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="replace the saved scheduler (same config)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Sample `--num-images` images in batches and write them as `000000.png`, `000001.png`, ... to `--out`.

    Each image is conditioned on a feature vector drawn from the pipeline's feature bank. A progress bar counts the
    images written; the per-step bar of the pipeline is switched off.

    Args:
        args: The parsed arguments.

    Returns:
        0 on success.

    Raises:
        ValueError: If `MODEL_DIR` is not a directory holding `model_index.json`, or as `DiADMPipeline.__call__`
            does.
    """
    import diffusers
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    from diadm.pipelines.pipeline_diadm import DiADMPipeline

    if not (args.model_dir / "model_index.json").is_file():
        found = "a directory without model_index.json" if args.model_dir.is_dir() else "no directory"
        raise ValueError(
            f"`MODEL_DIR` must be a directory written by DiADMPipeline.save_pretrained, got {str(args.model_dir)!r}"
            f" ({found}); save a pipeline with `pipeline.save_pretrained(MODEL_DIR)` or `diadm finetune`."
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DiADMPipeline.from_pretrained(args.model_dir).to(device)
    if args.scheduler is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[args.scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # Check the sampling arguments (guidance against the model, for one) before anything is written.
    first_batch = min(args.batch_size, args.num_images)
    pipeline.check_inputs(first_batch, None, None, generator, args.steps, args.guidance_scale, "pil")
    os.makedirs(args.out, exist_ok=True)
    written = 0
    with tqdm(total=args.num_images, desc="diadm sample", unit="image") as progress:
        while written < args.num_images:
            batch_size = min(args.batch_size, args.num_images - written)
            output = pipeline(
                batch_size=batch_size,
                generator=generator,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                output_type="pil",
            )
            images = cast(ImagePipelineOutput, output).images
            for image in images:
                image.save(args.out / f"{written:06d}.png")
                written += 1
            progress.update(batch_size)
    logger.info("wrote %d images to %s", written, args.out)
    return 0
