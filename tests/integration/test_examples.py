# SPDX-License-Identifier: Apache-2.0
"""The scripts in `examples/` run in their tiny mode and print what their docstrings promise."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_score_features_example_separates_a_collapsed_generator():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "score_features.py"), "--quick"], capture_output=True, text=True, check=True
    ).stdout
    num_train = int(re.match(r"(\d+) training images", out).group(1))
    row = re.compile(r"^(full|collapsed)\s+(\d+)\s+\S+\s+\S+ \[\S+, \S+\]\s+(\S+)$", re.M)
    rows = {name: (int(learned), float(adjusted)) for name, learned, adjusted in row.findall(out)}
    assert set(rows) == {"full", "collapsed"}
    # a generator that covers a third of the modes must score far below one that covers all of them
    assert rows["full"][1] - rows["collapsed"][1] > 0.3
    never = int(re.search(r"collapsed generator: (\d+) of", out).group(1))
    assert never == num_train - rows["collapsed"][0]
