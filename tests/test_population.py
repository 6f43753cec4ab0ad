"""The population study's fit (fedrec/privacy/population.py) on generated ratios."""

import math

import numpy as np
import pytest

from fedrec.errors import FedrecError
from fedrec.privacy import population


def test_fit_recovers_a_known_power_law_and_its_crossing():
    a, b = 3.0, 0.5  # gap = 3 / sqrt(N): 0.1 at N = 900
    pts = {n: [1 - a * n ** -b] * 3 for n in (100, 200, 400, 800)}
    res = population.fit(pts, target=0.9, boots=50)
    assert res["b"] == pytest.approx(b) and math.exp(res["log-a"]) == pytest.approx(a)
    assert res["population-at-target"] == pytest.approx(900.0, rel=1e-6)
    assert res["bootstrap"]["p05"] == pytest.approx(900.0, rel=1e-6)  # no seed spread


def test_bootstrap_interval_widens_with_seed_noise_and_holds_the_estimate():
    rng = np.random.default_rng(1)
    pts = {n: list(1 - 3.0 * n ** -0.5 + rng.normal(0, 0.02, 3)) for n in (100, 200, 400, 800)}
    res = population.fit(pts, target=0.9, boots=500)
    boot = res["bootstrap"]
    assert boot["p05"] < res["population-at-target"] < boot["p95"]
    assert boot["p95"] / boot["p05"] > 1.1


def test_interval_names_an_upper_end_the_data_cannot_bound():
    res = population.fit({100: [0.7, 0.7], 200: [0.75, 0.75]}, boots=20)
    res["bootstrap"].update(p05=1800.0, p95=4.2e3)
    assert population.interval(res) == "1,800 to 4,200"
    res["bootstrap"]["p95"] = 1.7e8  # past 100 x the largest population (200)
    assert population.interval(res) == "1,800 to unbounded (> 20,000)"
    res["bootstrap"]["p95"] = math.inf
    assert population.interval(res).endswith("unbounded (> 20,000)")


def test_a_gap_that_does_not_shrink_never_reaches_the_target():
    res = population.fit({100: [0.7, 0.7], 1000: [0.6, 0.6]}, boots=20)
    assert res["b"] < 0 and math.isinf(res["population-at-target"])
    with pytest.raises(FedrecError, match="two populations"):
        population.fit({100: [0.8]})


def test_study_pairs_each_seed_with_its_own_non_private_run():
    def sweep(n, base, priv):
        row = lambda unit, eps, vals: {"unit": unit, "epsilon": eps, "population": n,
                                       "seeds": [0, 1], "per-seed": {"full/hr@10": vals}}
        return {"rows": [row("none", math.inf, base), row("user", 8.0, priv)]}

    res = population.study([sweep(100, [0.10, 0.20], [0.05, 0.15]),
                            sweep(400, [0.10, 0.20], [0.08, 0.18])], boots=10)
    assert res["points"]["100"]["ratios"] == pytest.approx([0.5, 0.75])
    assert res["points"]["400"]["ratios"] == pytest.approx([0.8, 0.9])
    with pytest.raises(FedrecError, match="--units user --epsilons inf,8"):
        population.study([{"rows": [sweep(100, [1], [1])["rows"][0]]}])
