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
    """Run each callable once to warm up, then ``repeats`` times in ABBA order (A B, B A, A B ...),
    and return the median seconds of each. The order alternates because whichever runs first after
    the other pays for caches and allocator state the other left (measured: up to 15 % either way)."""
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    names = list(runs)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
