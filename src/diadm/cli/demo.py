# SPDX-License-Identifier: Apache-2.0
"""`diadm demo`: train a baseline and DiADM on scikit-learn's digits and print how much of the data each covers."""

import argparse
import logging
import sys
from pathlib import Path

from diadm.cli._arguments import positive_int

DEFAULT_OUT = "diadm-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `diadm demo`."""
    parser.add_argument("--quick", action="store_true", help="a small run for CI and a first look (under a minute)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimizer steps per model (default: 2000, quick: 40)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights, training and sampling")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (default 1: fastest for the tiny UNet)"
    )
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the demo, print its table and where the outputs went, and return 0."""
    from diadm.demo import FIGURES, TABLE_FILE, demo_config, format_table, run_demo

    if getattr(args, "verbose", 0) == 0:
        # Lightning announces devices and tips at INFO; the demo's output is the table. Its import sets its logger
        # to INFO, so import it first, then quiet it.
        import lightning.pytorch  # noqa: F401

        for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A full run takes minutes: say which phase it is in (on stderr, so stdout stays the table).
        logging.getLogger("diadm").setLevel(logging.INFO)
    config = demo_config(quick=args.quick, num_steps=args.steps)
    result = run_demo(args.out, config, seed=args.seed, progress=args.progress, num_threads=args.threads)
    lines = [
        "",
        f"diadm demo{' --quick' if args.quick else ''}: {config.num_train} training and {config.num_held_out}"
        f" held-out digits, {config.num_steps} steps per model, {config.num_held_out} samples per model,"
        " pixel features.",
        "",
        format_table(result.rows),
        "",
        "IRS adjusted: IRS_inf divided by the held-out real images' IRS_inf (1.0 = as diverse as real data);",
        "bounds: the 95 % one-sided bounds of IRS_inf, scaled alike. Frechet distance: to the training pixels.",
        "",
        f"Output folder: {result.output_dir.resolve()}",
        f"  table: {TABLE_FILE}, figures: {', '.join(sorted(p.name for p in result.figures.values()))}",
        f"  TensorBoard: tensorboard --logdir {result.output_dir / 'runs'}",
        f"  models: {result.output_dir / 'pipelines'}/{{baseline,diadm}}",
        f"Time taken: {result.seconds:.1f} s",
    ]
    missing = sorted(set(FIGURES) - set(result.figures))
    if missing:
        lines.insert(-1, f"  not written (no training image was missed): {', '.join(missing)}")
    # The table is the command's output, so it goes to stdout, not through a logger.
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
