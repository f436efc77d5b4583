"""Seed statistics: the one mean ± std convention of kaviz (sample std, ddof = 1) and the one results-table shape.

It sits low in the layering (it imports nothing of kaviz), so methods build their tables with it and
:mod:`kaviz.report` re-exports it. A single seed has no spread: its std is NaN (never 0), shown as
``"(1 seed)"``. With 2 seeds the sample std is √2 ≈ 1.41× the population std (ddof = 0) some tables
used before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["SeedStats", "seed_stats", "seed_table", "format_mean_std"]


@dataclass(frozen=True)
class SeedStats:
    """Mean and sample standard deviation (ddof = 1) of one quantity over seeds."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return self.format()

    def format(self, digits: int = 3) -> str:
        if self.n < 2 or math.isnan(self.std):
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def _as_floats(values, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a number or a sequence of numbers (one per seed), got {values!r}") from exc
    if not out:
        raise ValueError(f"{what} is empty: pass one value per seed")
    return out


def seed_stats(values: Iterable[float] | float) -> SeedStats:
    """Mean and **sample** std (ddof = 1) over seeds; std is NaN for a single seed (never 0)."""
    xs = _as_floats(values, "values")
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return SeedStats(mean, std, n)


def seed_table(df, by: str | Sequence[str], columns: Sequence[str], *, digits: int = 3, as_text: bool = True):
    """The one results-table shape: one row per group of ``by``, a ``seeds`` column, and per column
    ``"mean ± std"`` text (``as_text``) or ``<col> mean`` / ``<col> std`` numbers. Sample std."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, *columns] if c not in df.columns]
    if missing:
        raise KeyError(f"seed_table: no column(s) {missing} in the table (columns: {list(df.columns)})")
    rows = []
    for key, group in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["seeds"] = len(group)
        for c in columns:
            s = seed_stats(group[c].astype(float).tolist())
            if as_text:
                row[c] = s.format(digits)
            else:
                row[f"{c} mean"], row[f"{c} std"] = s.mean, s.std
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- expectations


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.812 ± 0.010"``; ``"-"`` for an undefined mean, ``"0.812 (1 seed)"`` for an undefined std."""
    if not math.isfinite(mean):
        return "-"
    return SeedStats(mean, std, 2 if math.isfinite(std) else 1).format(digits)
