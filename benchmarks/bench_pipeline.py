# SPDX-License-Identifier: Apache-2.0
"""Time `DiADMPipeline` against diffusers' `DDPMPipeline` and `DDIMPipeline` on the same UNet and steps.

Run by hand: `python benchmarks/bench_pipeline.py [--repeats 7 --steps 20 --batch-size 8 --threads 1]`.
The goal is a ratio within 1.05x: DiADM adds one (B, D) x (D, E) product before the loop and one addition to the
timestep embedding per step. Repetitions are interleaved (baseline, DiADM, baseline, ...) so machine load hits both
alike; the median is reported. It also prints the parameter overhead of the feature projection and null embedding
in percent, for the benchmarked UNet and for a UNet the size of google/ddpm-cifar10-32 with 2048-d SwAV features.
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diadm.models.feature_conditioned_unet import FeatureConditionedUNet
from diadm.pipelines.pipeline_diadm import DiADMPipeline

FEATURE_DIM = 2048  # SwAV ResNet-50 pool features, the paper's recommendation


def bench_unet() -> UNet2DModel:
    """A small 32 x 32 pixel UNet with one attention level, big enough that per-step overhead would show."""
    return UNet2DModel(
        sample_size=32,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def cifar10_sized_unet() -> UNet2DModel:
    """The architecture of google/ddpm-cifar10-32 (35.7 M parameters), randomly initialised."""
    return UNet2DModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def overhead_percent(unet: UNet2DModel) -> tuple[int, int, float]:
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    base = unet.num_parameters()
    added = model.num_parameters() - base
    return base, added, 100.0 * added / base


def time_call(pipeline: object, **kwargs: object) -> float:
    start = time.perf_counter()
    pipeline(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = bench_unet()
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM).eval()
    bank = torch.randn(1000, FEATURE_DIM)
    pairs = {
        "DDPM": (DDPMPipeline(unet, DDPMScheduler()), DiADMPipeline(model, DDPMScheduler(), feature_bank=bank)),
        "DDIM": (DDIMPipeline(unet, DDIMScheduler()), DiADMPipeline(model, DDIMScheduler(), feature_bank=bank)),
    }
    kwargs = {"batch_size": args.batch_size, "num_inference_steps": args.steps}
    print(
        f"UNet {unet.num_parameters() / 1e6:.2f} M parameters, batch {args.batch_size}, {args.steps} steps,"
        f" {args.threads} thread(s), median of {args.repeats} interleaved repetitions"
    )
    for name, (baseline, diadm) in pairs.items():
        for pipeline in (baseline, diadm):
            pipeline.set_progress_bar_config(disable=True)
            time_call(pipeline, **kwargs)  # warm-up
        times: dict[str, list[float]] = {"baseline": [], "diadm": []}
        for _ in range(args.repeats):
            times["baseline"].append(time_call(baseline, **kwargs))
            times["diadm"].append(time_call(diadm, **kwargs))
        base, ours = statistics.median(times["baseline"]), statistics.median(times["diadm"])
        print(f"{name}Pipeline {base:.3f} s   DiADMPipeline {ours:.3f} s   ratio {ours / base:.3f}x (goal <= 1.05x)")

    for label, make in (("benchmarked UNet", bench_unet), ("ddpm-cifar10-32-sized UNet", cifar10_sized_unet)):
        base_count, added, percent = overhead_percent(make())
        print(
            f"{label}: {base_count:,} parameters, projection + null embedding for D={FEATURE_DIM} add {added:,}"
            f" ({percent:.2f} %)"
        )


if __name__ == "__main__":
    main()
