"""Correlated noise across rounds (privacy.noise = "tree", DP-FTRL's tree aggregation):
its accountant against an independent brute force, closed forms and Google's
dp-accounting, and shown to reject perturbed accountants; the server's node draws; the
run end to end with the ε it reports."""

import itertools
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedrec.errors import FedrecError
from fedrec.experiments.sweep import user_sigma
from fedrec.federation.server_opt import TreeNoise, UserDP
from fedrec.privacy.accounting import user_epsilon
from fedrec.privacy.exact import (
    tree_epsilon,
    tree_nodes,
    tree_sensitivity,
    tree_separation,
    tree_sigma,
)
from tiny import run_inprocess, tiny_config

pytestmark = pytest.mark.usefixtures("isolated")
TREE = {"privacy.mode": "user", "privacy.noise": "tree", "privacy.max-grad-norm": 0.5,
        "fed.sampling": "balanced"}


def brute_sensitivity(rounds: int, separation: int) -> float:
    """Every set of rounds at least `separation` apart, against the nodes the server's
    prefixes use (the union of every prefix's binary decomposition), as an explicit
    matrix: max ||A x||."""
    nodes = sorted({n for t in range(1, rounds + 1) for n in TreeNoise.blocks(t)})
    A = np.array([[first <= t < first + size for t in range(1, rounds + 1)]
                  for first, size in nodes], float)
    best = 0.0
    for m in range(1, rounds + 1):
        for pick in itertools.combinations(range(rounds), m):
            if all(b - a >= separation for a, b in itertools.pairwise(pick)):
                x = np.zeros(rounds)
                x[list(pick)] = 1.0
                best = max(best, float(np.linalg.norm(A @ x)))
    return best


def pld_epsilon(noise_multiplier: float, delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.GaussianDpEvent(noise_multiplier))
    return acc.get_epsilon(delta)


CASES = [(2.0, 20, 10, 1e-4), (8.0, 16, 4, 1e-5), (30.0, 12, 1, 1e-4), (1.5, 7, 100, 1e-4)]


def agrees(sensitivity, epsilon) -> bool:
    """The checks an accountant must pass: brute force and closed forms for the
    sensitivity, dp-accounting's PLD for ε (1%)."""
    for rounds, sep in [(r, s) for r in range(1, 12) for s in (1, 2, 3, 5, 20)]:
        if not math.isclose(sensitivity(rounds, sep), brute_sensitivity(rounds, sep),
                            rel_tol=1e-9):
            return False
    for k in range(6):  # one join (round 1): k + 1 levels; every round: T^2 + T (T - 1) / 2
        T = 2 ** k
        if not (math.isclose(sensitivity(T, T), math.sqrt(k + 1))
                and math.isclose(sensitivity(T, 1), math.sqrt(T * T + T * (T - 1) / 2))):
            return False
    for sigma, rounds, sep, delta in CASES:
        ref = pld_epsilon(sigma / brute_sensitivity(rounds, sep) if rounds < 12
                          else sigma / sensitivity(rounds, sep), delta)
        if not math.isclose(epsilon(sigma, rounds, sep, delta), ref, rel_tol=0.01):
            return False
    return True


def test_tree_accountant_matches_brute_force_closed_forms_and_pld():
    assert agrees(tree_sensitivity, tree_epsilon)
    for eps, rounds, sep in ((8.0, 20, 10), (1.0, 40, 10)):
        sigma = tree_sigma(eps, 1e-4, rounds, sep)
        assert tree_epsilon(sigma, rounds, sep, 1e-4) == pytest.approx(eps, rel=1e-6)


def test_the_checks_reject_perturbed_tree_accountants():
    def one_join(rounds, sep):  # forgets that a device joins again after `sep` rounds
        return tree_sensitivity(rounds, rounds)

    def understated(rounds, sep):  # 3% below the true sensitivity
        return 0.97 * tree_sensitivity(rounds, sep)

    def sigma_off(sigma, rounds, sep, delta):  # 3% less noise than it claims
        return tree_epsilon(0.97 * sigma, rounds, sep, delta)

    assert not agrees(one_join, tree_epsilon)
    assert not agrees(understated, tree_epsilon)
    assert not agrees(tree_sensitivity, sigma_off)


def test_the_server_draws_each_released_node_once_and_a_prefix_carries_its_blocks():
    drawn = []
    rng = np.random.default_rng(0)
    tree = TreeNoise(rng)
    original = tree.prefix

    def prefix(t, shapes, std):
        before = set(tree.nodes)
        out = original(t, shapes, std)
        drawn.extend(set(tree.nodes) - before)
        return out
    tree.prefix = prefix
    total = np.zeros(20_000)
    for t in range(1, 14):
        total += tree.noise(t, {"w": (20_000,)}, 1.0)["w"]
        # the model after t linear steps carries the prefix's noise: one draw per block of t
        assert total.var() == pytest.approx(len(TreeNoise.blocks(t)), rel=0.05)
    assert sorted(drawn) == sorted(tree_nodes(13))
    with pytest.raises(ValueError):
        tree.noise(0, {"w": (2,)}, 1.0)


def test_tree_settings_are_checked_and_solved(cfg):
    with pytest.raises(FedrecError, match="privacy.noise = 'tree' is DP-FTRL"):
        cfg.override(**{"privacy.noise": "tree"})
    with pytest.raises(FedrecError, match="no amplification by sampling"):
        cfg.override(**{**TREE, "fed.sampling": "uniform", "fed.clients-per-round": 4})
    with pytest.raises(FedrecError, match="needs privacy.clipping = 'fixed'"):
        cfg.override(**{**TREE, "privacy.clipping": "adaptive"})
    c = cfg.override(**TREE, **{"fed.num-rounds": 6, "fed.clients-per-round": 4})
    n = 13
    sigma = user_sigma(c, 4.0, n)
    assert sigma == pytest.approx(tree_sigma(4.0, 1e-4, 6, tree_separation(4 / n)))
    assert user_epsilon(c.override(**{"privacy.noise-multiplier": sigma}), 6, 4 / n) == \
        pytest.approx(4.0, rel=1e-6)
    assert UserDP(c, 4, n).tree is not None


def test_a_tree_noised_run_completes_and_reports_the_tree_epsilon(tiny_root):
    cfg = tiny_config(tiny_root, {**TREE, "privacy.noise-multiplier": 3.0,
                                  "fed.num-rounds": 3, "fed.clients-per-round": 4,
                                  "fed.strategy": "fedavg",
                                  "fed.run-dir": str(tiny_root / "tree-dp")})
    _, results = run_inprocess(cfg)
    assert results["status"] == "completed"
    assert results["privacy"]["accountant"].startswith("tree")
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    sep = tree_separation(4 / 13)  # the tiny dataset's 13 users, 4 a round: 3 rounds apart
    assert sep == 3
    assert [t["epsilon-max"] for t in trains] == pytest.approx(
        [tree_epsilon(3.0, r, sep, 1e-4) for r in (1, 2, 3)])
