"""Shared helpers for the bench scripts: timing by alternating runs, a lazily generated dataset."""
from __future__ import annotations

import statistics
import time

import torch


class RandomImages(torch.utils.data.Dataset):
    """Images generated on access from (seed, index): the dataset itself takes no memory."""

    def __init__(self, n, size=32, classes=10, seed=0):
        self.n, self.size, self.classes, self.seed = n, size, classes, seed
        self.fingerprint = f"random-images-{n}-{size}-{classes}-{seed}"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.rand(3, self.size, self.size, generator=g), i % self.classes


def alternate(runs: dict, repeats: int = 5) -> dict:
    """Run each callable ``repeats`` times, interleaved (A B A B ...), and return median seconds."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
