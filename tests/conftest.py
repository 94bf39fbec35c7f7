# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: every test is seeded and runs offline, single-threaded, with progress bars off."""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

SEED = 1234

# Tiny test networks run faster on one thread than on two, and parallel test workers must not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed_everything() -> int:
    """Seed Python, NumPy and torch before every test; return the seed for tests that need it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator."""
    return np.random.default_rng(SEED)
