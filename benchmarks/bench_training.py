# SPDX-License-Identifier: Apache-2.0
"""Cost of DiADM training over the unconditional baseline, per optimizer step, on the demo's tiny UNet.

Measures, in one run and with the same data: the forward + backward + AdamW step of `DiADMModule` with
`conditional=False` (the baseline) and `conditional=True` (feature projection, condition dropout), the EMA update
alone, and both at 1 and 2 torch threads. Times are the median of repeated steps, process CPU time next to wall
time (wall time is unreliable on shared cores).

    python benchmarks/bench_training.py [--steps 30] [--batch-size 64]
"""

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler

from diadm.demo import load_digits_split, tiny_unet
from diadm.training import DiADMModule


def time_steps(module: DiADMModule, batch_size: int, steps: int) -> tuple[float, float, float]:
    optimizer = module.configure_optimizers()["optimizer"]
    inputs = module._inputs[:batch_size]
    indices = torch.arange(batch_size)
    walls, cpus, emas = [], [], []
    for step in range(steps + 3):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = module.loss(inputs, indices)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        middle = time.perf_counter()
        module.update_ema()
        end = time.perf_counter()
        if step >= 3:  # warm-up
            walls.append(end - wall)
            cpus.append(time.process_time() - cpu)
            emas.append(end - middle)
    return statistics.median(walls), statistics.median(cpus), statistics.median(emas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    train, _ = load_digits_split(1000, 797)
    print(f"tiny UNet (16, 32), 8x8 digits, batch {args.batch_size}, median of {args.steps} steps")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results = {}
        for conditional in (False, True):
            torch.manual_seed(0)
            module = DiADMModule(
                tiny_unet((16, 32)),
                train,
                scheduler=DDPMScheduler(num_train_timesteps=1000),
                feature="pixels",
                conditional=conditional,
            )
            results[conditional] = time_steps(module, args.batch_size, args.steps)
        (base_wall, base_cpu, _), (cond_wall, cond_cpu, cond_ema) = results[False], results[True]
        print(
            f"threads {threads}: baseline {base_wall * 1e3:.1f} ms wall / {base_cpu * 1e3:.1f} ms CPU,"
            f" DiADM {cond_wall * 1e3:.1f} ms wall / {cond_cpu * 1e3:.1f} ms CPU,"
            f" DiADM / baseline (CPU) {cond_cpu / base_cpu:.3f}, EMA update {cond_ema * 1e3:.2f} ms"
            f" ({cond_ema / cond_wall:.1%} of a step)"
        )


if __name__ == "__main__":
    main()
