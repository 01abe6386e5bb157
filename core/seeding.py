"""Every random draw of training is seeded by what it is for, so a resumed run repeats exactly what it skipped.

A sample's augmentation is seeded by (seed, epoch, row), so it does not depend on the number of DataLoader
workers or ranks; a step's draws (mixing, Gumbel noise, drop-path) by (seed, epoch, step, rank), so ranks draw
independent noise for their local batches and nothing carries over from what ran before.
"""

import random

import numpy as np
import torch
from timm.utils import random_seed


def seed_all(*parts: int, cuda: bool = True) -> int:
    """Seed Python's, NumPy's and torch's global RNGs from `parts` (timm's random_seed); returns the seed.

    cuda=False leaves torch's CUDA generators alone: what a data worker draws is on the CPU, and torch.manual_seed
    costs a hundred times more (it records a stack trace for the CUDA seeding it defers until CUDA starts)."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    if cuda:
        random_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
    return seed


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """Seed the global RNGs for one training step; returns the seed, for the step's own generators."""
    return seed_all(seed, epoch, step, rank, 7)
