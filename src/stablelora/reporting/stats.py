"""Statistics for comparing methods over seeds: mean ± std, paired differences with t-intervals, and hyper-parameter
selection that looks at validation scores only.

The paper reports best-of-3 seeds without variance; these are the numbers its reviewers asked for.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

# two-sided 95 % Student-t critical values t_{0.975, df} for df = 1..30; beyond, the normal 1.96 is within 2 %
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_critical_95(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 paired seeds (df >= 1), got df={df}.")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (ddof = 1); 0 for a single value
    best: float
    n: int


def summarise(values: list[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarise")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, max(values), len(values))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Two-sided 95 % t-interval of the mean of independent values (e.g. one score per seed)."""
    if len(values) < 2:
        raise ValueError(f"an interval of the mean needs >= 2 values, got {len(values)}.")
    mean = statistics.fmean(values)
    half = t_critical_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    n: int


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> PairedDifference:
    """Mean of (method - baseline) over the seeds both ran, with a two-sided 95 % t-interval."""
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    if len(diffs) < 2:
        raise ValueError(f"a paired interval needs >= 2 seeds run by both methods, got {len(diffs)} ({seeds}).")
    return PairedDifference(statistics.fmean(diffs), *mean_interval(diffs), len(diffs))


def select_on_validation(records: list[dict], *, key: str = "lr", validation_key: str = "validation",
                         higher_is_better: bool = True):
    """The value of ``key`` (a learning rate, or any hashable hyper-parameter setting) with the best mean validation
    score. Each record: {key, "seed", validation_key, ...}; any test score in the records is never read, so it
    cannot influence the choice. Ties go to the setting whose first record comes first."""
    by_setting: dict = defaultdict(list)
    for record in records:
        if record.get(validation_key) is None:
            raise ValueError(f"record for {key}={record.get(key)} seed={record.get('seed')} has no "
                             f"'{validation_key}' score: hyper-parameters are chosen on validation only.")
        by_setting[record[key]].append(record[validation_key])
    if not by_setting:
        raise ValueError("no runs to choose a setting from")
    sign = 1.0 if higher_is_better else -1.0
    return max(by_setting, key=lambda value: sign * statistics.fmean(by_setting[value]))
