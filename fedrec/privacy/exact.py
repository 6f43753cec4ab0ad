"""Exact ε of Gaussian releases: one release (the analytic Gaussian mechanism: DP
popularity's σ) and DP-FTRL's tree of node draws (privacy.noise = "tree"), which is one
Gaussian release of known L2 sensitivity. tests/test_dp_popularity.py and
tests/test_tree_noise.py check them against dp-accounting's PLD accountant, closed forms
and a brute force."""

import math

from scipy import special

from fedrec.errors import FedrecError


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """δ(ε) of one release of the Gaussian mechanism with L2 sensitivity 1 and noise std
    sigma: its exact privacy profile (Balle & Wang 2018, Theorem 8; the privacy loss
    distribution of one Gaussian release, so a PLD accountant gives the same)."""
    a, b = 1.0 / (2.0 * sigma), epsilon * sigma
    return float(special.ndtr(a - b) - math.exp(epsilon + special.log_ndtr(-a - b)))


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest noise std (per unit of L2 sensitivity) at which one Gaussian release
    is (epsilon, delta)-DP, exactly (gaussian_delta falls as sigma grows: bisection)."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise FedrecError(f"--epsilon {epsilon:g} / --delta {delta:g}: need ε > 0 and "
                          "0 < δ < 1")
    return smallest(lambda s: gaussian_delta(epsilon, s) <= delta, 1e-3)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The smallest ε at which one Gaussian release (L2 sensitivity 1, noise std sigma)
    is (ε, δ)-DP: the inverse of gaussian_delta in ε (it falls as ε grows)."""
    if gaussian_delta(0.0, sigma) <= delta:
        return 0.0
    return smallest(lambda e: gaussian_delta(e, sigma) <= delta, 0.0)


def smallest(ok, lo: float, rel_tol: float = 0.0) -> float:
    """The smallest x > lo with ok(x), for ok monotone (false, then true): doubling from 1,
    then bisection, 100 steps or (rel_tol > 0: each ok costly) until hi - lo <= rel_tol hi."""
    hi = 1.0
    while not ok(hi):
        lo, hi = hi, 2 * hi
    steps = 0
    while (hi - lo > rel_tol * hi) if rel_tol else steps < 100:
        mid, steps = (lo + hi) / 2, steps + 1
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# -- correlated noise: DP-FTRL's tree aggregation (privacy.noise = "tree") -----------------
def tree_nodes(rounds: int) -> list[tuple[int, int]]:
    """(first round, size) of every node the tree releases by round `rounds`: the dyadic
    blocks of rounds 1..rounds that some prefix's binary decomposition uses (sizes 1, 2,
    4, ...; the even-numbered blocks of each size, a right sibling is never needed), each
    drawn once, when its last round's prefix needs it (fedrec/federation/server_opt.py)."""
    out, size = [], 1
    while size <= rounds:
        out += [(j * size + 1, size) for j in range(0, rounds // size, 2)]
        size *= 2
    return out


def tree_sensitivity(rounds: int, separation: int) -> float:
    """The L2 sensitivity, in units of the clipping norm, of all the node sums the tree
    releases by round `rounds`, for one user who joins rounds at least `separation`
    apart: the largest sqrt(sum over nodes of (the user's rounds in the node)^2), their
    updates aligned. Exact, by dynamic programming over the rounds: the state is the
    user's count in the open block of each level and the rounds since their last join;
    a block adds its count squared when it closes, if it is a released node (tree_nodes;
    a block not completed by `rounds` is never released)."""
    levels, b = max(0, rounds).bit_length(), max(1, int(separation))
    states = {((0,) * levels, b): 0}  # (open counts, rounds since last join) -> best sum
    for t in range(1, rounds + 1):
        new: dict = {}
        for (counts, gap), val in states.items():
            for join in ((False, True) if gap + 1 >= b else (False,)):
                c, v = [x + join for x in counts], val
                for lvl in range(levels):
                    if t % (1 << lvl) == 0:  # the level's block [t - 2^l + 1, t] closes
                        v += c[lvl] ** 2 if (t >> lvl) & 1 else 0  # released: even blocks
                        c[lvl] = 0
                key = (tuple(c), 0 if join else min(gap + 1, b))
                new[key] = max(new.get(key, -1), v)
        states = new
    return math.sqrt(max(states.values()))


def tree_separation(sample_rate: float) -> int:
    """Rounds between two joins of one device under fed.sampling = "balanced" (a seeded
    order of the N devices, k at a time: at least floor(N / k) rounds apart); 1 when every
    device joins every round."""
    return max(1, math.floor(1.0 / sample_rate + 1e-9))


def tree_epsilon(sigma: float, rounds: int, separation: int, delta: float) -> float:
    """User-level ε after `rounds` rounds of tree-aggregated noise of multiplier sigma:
    the whole tree is one Gaussian release (independent node draws) of sensitivity
    tree_sensitivity, so ε is exact for it (analytic Gaussian)."""
    if rounds <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    return gaussian_epsilon(sigma / tree_sensitivity(rounds, separation), delta)


def tree_sigma(epsilon: float, delta: float, rounds: int, separation: int) -> float:
    """The noise multiplier of every tree node that spends exactly ε over `rounds`."""
    return tree_sensitivity(rounds, separation) * gaussian_sigma(epsilon, delta)
