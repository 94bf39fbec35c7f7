# SPDX-License-Identifier: Apache-2.0
"""Seed doctests so the values they print are reproducible."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed_doctest() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
