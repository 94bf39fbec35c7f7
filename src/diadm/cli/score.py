# SPDX-License-Identifier: Apache-2.0
"""`diadm score`: the Image Retrieval Score of folders or files of images or features, with an optional report.

    diadm score TRAIN SYNTH [--test TEST | --split-train] [--feature swav|inception|pixels] [--weights PATH]
                [--device DEVICE] [--batch-size N] [--workers N] [--json OUT] [--report DIR] [--features] ...

TRAIN, SYNTH and TEST are folders of PNG/JPEG/WebP images (searched recursively), CSV lists of image files, or
`.npy`/`.npz`/`.pt` files of images, or of precomputed (N, D) features with `--features`. Features of the real sets
(TRAIN and TEST) are cached on disk, keyed by file content and extractor, so scoring another generator against the
same training set extracts only the synthetic images. The command prints a short table, writes the full result as
JSON with `--json` (extractor, weights checksum, seed, package versions, skipped files), and figures plus an HTML
page with `--report`.

Without held-out real images, `--split-train` holds out a seeded random half of TRAIN as the held-out set (SPEC.md
section 2.7). Of the N readable TRAIN images (in input order), the first `N // 2` positions of
`torch.randperm(N, generator=torch.Generator().manual_seed(seed))` are held out, the same split as
`diadm.functional.split_train_for_test`; the JSON lists both halves' rows under `split_train`.

Note:
    With `--split-train` the reference is only half of TRAIN, so IRS_alpha and IRS_inf (and `N_train` in the table,
    `nearest_train_index` and `retrieval_counts` in the JSON) describe that half. Map `nearest_train_index` to TRAIN
    rows through `split_train.reference_rows`. For the coverage of the whole training set, score once without
    `--split-train` as well, or pass real held-out images with `--test`.

Scale: features are kept in float16 with `--feature-dtype float16` (or as a float16 feature file) and the reference
is searched exactly in blocks of `--max-memory-mb`; on a GPU (`--device cuda`) the torch backend searches there.

Warning:
    float16 halves the storage (cache, feature files, extraction) but not the retrieval: the reference is searched
    as one float32 copy, in CPU memory or, with `--device cuda`, in GPU memory. Peak memory is about 3.5 times the
    float16 size with `--backend torch` and 5 times with faiss (which copies the reference again): 2.7 and 3.8 GiB
    for 200,000 x 2048 features, the largest size measured (`benchmarks/bench_score_scale.py`), so about 17 and
    25 GiB for ImageNet's 1.28 million. A reference that does not fit in memory in float32 cannot be scored: use a
    machine (or GPU) with enough memory, with `--backend torch` on the CPU.

Exit codes: 0 on success; 2 on bad arguments or inputs (argparse errors, a missing or empty input, too few images,
mismatched feature widths); 1 on other failures (an unreadable file without `--skip-bad`, missing weights, ...);
130 when interrupted with Ctrl-C (the finished chunks of the feature cache are kept).
"""

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from typing_extensions import override

from diadm import __version__
from diadm.cache import FeatureCache, fingerprint
from diadm.retrieval import BACKENDS, DEFAULT_MAX_MEMORY_BYTES, ExactIndex

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Packages whose versions go into the JSON result, so a number can be traced to the code that produced it.
VERSIONED_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "faiss-cpu", "faiss-gpu", "pillow", "torchmetrics")
# Queries per progress-bar step of the retrieval.
_QUERY_CHUNK = 8192
_REPORT_IMAGE_SIZE = 64


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 0.5), got {text!r}") from None
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {value}")
    return value


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diadm" / "features"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of `diadm score` on `parser`."""
    from diadm.features import available_feature_extractors

    parser.add_argument("train", metavar="TRAIN", help="training images: folder, CSV list, or .npy/.npz/.pt file")
    parser.add_argument("synthetic", metavar="SYNTH", help="generated images: folder, CSV list, or array file")
    parser.add_argument("--test", metavar="TEST", help="held-out real images, for the adjusted IRS")
    parser.add_argument(
        "--split-train",
        action="store_true",
        help="no held-out set: hold out a random half of TRAIN (seeded by --seed) for the adjusted IRS; the scores"
        " then describe the other half",
    )
    parser.add_argument(
        "--feature",
        default="swav",
        choices=available_feature_extractors(),
        help="feature extractor (default: swav, as the paper recommends)",
    )
    parser.add_argument("--weights", metavar="PATH", help="local weights file of the extractor")
    parser.add_argument(
        "--features", action="store_true", help="the array files hold precomputed (N, D) features, not images"
    )
    parser.add_argument(
        "--image-size", type=_positive_int, metavar="N", help="resize every image to N x N before the extractor"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (default: cpu)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="images per batch (64)")
    parser.add_argument("--workers", type=_non_negative_int, default=0, metavar="N", help="data loader workers (0)")
    parser.add_argument("--json", metavar="OUT", help="write the full result as JSON to this file")
    parser.add_argument("--report", metavar="DIR", help="write figures and index.html into this folder")
    parser.add_argument("--num-show", type=_positive_int, default=16, metavar="N", help="images per report figure")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed in the JSON)")
    parser.add_argument("--cache-dir", metavar="DIR", help=f"feature cache folder (default: {_default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    parser.add_argument("--seed", type=_integer, default=0, help="seed of subsampling and report choices (0)")
    parser.add_argument("--alpha-e", type=_probability, default=0.05, help="error probability of each bound (0.05)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="exact search backend (auto)")
    parser.add_argument(
        "--max-memory-mb",
        type=_positive_int,
        default=DEFAULT_MAX_MEMORY_BYTES // 2**20,
        metavar="MB",
        help="memory budget of one distance block of the search, in MiB (256)",
    )
    parser.add_argument(
        "--feature-dtype",
        choices=tuple(DTYPES),
        help="dtype features are kept in (default: float32 when extracted, as stored in a feature file); float16"
        " halves their memory and cache size",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


class _ProgressIndex(ExactIndex):
    """An `ExactIndex` whose `search` advances a progress bar, query chunk by query chunk."""

    bar: tqdm | None = None

    @override
    def search(self, queries: Tensor | Any) -> tuple[Tensor, Tensor]:
        if self.bar is None or len(queries) <= _QUERY_CHUNK:
            found = super().search(queries)
            if self.bar is not None:
                self.bar.update(len(queries))
            return found
        indices, distances = [], []
        for start in range(0, len(queries), _QUERY_CHUNK):
            part_indices, part_distances = super().search(queries[start : start + _QUERY_CHUNK])
            indices.append(part_indices)
            distances.append(part_distances)
            self.bar.update(len(part_indices))
        return torch.cat(indices), torch.cat(distances)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"`--device` must be cpu, cuda, cuda:N or auto, got {name!r}.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device` is {name!r}, but CUDA is not available here; use `--device cpu`.")
    return device


def _check_path(flag: str, value: str | None) -> None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"`{flag}` must be an existing folder or file, got {value!r}, which does not exist.")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "diadm": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _estimate_dict(estimate: Any) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {
        "n_train": estimate.n_train,
        "n_samples": estimate.n_samples,
        "n_learned": estimate.n_learned,
        "irs_alpha": estimate.irs_alpha,
        "irs_inf": estimate.irs_inf,
        "irs_inf_lower": estimate.irs_inf_lower,
        "irs_inf_upper": estimate.irs_inf_upper,
        "alpha_e": estimate.alpha_e,
    }


def _set_dict(feature_set: Any) -> dict[str, Any]:
    return {
        "source": feature_set.source,
        "kind": feature_set.kind,
        "num_images": len(feature_set),
        "num_features": int(feature_set.features.shape[1]),
        "num_cached": feature_set.num_cached,
        "content_sha256": feature_set.content_sha256,
        "num_skipped": len(feature_set.skipped),
    }


def format_table(result: Any) -> str:
    """The short text table `diadm score` prints: counts, IRS_alpha, IRS_inf with bounds, adjusted IRS.

    Args:
        result: An `IRSResult`.

    Returns:
        Lines of text ending in a newline.

    Example:
        >>> from diadm.functional import image_retrieval_score
        >>> train = torch.eye(4)
        >>> print(format_table(image_retrieval_score(train, train[[0, 0, 1]])), end="")
        queries     N_train        n        k IRS_alpha  IRS_inf  bounds
        ----------------------------------------------------------------
        synthetic         4        3        2    0.5000   0.5000  [0.5000, 1.0000]
        adjusted IRS: pass --test with held-out real images (or --split-train)
    """
    header = f"{'queries':<10} {'N_train':>8} {'n':>8} {'k':>8} {'IRS_alpha':>9} {'IRS_inf':>8}  bounds"
    lines = [header, "-" * len(header)]
    estimates = [("synthetic", result.synthetic)] + ([("held-out", result.test)] if result.test is not None else [])
    for name, e in estimates:
        lines.append(
            f"{name:<10} {e.n_train:>8} {e.n_samples:>8} {e.n_learned:>8} {e.irs_alpha:>9.4f} {e.irs_inf:>8.4f}"
            f"  [{e.irs_inf_lower:.4f}, {e.irs_inf_upper:.4f}]"
        )
    if result.irs_adjusted is not None:
        lines.append(
            f"adjusted IRS {result.irs_adjusted:.4f} +- {result.irs_adjusted_std:.4f}"
            f" (std over {result.num_subsets} synthetic subset(s))"
        )
    else:
        lines.append("adjusted IRS: pass --test with held-out real images (or --split-train)")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Score the synthetic set against the training set and write what was asked for; return the exit code."""
    from diadm.features import extractor_fingerprint, get_feature_extractor
    from diadm.functional import image_retrieval_score
    from diadm.io import load_feature_set

    started, started_cpu = time.perf_counter(), time.process_time()
    # 1. Arguments that argparse cannot check alone.
    for flag, value in (("TRAIN", args.train), ("SYNTH", args.synthetic), ("--test", args.test)):
        _check_path(flag, value)
    if args.split_train and args.test is not None:
        raise ValueError(
            f"`--split-train` holds out half of TRAIN in place of a held-out set, got it together with `--test`"
            f" {args.test!r}; pass one of them."
        )
    if args.weights is not None and args.features:
        raise ValueError("`--weights` has no effect with `--features` (precomputed features); leave one of them out.")
    _check_path("--weights", args.weights)
    device = _resolve_device(args.device)
    dtype = DTYPES.get(args.feature_dtype, torch.float32)
    progress = not args.no_progress

    # 2. The extractor and what identifies it.
    extractor: Any = None
    extractor_info: dict[str, Any] = {
        "name": None,
        "fingerprint": None,
        "weights": args.weights,
        "weights_sha256": None,
    }
    if not args.features:
        extractor = get_feature_extractor(args.feature, weights=args.weights).to(device)
        weights_sha256 = extractor.weights_sha256() if hasattr(extractor, "weights_sha256") else None
        if weights_sha256 is None and args.weights is not None:
            weights_sha256 = fingerprint(Path(args.weights))
        extractor_info = {
            "name": args.feature,
            "fingerprint": extractor_fingerprint(extractor),
            "weights": args.weights,
            "weights_sha256": weights_sha256,
            "image_size": args.image_size,
            "device": str(device),
        }
    cache = None
    if not args.no_cache and not args.features:
        cache = FeatureCache(args.cache_dir if args.cache_dir is not None else _default_cache_dir())

    # 3. Features of every set; only the real ones go through the cache.
    options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": device,
        "image_size": args.image_size,
        "skip_bad": args.skip_bad,
        "progress": progress,
        "dtype": dtype,
    }
    if args.features:
        options = {}
    sets: dict[str, Any] = {}
    for name, path, use_cache in (
        ("train", args.train, True),
        ("synthetic", args.synthetic, False),
        ("test", args.test, True),
    ):
        if path is None:
            continue
        extra = {**options, "desc": f"{name} features"} if options else {}
        try:
            sets[name] = load_feature_set(
                path,
                extractor,
                features=args.features,
                extractor_id=extractor_info["fingerprint"],
                cache=cache if use_cache else None,
                **extra,
            )
        except ValueError as err:
            # An extractor whose width follows the image size (`pixels`) names its own keyword argument; on the
            # command line the fix is `--image-size`.
            if args.features or args.image_size is not None or "width" not in str(err) or "--image-size" in str(err):
                raise
            raise ValueError(
                f"{err} On the command line: pass `--image-size N` to resize every image of `{path}` to N x N."
            ) from err
        if args.features and args.feature_dtype is not None:
            sets[name].features = sets[name].features.to(dtype)
        log.info("%s: %d feature vectors from %s", name, len(sets[name]), path)
    _check_sets(sets)
    # The record describes the inputs as given, before any split.
    inputs = {name: _set_dict(s) for name, s in sets.items()}
    skipped = [{"set": name, "path": i.path, "reason": i.reason} for name, s in sets.items() for i in s.skipped]
    split = None
    if args.split_train:
        sets, split = _split_train(sets, args.seed)
    extracted, extracted_cpu = time.perf_counter(), time.process_time()

    # 4. Exact retrieval and the estimates.
    train, synthetic = sets["train"].features, sets["synthetic"].features
    test = sets["test"].features if "test" in sets else None
    # On a GPU the torch backend searches there; on the CPU faiss (or blocked torch) does.
    on_device = device if device.type == "cuda" else torch.device("cpu")
    # One float32 copy of the reference serves the index and the estimate (no second upcast of float16 features).
    train = train.to(on_device, torch.float32)
    sets["train"].features = train
    index = _ProgressIndex(train, backend=args.backend, max_memory_bytes=args.max_memory_mb * 2**20)
    total = len(synthetic) + (min(len(test), len(synthetic)) if test is not None else 0)
    bar_options: dict[str, Any] = {} if progress else {"disable": True}
    with tqdm(total=total, desc="retrieval", unit="query", file=sys.stderr, **bar_options) as bar:
        index.bar = bar
        result = image_retrieval_score(
            train,
            synthetic.to(on_device),
            None if test is None else test.to(on_device),
            alpha_e=args.alpha_e,
            seed=args.seed,
            index=index,
        )
        index.bar = None
    finished, finished_cpu = time.perf_counter(), time.process_time()
    timings = {
        "features_s": extracted - started,
        "retrieval_s": finished - extracted,
        # CPU seconds of this process summed over its threads (data loader workers excluded).
        "features_cpu_s": extracted_cpu - started_cpu,
        "retrieval_cpu_s": finished_cpu - extracted_cpu,
    }

    # 5. Output: the table, the JSON record, the report.
    sys.stdout.write(format_table(result))
    record = _record(args, result, inputs, skipped, extractor_info, timings, split)
    if args.json is not None:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        log.info("wrote %s", target)
    if args.report is not None:
        _write_report(args, result, sets, record)
    return 0


def _check_sets(sets: dict[str, Any]) -> None:
    """Clear errors for sets too small to score and for features of different widths."""
    flags = {"train": "TRAIN", "synthetic": "SYNTH", "test": "--test"}
    for name, feature_set in sets.items():
        if len(feature_set) < 2:
            raise ValueError(
                f"`{flags[name]}` ({feature_set.source!r}) must hold at least 2 images, got {len(feature_set)};"
                " the IRS compares sets of images, so pass a folder or file with more of them."
            )
    width = int(sets["train"].features.shape[1])
    for name in ("synthetic", "test"):
        if name in sets and int(sets[name].features.shape[1]) != width:
            raise ValueError(
                f"`{flags[name]}` has {int(sets[name].features.shape[1])} features per image but `TRAIN` has {width}"
                f" ({sets[name].source!r} vs {sets['train'].source!r}); compute all sets with the same extractor."
            )


def _split_train(sets: dict[str, Any], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace TRAIN by a seeded random half and use the other half as the held-out set (SPEC.md section 2.7).

    The permutation is the one `diadm.functional.split_train_for_test` draws: the first `N // 2` rows of
    `torch.randperm(N)` under `torch.Generator().manual_seed(seed)` are held out, and both halves keep TRAIN's order.
    """
    train = sets["train"]
    if len(train) < 4:
        raise ValueError(
            f"`--split-train` needs at least 4 images in `TRAIN` (2 per half), got {len(train)} in {train.source!r};"
            " pass a larger training set, or held-out images with `--test`."
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    half = len(train) // 2
    held_out_rows, reference_rows = order[:half].sort().values, order[half:].sort().values
    split_sets = {
        **sets,
        "train": train.subset(reference_rows, f"{train.source} (reference half)"),
        "test": train.subset(held_out_rows, f"{train.source} (held-out half)"),
    }
    split = {
        "seed": seed,
        "num_reference": len(reference_rows),
        "num_held_out": len(held_out_rows),
        "reference_rows": reference_rows.tolist(),
        "held_out_rows": held_out_rows.tolist(),
    }
    return split_sets, split


def _record(
    args: argparse.Namespace,
    result: Any,
    inputs: dict[str, Any],
    skipped: list[dict[str, str]],
    extractor: dict[str, Any],
    timings: dict[str, float],
    split: dict[str, Any] | None,
) -> dict[str, Any]:
    counts = result.retrieval_counts
    return {
        "diadm_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arguments": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        "irs_alpha": result.synthetic.irs_alpha,
        "irs_inf": result.synthetic.irs_inf,
        "irs_inf_lower": result.synthetic.irs_inf_lower,
        "irs_inf_upper": result.synthetic.irs_inf_upper,
        "irs_adjusted": result.irs_adjusted,
        "irs_adjusted_std": result.irs_adjusted_std,
        "num_subsets": result.num_subsets,
        "synthetic": _estimate_dict(result.synthetic),
        "test": _estimate_dict(result.test),
        "num_never_retrieved": int((counts == 0).sum()),
        "inputs": inputs,
        "split_train": split,
        "extractor": extractor,
        "settings": {
            "seed": args.seed,
            "alpha_e": args.alpha_e,
            "backend": args.backend,
            "max_memory_bytes": args.max_memory_mb * 2**20,
            "feature_dtype": args.feature_dtype,
            "features": args.features,
            "skip_bad": args.skip_bad,
            "split_train": args.split_train,
        },
        "skipped_files": skipped,
        "versions": _versions(),
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "nearest_train_index": result.nearest_train_index.tolist(),
        "retrieval_counts": counts.tolist(),
    }


def _write_report(args: argparse.Namespace, result: Any, sets: dict[str, Any], record: dict[str, Any]) -> None:
    from diadm.report import write_report

    train, synthetic = sets["train"], sets["synthetic"]
    summary = {key: value for key, value in record.items() if key not in ("nearest_train_index", "retrieval_counts")}
    page = write_report(
        args.report,
        result,
        train_images=(lambda i: train.images(i, _REPORT_IMAGE_SIZE)) if train.has_images else None,
        synthetic_images=(lambda i: synthetic.images(i, _REPORT_IMAGE_SIZE)) if synthetic.has_images else None,
        train_names=train.names,
        synthetic_names=synthetic.names,
        summary=summary,
        num_show=args.num_show,
        seed=args.seed,
    )
    log.info("wrote %s", page)
