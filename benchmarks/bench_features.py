# SPDX-License-Identifier: Apache-2.0
"""Time the feature extractors against the plain float32 eval forward of the same torchvision network.

For each extractor (random weights, so no file is needed; speed does not depend on the weights) and one batch of
uint8 images at the network's native size, the script times:

- `ours`: the diadm extractor end to end (input checks, uint8 to float, preprocessing, channels-last memory
  format, `torch.inference_mode`);
- `ours-nchw`: the same with `channels_last=False`, to separate the memory-format effect;
- `plain`: the textbook baseline, the torchvision network (`resnet50` without classifier, `inception_v3`) in eval
  mode under `torch.no_grad` on already normalised float32 NCHW input;
- on a GPU also `ours-bf16`: `autocast_dtype=torch.bfloat16`, with the largest feature deviation it causes.

It prints images per second (wall) and per CPU-second (CPU time summed over threads, the stable measure on a
shared machine), and the ratios to `plain` (above 1: faster). The features of `ours` and `plain` are compared on
the same weights. Run by hand, about a minute on 2 idle cores:

    python benchmarks/bench_features.py                  # batch 8, best of 3
    python benchmarks/bench_features.py --batch 2 --repeats 1
"""

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from diadm.features import PixelFeatures
from diadm.features.inception import InceptionFeatures
from diadm.features.swav import IMAGENET_MEAN, IMAGENET_STD, SwAVFeatures


def measure(function: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Best wall and CPU seconds over `repeats` after one warm-up call, and the last result."""
    result = function()
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        if result.is_cuda:
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def plain_swav(ours: SwAVFeatures) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    from torchvision.models import resnet50

    network = resnet50(weights=None)
    network.fc = nn.Identity()
    network.load_state_dict(ours.network.state_dict())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return network.eval(), lambda imgs: (imgs.float() / 255 - mean.to(imgs.device)) / std.to(imgs.device)


def plain_inception() -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    from torchvision.models import inception_v3

    network = inception_v3(weights=None, aux_logits=False, init_weights=False)
    network.fc = nn.Identity()
    return network.eval(), lambda imgs: (imgs.float() - 128) / 128


def row(label: str, batch: int, wall: float, cpu: float, base: tuple[float, float] | None) -> str:
    text = f"  {label:<10} {batch / wall:9.1f} img/s  {batch / cpu:9.1f} img/CPU-s"
    if base is not None:
        text += f"   speed-up wall {base[0] / wall:5.2f}x  CPU {base[1] / cpu:5.2f}x"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, batch {args.batch}")

    # Pixels: nothing to compare with but the arithmetic itself.
    imgs = torch.randint(0, 256, (args.batch, 3, 64, 64), dtype=torch.uint8, device=device)
    pixels = PixelFeatures()
    base = measure(lambda: (imgs.float() / 255).flatten(1), args.repeats)
    print("pixels (64 x 64 RGB)")
    print(row("plain", args.batch, *base[:2], None))
    print(row("ours", args.batch, *measure(lambda: pixels(imgs), args.repeats)[:2], base[:2]))

    cases = {
        "swav": (224, lambda **kw: SwAVFeatures(pretrained=False, **kw)),
        "inception": (299, lambda **kw: InceptionFeatures(pretrained=False, **kw)),
    }
    for name, (size, build) in cases.items():
        torch.manual_seed(0)
        ours = build().to(device)
        ours_nchw = build(channels_last=False).to(device)
        ours_nchw.load_state_dict(ours.state_dict())
        if name == "swav":
            network, prepare = plain_swav(ours)
        else:
            network, prepare = plain_inception()
            # torchvision's Inception3 has the same parameter names; its pools differ (the FID graph's do not
            # count padding), which changes the features but not the cost.
            network.load_state_dict(ours.network.state_dict(), strict=False)
        network.to(device)
        imgs = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)

        def plain(network: nn.Module = network, prepare: Callable = prepare, imgs: torch.Tensor = imgs) -> torch.Tensor:
            with torch.no_grad():
                return network(prepare(imgs))

        print(f"{name} ({size} x {size} uint8 RGB)")
        base_wall, base_cpu, reference = measure(plain, args.repeats)
        print(row("plain", args.batch, base_wall, base_cpu, None))
        wall, cpu, features = measure(lambda ours=ours, imgs=imgs: ours(imgs), args.repeats)
        print(row("ours", args.batch, wall, cpu, (base_wall, base_cpu)))
        timing = measure(lambda ours_nchw=ours_nchw, imgs=imgs: ours_nchw(imgs), args.repeats)
        print(row("ours-nchw", args.batch, *timing[:2], (base_wall, base_cpu)))
        if name == "swav":
            deviation = ((features - reference).abs().max() / reference.abs().max()).item()
            print(f"  max |ours - plain| / max |plain| = {deviation:.1e}")
        if device.type == "cuda":
            bf16 = build(autocast_dtype=torch.bfloat16).to(device)
            bf16.load_state_dict(ours.state_dict())
            wall, cpu, low = measure(lambda bf16=bf16, imgs=imgs: bf16(imgs), args.repeats)
            print(row("ours-bf16", args.batch, wall, cpu, (base_wall, base_cpu)))
            deviation = ((low - features).abs().max() / features.abs().max()).item()
            print(f"  bf16: max |bf16 - float32| / max |float32| = {deviation:.1e}")


if __name__ == "__main__":
    main()
