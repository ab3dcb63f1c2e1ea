"""Paired differences over seeds, with a t interval (the comparisons' statistics, docs/results.md).

Two settings run with the same seed share everything before the setting takes effect (the recipe's stages 0-II,
the data order), so their per-seed differences are the quantity to average: the seed-to-seed spread that both
share cancels.  The interval is Student's t on those differences, as a reviewer computes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PairedDifference:
    mean: float         # mean over seeds of (setting - reference)
    half_width: float   # of the two-sided interval at `level`; nan with fewer than 2 pairs
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.half_width == self.half_width and (self.low > 0 or self.high < 0)


def paired_difference(setting: Sequence[float], reference: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of ``setting[i] - reference[i]`` and the half width of its ``level`` t interval
    (t_{(1+level)/2, n-1} * sd / sqrt(n), sd the sample standard deviation of the differences)."""
    if len(setting) != len(reference):
        raise ValueError(f"paired figures need one per seed on both sides, got {len(setting)} and {len(reference)}")
    if not setting:
        raise ValueError("no pairs")
    from scipy.stats import t

    diffs = [a - b for a, b in zip(setting, reference)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(mean, float("nan"), n)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return PairedDifference(mean, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)
