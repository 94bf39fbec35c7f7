# SPDX-License-Identifier: Apache-2.0
"""The `diadm` command line: `score`, `sample`, `finetune` and `demo`.

Each subcommand lives in its own module of this package with two functions, `add_arguments(parser)` and
`run(args) -> int`. Only the module of the subcommand being invoked is imported, so `diadm --help` and
`diadm --version` do not wait for torch, Lightning and diffusers to load.

Exit codes: 0 on success, 2 on bad arguments (argparse's convention, and our `ValueError`/`TypeError` for bad
input), 1 on any other failure.
"""

import argparse
import importlib
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser.

    Args:
        only: Import and fill in the arguments of this subcommand alone (the others are listed with their help
            text); None fills in every subcommand.
    """
    parser = argparse.ArgumentParser(prog="diadm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diadm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {name for name, _, _ in SUBCOMMANDS}
    # the first word that is not an option names the subcommand; "" imports none (for --help and --version)
    chosen = next((word for word in argv if not word.startswith("-")), "")
    parser = build_parser(only=chosen if chosen in names else "")
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
