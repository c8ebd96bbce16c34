"""Aggregation maths on hand-made inputs."""

import math

import pytest

from stablelora.reporting.stats import paired_difference, select_on_validation, summarise, t_critical_95

pytestmark = pytest.mark.core  # needs only torch and peft: scripts/check_wheel.sh runs it against the wheel


def test_summary_mean_sample_std_best():
    s = summarise([0.60, 0.62, 0.67])
    assert s.mean == pytest.approx(0.63) and s.best == 0.67 and s.n == 3
    assert s.std == pytest.approx(math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2))
    assert summarise([0.5]).std == 0.0


def test_paired_difference_interval_by_hand():
    method = {0: 0.70, 1: 0.64, 2: 0.66, 7: 0.9}
    baseline = {0: 0.66, 1: 0.62, 2: 0.66}  # seed 7 has no pair and is ignored
    d = paired_difference(method, baseline)
    diffs = [0.04, 0.02, 0.0]
    half = 4.303 * math.sqrt(sum((x - 0.02) ** 2 for x in diffs) / 2) / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.02)
    assert (d.low, d.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    with pytest.raises(ValueError, match=">= 2 seeds"):
        paired_difference({0: 1.0}, {0: 0.5})


def test_t_critical_values():
    assert t_critical_95(1) == 12.706 and t_critical_95(2) == 4.303 and t_critical_95(100) == 1.96
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_learning_rate_is_chosen_on_validation_only():
    records = [
        {"lr": 1e-4, "seed": 0, "validation": 0.61, "test": 0.90},
        {"lr": 1e-4, "seed": 1, "validation": 0.63, "test": 0.91},
        {"lr": 3e-4, "seed": 0, "validation": 0.66, "test": 0.10},
        {"lr": 3e-4, "seed": 1, "validation": 0.64, "test": 0.12},
    ]
    assert select_on_validation(records) == 3e-4  # the test scores point the other way and are ignored
    swapped = [{**r, "test": 1 - r["test"]} for r in records]
    assert select_on_validation(swapped) == 3e-4
    # a loss is chosen low: the same records read as losses pick the other learning rate
    assert select_on_validation(records, higher_is_better=False) == 1e-4
    with pytest.raises(ValueError, match="chosen on validation only"):
        select_on_validation([{"lr": 1e-4, "seed": 0, "test": 0.9}])
