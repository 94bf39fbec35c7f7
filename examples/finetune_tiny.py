# SPDX-License-Identifier: Apache-2.0
"""Fine-tune an unconditional diffusers pipeline into DiADM, save it, reload it and score its coverage.

A randomly initialised tiny `DDPMPipeline` stands in for a pretrained unconditional model (nothing is downloaded),
and scikit-learn's bundled 8x8 digits are the training images. The script converts the UNet with `DiADMModule`
(pixel features, condition dropout, EMA), trains it with a Lightning `Trainer`, saves the EMA weights as a
`DiADMPipeline`, reloads that folder, samples one image per held-out digit and prints the Image Retrieval Score.

Run it:

    python examples/finetune_tiny.py --steps 300      # about a minute on a laptop CPU
    python examples/finetune_tiny.py --tiny           # a few steps, what CI runs
"""

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler
from lightning.pytorch import Trainer, seed_everything

from diadm import DiADMModule, DiADMPipeline, image_retrieval_score
from diadm.demo import load_digits_split, tiny_unet


def main() -> None:
    """Parse the options, fine-tune, save, reload, sample and print the scores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--tiny", action="store_true", help="5 steps and 64 images, for CI")
    parser.add_argument("--out", type=Path, default=None, help="where to save the pipeline (default: a temp dir)")
    args = parser.parse_args()
    steps, num_train, num_held_out = (5, 64, 32) if args.tiny else (args.steps, 1000, 797)

    seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # the tiny UNet runs fastest on one thread
    train, held_out = load_digits_split(num_train, num_held_out, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "diadm"
        # 1. An unconditional pipeline on disk: what a user would have after ordinary diffusers training.
        pretrained = DDPMPipeline(unet=tiny_unet((16, 32)), scheduler=DDPMScheduler(num_train_timesteps=1000))
        pretrained.save_pretrained(Path(scratch) / "pretrained")

        # 2. Fine-tune it into DiADM.
        module = DiADMModule(
            Path(scratch) / "pretrained",
            train,
            feature="pixels",
            learning_rate=2e-3,
            warmup_steps=min(100, steps),
            ema_decay=0.995,
            sample_scheduler=DDIMScheduler(num_train_timesteps=1000),
            num_inference_steps=50,
        )
        trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False)
        trainer.fit(module)
        module.save(out)

        # 3. Reload the folder, sample one image per held-out digit, one distinct training feature each.
        pipeline = DiADMPipeline.from_pretrained(out)
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(num_train, generator=generator)[:num_held_out]
        output = pipeline(batch_size=num_held_out, feature_indices=indices, generator=generator, output_type="pt")
        samples = output.images

    # 4. Coverage of the training digits, in pixel space, adjusted by the held-out digits.
    result = image_retrieval_score(train.flatten(1), samples.flatten(1).cpu(), held_out.flatten(1))
    print(f"{steps} steps: {result.synthetic.n_learned} of {num_train} training digits retrieved by {num_held_out}")
    print(f"IRS_inf {result.synthetic.irs_inf:.3f} [{result.synthetic.irs_inf_lower:.3f}, ", end="")
    print(f"{result.synthetic.irs_inf_upper:.3f}], adjusted IRS {result.irs_adjusted:.3f}")


if __name__ == "__main__":
    main()
