import math

import pandas as pd
import pytest

from kaviz import report, stats


def test_report_reexports_the_one_seed_statistics():
    assert report.seed_stats is stats.seed_stats and report.seed_table is stats.seed_table


def test_sample_std_and_one_seed():
    s = stats.seed_stats([0.5, 0.7])
    assert s.std == pytest.approx(0.1414213562) and s.n == 2  # ddof = 1; population std would be 0.1
    one = stats.seed_stats([0.5])
    assert math.isnan(one.std) and str(one) == "0.500 (1 seed)"
    assert stats.format_mean_std(0.6, 0.1414) == "0.600 ± 0.141"
    assert stats.format_mean_std(float("nan"),
                                 0.1) == "-" and stats.format_mean_std(0.6, float("nan")) == "0.600 (1 seed)"


def test_every_method_table_uses_sample_std():
    from kaviz.methods import layerwise

    a = pd.DataFrame({"model": ["x"], "acc": [0.5]})
    b = pd.DataFrame({"model": ["x"], "acc": [0.7]})
    long = layerwise.seed_stats([a, b])
    assert long["std"].item() == pytest.approx(stats.seed_stats([0.5, 0.7]).std)
    assert layerwise.summarize_seeds([a, b]).loc["x", "acc"] == stats.seed_stats([0.5, 0.7]).format(3)
