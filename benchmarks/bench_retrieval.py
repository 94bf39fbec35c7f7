# SPDX-License-Identifier: Apache-2.0
"""Time exact retrieval against a chunked `torch.cdist` + `argmin` baseline and the matrix-product floor.

For each size (queries x reference x features) the script times, on the same random float32 features:

- `ExactIndex(reference).search(queries)` on each available backend (index build included);
- a plain chunked baseline: `torch.cdist(query_chunk, reference).argmin(1)` with chunks of the same byte budget;
- the floor: one `queries @ reference.T` of the same shapes (any exact search must do this product).

It prints wall and CPU times (CPU seconds summed over threads: the stable measure on a shared machine, where
wall time mostly measures the neighbours' load), the CPU-time ratios to the baseline and to the floor, the peak
extra resident memory of each (RSS sampled every 10 ms above the level before the call), and whether the indices
agree with the baseline. Run by hand:

    python benchmarks/bench_retrieval.py                      # 20000x5000x2048 and 20000x10000x2048
    python benchmarks/bench_retrieval.py --threads 1 --repeats 2  # steadier on a busy machine
    python benchmarks/bench_retrieval.py --sizes 2000x500x256     # quick check
"""

import argparse
import math
import os
import threading
import time
from collections.abc import Callable

import torch

from diadm._imports import FAISS_AVAILABLE
from diadm.retrieval import DEFAULT_MAX_MEMORY_BYTES, ExactIndex

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def measure(function: Callable[[], torch.Tensor]) -> tuple[float, float, int, torch.Tensor]:
    """Wall and CPU (all threads) seconds of one call, its peak extra RSS, and its result."""
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    done.set()
    sampler.join()
    return wall, cpu, max(0, peak[0] - before), result


def cdist_baseline(queries: torch.Tensor, reference: torch.Tensor, max_memory_bytes: int) -> torch.Tensor:
    rows = max(1, max_memory_bytes // (8 * reference.shape[0]))
    return torch.cat([torch.cdist(chunk, reference).argmin(1) for chunk in queries.split(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["20000x5000x2048", "20000x10000x2048"])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best time is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: current)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {DEFAULT_MAX_MEMORY_BYTES >> 20} MiB")
    backends = ["faiss", "torch"] if FAISS_AVAILABLE else ["torch"]
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        num_queries, num_reference, num_features = (int(part) for part in size.split("x"))
        queries = torch.randn(num_queries, num_features, generator=generator)
        reference = torch.randn(num_reference, num_features, generator=generator)
        print(f"\n{num_queries} x {num_reference} x {num_features}")
        bench_size(queries, reference, backends, args.repeats)


def bench_size(queries: torch.Tensor, reference: torch.Tensor, backends: list[str], repeats: int) -> None:
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "matmul floor": lambda: queries @ reference.T,
        "cdist + argmin": lambda: cdist_baseline(queries, reference, DEFAULT_MAX_MEMORY_BYTES),
    }
    for backend in backends:
        methods[f"ExactIndex {backend}"] = lambda backend=backend: ExactIndex(reference, backend=backend).search(
            queries
        )[0]
    _ = queries[:256] @ reference[:256].T  # warm up thread pools and BLAS
    # rounds interleave the methods, so a burst of load from elsewhere hits all of them alike; keep the best
    best: dict[str, list[float]] = {name: [math.inf, math.inf, 0.0] for name in methods}
    results: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, method in methods.items():
            wall, cpu, memory, result = measure(method)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu), max(best[name][2], memory)]
            if name != "matmul floor":
                results[name] = result
            del result
    floor_cpu, cdist_cpu = best["matmul floor"][1], best["cdist + argmin"][1]
    print(
        f"  {'method':<18}{'wall s':>8}{'cpu s':>8}{'cpu/cdist':>11}{'cpu/matmul':>12}{'peak extra MiB':>16}"
        "  same indices as cdist"
    )
    for name, (wall, cpu, memory) in best.items():
        agrees = str(bool((results[name] == results["cdist + argmin"]).all())) if name.startswith("Exact") else ""
        print(
            f"  {name:<18}{wall:8.2f}{cpu:8.2f}{cpu / cdist_cpu:11.2f}{cpu / floor_cpu:12.2f}{memory / 2**20:16.0f}"
            f"  {agrees}"
        )


if __name__ == "__main__":
    main()
