# SPDX-License-Identifier: Apache-2.0
"""Allow `python -m diadm`."""

import sys

from diadm.cli import main

sys.exit(main())
