# SPDX-License-Identifier: Apache-2.0
"""The package surface: every public name resolves, the command line registers every subcommand."""

import re
import subprocess
import sys

import pytest

import diadm
from diadm.cli import SUBCOMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(set(diadm.__all__) - {"__version__"}))
def test_public_name_resolves_to_its_module(name: str) -> None:
    obj = getattr(diadm, name)
    assert obj.__name__ == name
    assert obj.__module__ == diadm._EXPORTS[name]


def test_all_lists_exactly_the_exports() -> None:
    assert set(diadm.__all__) == {*diadm._EXPORTS, "__version__"}


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match=re.escape("module 'diadm' has no attribute 'nope'")):
        diadm.nope  # noqa: B018


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    sub_actions = [a for a in parser._actions if a.dest == "command"]
    assert sorted(sub_actions[0].choices) == sorted(name for name, _, _ in SUBCOMMANDS)


def test_version_flag_and_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "diadm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"diadm {diadm.__version__}"


def test_missing_subcommand_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_help_imports_no_subcommand_and_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from diadm.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('diadm.cli.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
