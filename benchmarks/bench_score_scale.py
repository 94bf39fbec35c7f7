# SPDX-License-Identifier: Apache-2.0
"""Run `diadm score` on large precomputed feature files and report its time and peak memory.

The script writes a training feature file of `--num-train` x `--dim` random features (float16 by default, as a
float16 cache or `.npy` of SwAV features would be) and a synthetic file of `--num-queries` rows near random training
rows, then runs the real command in this process (`diadm.cli.main(["score", ..., "--features"])`) and reports:

- wall and CPU seconds (CPU summed over threads: the stable measure on a shared machine) of the whole command,
  with the retrieval part taken from the command's own JSON timings;
- the peak resident memory of the process (sampled every 10 ms, and `ru_maxrss`), and the size of the features;
- the retrieval throughput in query x reference pairs per CPU second, and the time it extrapolates to for
  1.28 million x 2048 ImageNet features and 50,000 queries at the same throughput.

Run by hand (it is not part of the test suite):

    python benchmarks/bench_score_scale.py                                  # 200000 x 2048 float16, 2000 queries
    python benchmarks/bench_score_scale.py --num-train 20000 --num-queries 500   # quick check
    python benchmarks/bench_score_scale.py --backend torch --device cuda    # on a GPU

Largest size measured (2026-12-03, 2 shared CPU cores, torch 2 threads, no GPU available), 200,000 x 2048 float16
training features (0.76 GiB on disk):

| backend | queries | peak RSS above the interpreter | retrieval CPU s | GFLOP per CPU s | ImageNet estimate |
| --- | --- | --- | --- | --- | --- |
| auto (faiss) | 500 | 3.84 GiB (5.0 x the float16 size) | 18.4 | 22.3 | 11,800 CPU s |
| torch | 200 | 2.69 GiB (3.5 x) | 7.6 | 21.6 | 12,200 CPU s |

(`--num-train 200000 --num-queries 500` and `--num-train 200000 --num-queries 200 --backend torch`.) The peak
holds the float32 copy of the reference (2 x the float16 size), faiss's own copy of it (another 2 x, faiss only),
a finiteness mask (0.5 x) and the loaded float16 file while it is converted. For ImageNet (1.28 million x 2048,
4.9 GiB in float16) this extrapolates to about 17 GiB with `--backend torch` and 25 GiB with faiss, and about
12,000 CPU seconds (3.3 CPU hours) of retrieval for 50,000 queries: divide by the cores used.
"""

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from diadm.cli import main

_PAGE = os.sysconf("SC_PAGE_SIZE")
IMAGENET_TRAIN = 1_281_167
IMAGENET_QUERIES = 50_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


class PeakSampler(threading.Thread):
    """Sample the resident set size every 10 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until `stop` is called."""
        while not self._stop_event.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak


def write_features(path: Path, num_rows: int, dim: int, dtype: np.dtype, seed: int) -> None:
    """Write (num_rows, dim) standard-normal features to a .npy file in blocks, to keep memory flat."""
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num_rows, dim))
    for start in range(0, num_rows, 20_000):
        stop = min(start + 20_000, num_rows)
        array[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    array.flush()
    del array


def write_queries(path: Path, train_path: Path, num_queries: int, seed: int) -> None:
    """Queries near random training rows (a generator that reproduces part of its training set)."""
    rng = np.random.default_rng(seed + 1)
    train = np.load(train_path, mmap_mode="r")
    rows = np.sort(rng.integers(0, train.shape[0], num_queries))
    queries = train[rows].astype(np.float32) + 0.05 * rng.standard_normal((num_queries, train.shape[1]), np.float32)
    np.save(path, queries.astype(train.dtype))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--num-queries", type=int, default=2_000)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory-mb", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the feature files go (default: a temporary folder)")
    return parser.parse_args()


def run(args: argparse.Namespace, workdir: Path) -> dict:
    train_path, query_path, out = workdir / "train.npy", workdir / "synthetic.npy", workdir / "result.json"
    started = time.perf_counter()
    write_features(train_path, args.num_train, args.dim, np.dtype(args.dtype), args.seed)
    write_queries(query_path, train_path, args.num_queries, args.seed)
    print(f"wrote {train_path.stat().st_size / 2**30:.2f} GiB of features in {time.perf_counter() - started:.1f} s")

    baseline = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    argv = [
        "score",
        str(train_path),
        str(query_path),
        "--features",
        "--json",
        str(out),
        "--no-progress",
        "--backend",
        args.backend,
        "--device",
        args.device,
        "--max-memory-mb",
        str(args.max_memory_mb),
    ]
    code = main(argv)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = sampler.stop()
    if code != 0:
        raise SystemExit(f"diadm score failed with exit code {code}")
    record = json.loads(out.read_text())
    pairs = args.num_train * args.num_queries
    retrieval_s = record["timings_s"]["retrieval_s"]
    retrieval_cpu_s = record["timings_s"]["retrieval_cpu_s"]
    # The search cost is linear in the number of queries, of reference rows and in D.
    scale = IMAGENET_TRAIN * IMAGENET_QUERIES * 2048 / (pairs * args.dim)
    return {
        "num_train": args.num_train,
        "dim": args.dim,
        "num_queries": args.num_queries,
        "dtype": args.dtype,
        "backend": args.backend,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "feature_gib": round(args.num_train * args.dim * np.dtype(args.dtype).itemsize / 2**30, 3),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_s": record["timings_s"]["features_s"],
        "retrieval_s": retrieval_s,
        "retrieval_cpu_s": retrieval_cpu_s,
        "gflop_per_cpu_s": round(2 * pairs * args.dim / retrieval_cpu_s / 1e9, 1),
        "peak_rss_gib": round(peak / 2**30, 3),
        "peak_extra_rss_gib": round((peak - baseline) / 2**30, 3),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
        "n_learned": record["synthetic"]["n_learned"],
        # ImageNet (1.28 M x 2048, 50,000 queries): CPU seconds at this throughput; divide by the cores used.
        "imagenet_retrieval_cpu_s_estimate": round(retrieval_cpu_s * scale),
        "imagenet_retrieval_wall_s_estimate": round(retrieval_s * scale),
    }


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.workdir:
        Path(arguments.workdir).mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(arguments, Path(arguments.workdir))))
    else:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run(arguments, Path(folder))))
