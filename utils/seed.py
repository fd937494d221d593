"""Reproducibility. Introduced in lesson 00; every notebook calls ``seed_everything(SEED)``."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = True) -> int:
    """Seed Python, NumPy and PyTorch (all devices), like minGPT's ``set_seed``.

    With ``deterministic`` PyTorch is asked for deterministic kernels where it has them
    (``warn_only``: an op without one warns instead of failing). Returns ``seed``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed
