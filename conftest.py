# SPDX-License-Identifier: Apache-2.0
"""Shared pytest setup for the tests and the doctests of `src/`.

Every test and doctest is seeded and runs offline, on one torch thread, with progress bars off.
"""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIADM_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

# Tiny test networks run faster on one thread than on two, and parallel processes must not oversubscribe.
torch.set_num_threads(1)

SEED = 1234


@pytest.fixture(autouse=True)
def seed_everything(request: pytest.FixtureRequest) -> int:
    """Seed Python, NumPy and torch before every test; doctests get seed 0. Returns the seed."""
    seed = 0 if isinstance(request.node, pytest.DoctestItem) else SEED
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator."""
    return np.random.default_rng(SEED)
