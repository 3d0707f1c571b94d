"""Shared pieces of the self-check cases."""
import time

import torch


def fresh_generator():
    """A CPU generator seeded from the clock: every run checks fresh random inputs."""
    return torch.Generator().manual_seed(int(time.time_ns() % 2**31))
