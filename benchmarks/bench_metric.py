# SPDX-License-Identifier: Apache-2.0
"""Overhead of `ImageRetrievalScore` (update_features + compute) over calling `image_retrieval_score` directly.

Run by hand: `python benchmarks/bench_metric.py [--num-train 10000 --num-generated 5000 --num-features 2048]`.
Both sides get the same precomputed float32 features (training, held-out and generated); the metric receives them
in batches, as a training loop would. Printed, each as the fastest of `--repeats` alternating runs, in wall time
and in CPU time of this process (the minimum CPU time is the measure least disturbed by other processes on a
shared machine):

1. cold: a fresh metric, every batch added, one `compute()`, against one `image_retrieval_score` call (both
   build the exact index). The goal is a ratio within 1.1.
2. warm: a metric with `reset_real_features=False` re-evaluated on new generated features (it reuses its cached
   index), against `image_retrieval_score` rebuilding the index each time.
3. the float16-storage variant of 1.
4. the metric's bookkeeping alone: CPU time of a cold run outside `image_retrieval_score` and the index build, as a
   share of the direct call (the end-to-end ratios carry the search's own run-to-run noise).
"""

import argparse
import time

import torch

import diadm.metric
from diadm.functional import image_retrieval_score
from diadm.metric import ImageRetrievalScore


def make_features(num_train: int, num_generated: int, num_features: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(num_train, num_features, generator=generator)
    picks = torch.randint(0, num_train // 4, (num_generated,), generator=generator)
    generated = train[picks] + 0.1 * torch.randn(num_generated, num_features, generator=generator)
    held_out = train[torch.randint(0, num_train, (num_generated,), generator=generator)]
    held_out = held_out + 0.1 * torch.randn(num_generated, num_features, generator=generator)
    return {"train": train, "generated": generated, "held_out": held_out}


def fill(metric: ImageRetrievalScore, data: dict[str, torch.Tensor], batch_size: int, real: bool = True) -> None:
    if real:
        for batch in data["train"].split(batch_size):
            metric.update_features(batch, real=True)
        for batch in data["held_out"].split(batch_size):
            metric.update_features(batch, real=True, held_out=True)
    for batch in data["generated"].split(batch_size):
        metric.update_features(batch, real=False)


def time_once(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--num-generated", type=int, default=5_000)
    parser.add_argument("--num-features", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    args = parser.parse_args()
    data = make_features(args.num_train, args.num_generated, args.num_features)

    def direct() -> None:
        image_retrieval_score(data["train"], data["generated"], data["held_out"], backend=args.backend)

    def metric_cold(dtype: torch.dtype = torch.float32) -> None:
        metric = ImageRetrievalScore(feature=None, feature_dtype=dtype, backend=args.backend)
        fill(metric, data, args.batch_size)
        metric.compute()

    warm = ImageRetrievalScore(feature=None, reset_real_features=False, backend=args.backend)
    fill(warm, data, args.batch_size)
    warm.compute()

    def metric_warm() -> None:
        warm.reset()
        fill(warm, data, args.batch_size, real=False)
        warm.compute()

    # the two sides must agree before their times mean anything
    check = ImageRetrievalScore(feature=None, backend=args.backend)
    fill(check, data, args.batch_size)
    scores = check.compute()
    reference = image_retrieval_score(data["train"], data["generated"], data["held_out"], backend=args.backend)
    assert scores["n_learned"].item() == reference.synthetic.n_learned
    assert abs(scores["irs_adjusted"].item() - reference.irs_adjusted) < 1e-6

    # the metric's own cost, free of the search's run-to-run noise: a cold run minus the CPU time spent inside
    # image_retrieval_score and the index build (both of which the direct call pays as well)
    inner: list[float] = []

    def timed(fn):
        def wrapper(*fn_args, **fn_kwargs):
            start = time.process_time()
            try:
                return fn(*fn_args, **fn_kwargs)
            finally:
                inner.append(time.process_time() - start)

        return wrapper

    originals = (diadm.metric.image_retrieval_score, diadm.metric.ExactIndex)
    diadm.metric.image_retrieval_score, diadm.metric.ExactIndex = timed(originals[0]), timed(originals[1])
    bookkeeping = []
    for _ in range(args.repeats):
        inner.clear()
        bookkeeping.append(time_once(metric_cold)[1] - sum(inner))
    diadm.metric.image_retrieval_score, diadm.metric.ExactIndex = originals

    times: dict[str, list[tuple[float, float]]] = {"direct": [], "cold": [], "warm": [], "cold_fp16": []}
    for _ in range(args.repeats):
        times["direct"].append(time_once(direct))
        times["cold"].append(time_once(metric_cold))
        times["warm"].append(time_once(metric_warm))
        times["cold_fp16"].append(time_once(lambda: metric_cold(torch.float16)))
    wall = {key: min(t[0] for t in values) for key, values in times.items()}
    cpu = {key: min(t[1] for t in values) for key, values in times.items()}
    print(
        f"features: {args.num_train} train, {args.num_generated} held-out, {args.num_generated} generated,"
        f" width {args.num_features}, batches of {args.batch_size}, backend {args.backend},"
        f" {torch.get_num_threads()} threads, fastest of {args.repeats}"
    )
    print(f"{'':36s} {'wall ms':>9s} {'ratio':>6s}   {'CPU ms':>9s} {'ratio':>6s}")
    for key, label in (
        ("direct", "image_retrieval_score directly"),
        ("cold", "metric update+compute (cold)"),
        ("warm", "metric re-evaluation (cached index)"),
        ("cold_fp16", "metric cold, float16 storage"),
    ):
        print(
            f"{label:36s} {wall[key] * 1e3:9.1f} {wall[key] / wall['direct']:6.3f}"
            f"   {cpu[key] * 1e3:9.1f} {cpu[key] / cpu['direct']:6.3f}"
        )
    own = min(bookkeeping)
    print(
        f"metric bookkeeping (updates, gather, outside search and index build): {own * 1e3:.1f} ms CPU,"
        f" {100 * own / cpu['direct']:.1f} % of the direct call"
    )
    ratio = cpu["cold"] / cpu["direct"]
    print(f"goal (cold CPU-time ratio <= 1.1): {'met' if ratio <= 1.1 else 'NOT met'} ({ratio:.3f})")


if __name__ == "__main__":
    main()
