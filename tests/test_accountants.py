"""The project's ε against accountants written by other people.

Poisson-subsampled Gaussian mechanism, composed `steps` times, for a set of (σ, q, steps,
δ) cases that span the project's settings (q = 1 is full participation):
- rdp: against Google's dp-accounting RdpAccountant;
- prv: against dp-accounting's PLD accountant (both numerically tight, so they agree);
- gdp: dp-accounting has no CLT accountant, so against the closed form of Dong, Roth &
  Su (2019), mu = q sqrt(T (e^(1/σ²) - 1)), solved for ε with scipy.
Each within 1%. A second test shows the tolerance is tight enough to matter: the same
comparison rejects an accountant whose σ is off by 3%.
"""

import logging
import math
import warnings

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedrec.privacy.accounting import Accountant

CASES = [(1.0, 0.01, 1000, 1e-5), (0.8, 0.1, 100, 1e-5), (2.0, 0.05, 500, 1e-6),
         (1.5, 1.0, 10, 1e-5), (4.0, 0.1, 50, 1e-5), (1.1, 0.1, 300, 1e-5)]
TOLERANCE = 0.01


def reference(name: str, sigma: float, q: float, steps: int, delta: float) -> float:
    if name == "gdp":
        mu = q * math.sqrt(steps * math.expm1(1 / sigma ** 2))
        gap = lambda e: (norm.cdf(-e / mu + mu / 2)
                         - math.exp(e + norm.logcdf(-e / mu - mu / 2)) - delta)
        return brentq(gap, 1e-9, 200.0)
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    acc = (rdp_privacy_accountant.RdpAccountant() if name == "rdp"
           else pld_privacy_accountant.PLDAccountant())
    logging.getLogger().setLevel(logging.ERROR)  # "failed to converge" on fractional orders
    acc.compose(event)
    return acc.get_epsilon(delta)


def ours(name: str, sigma: float, q: float, steps: int, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Accountant(name, [(sigma, q, steps)]).epsilon(delta)


@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "s{}-q{}-T{}-d{}".format(*c))
def test_epsilon_matches_another_librarys_accountant(name, case):
    got, want = ours(name, *case), reference(name, *case)
    assert abs(got / want - 1) <= TOLERANCE, f"{name} {case}: {got:.4f} vs {want:.4f}"


@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
def test_the_tolerance_catches_a_three_percent_error_in_sigma(name):
    sigma, q, steps, delta = CASES[0]
    wrong = ours(name, sigma * 1.03, q, steps, delta)
    assert abs(wrong / reference(name, sigma, q, steps, delta) - 1) > TOLERANCE
