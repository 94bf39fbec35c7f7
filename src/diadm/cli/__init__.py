# SPDX-License-Identifier: Apache-2.0
"""The `diadm` command line: `score`, `sample`, `finetune` and `demo`.

Each subcommand lives in its own module of this package with two functions, `add_arguments(parser)` and
`run(args) -> int`, and is imported only when it is invoked, so `diadm --help` stays fast.

Exit codes: 0 on success, 2 on bad arguments (argparse's convention, and our `ValueError`/`TypeError` for bad
input), 1 on any other failure.
"""

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from diadm import __version__

# (name, module, one-line help) for every subcommand, in the order `--help` lists them.
SUBCOMMANDS = (
    ("demo", "diadm.cli.demo", "train a baseline and DiADM on scikit-learn's digits and compare their coverage"),
    ("score", "diadm.cli.score", "compute the Image Retrieval Score of folders or files of images or features"),
    ("sample", "diadm.cli.sample", "sample images from a saved DiADM pipeline"),
    ("finetune", "diadm.cli.finetune", "fine-tune an unconditional diffusers model into DiADM"),
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="diadm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diadm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args))
    except (ValueError, TypeError) as err:
        print(f"diadm {args.command}: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print(f"diadm {args.command}: interrupted", file=sys.stderr)  # noqa: T201
        return 130
    except Exception as err:  # the command line reports every failure as exit 1
        print(f"diadm {args.command}: {type(err).__name__}: {err}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
