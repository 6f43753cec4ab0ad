"""How the cost of user-level DP shrinks with the population (docs/privacy.md).

DP-FedAvg adds noise N(0, (σC)²) to the sum of k = qN clipped updates, so at a fixed
sample rate q and ε (hence a fixed σ) the noise on the mean update falls as 1/N. The
accuracy gap g(N) = 1 - HR@10(ε) / HR@10(no DP) is fitted as a power law,
log g = log a - b log N (least squares over the populations' mean per-seed ratios), and
the population at which the trend reaches `target` (e.g. 0.9x) is N* = (a / (1 -
target))^(1 / b). Its uncertainty is a bootstrap over seeds: each replicate redraws,
with replacement, the seeds' ratios of every population and refits.

`fit(points)` takes {population: [ratio per seed]} and returns the fit; `study(files)`
reads the privacy-sweep result files of each population (`fedrec privacy-sweep
--run-config "data.users=N ..."`), pairs each seed's private run with its own non-private
run, and fits; `plot` draws it.
"""

import math
from pathlib import Path

import numpy as np

from fedrec.errors import FedrecError
from fedrec.files import pyplot, save_figure

FLOOR = 1e-3  # a gap at or below 0 (private as good as not) is fitted as this


def _line(pops: np.ndarray, gaps: np.ndarray) -> tuple[float, float]:
    """(log a, b) of log g = log a - b log N, least squares."""
    slope, icpt = np.polyfit(np.log(pops), np.log(np.maximum(gaps, FLOOR)), 1)
    return float(icpt), float(-slope)


def crossing(log_a: float, b: float, target: float) -> float:
    """The population where the fitted ratio reaches `target` (inf if the gap does not
    shrink with N)."""
    if b <= 0:
        return math.inf
    return float(math.exp((log_a - math.log(1.0 - target)) / b))


def fit(points: dict[int, list[float]], target: float = 0.9, boots: int = 2000,
        seed: int = 0) -> dict:
    """Power-law fit of the gap 1 - ratio over populations, N* for `target` and a 90%
    bootstrap interval of N* (over seeds, within each population)."""
    pops = np.array(sorted(points), float)
    if len(pops) < 2:
        raise FedrecError("population study: needs at least two populations to fit a trend")
    ratios = [np.asarray(points[int(p)], float) for p in pops]
    log_a, b = _line(pops, np.array([1.0 - r.mean() for r in ratios]))
    rng = np.random.default_rng(seed)
    stars = []
    for _ in range(boots):
        g = np.array([1.0 - rng.choice(r, size=len(r)).mean() for r in ratios])
        stars.append(crossing(*_line(pops, g), target))
    stars = np.array(stars)
    lo, med, hi = (float(np.quantile(stars, q)) for q in (0.05, 0.5, 0.95))
    return {"target": target, "log-a": log_a, "b": b,
            "population-at-target": crossing(log_a, b, target),
            "bootstrap": {"replicates": boots, "seed": seed, "p05": lo, "median": med,
                          "p95": hi, "share-never": float(np.mean(np.isinf(stars)))},
            "points": {str(int(p)): {"ratios": r.tolist(), "mean": float(r.mean()),
                                     "std": float(r.std())}  # population std, as summarize
                       for p, r in zip(pops, ratios)}}


def seed_ratios(sweep: dict, epsilon: float, key: str) -> tuple[int, list[float]]:
    """(population, [private / non-private `key` per seed]) of one privacy-sweep file: the
    user-level row at `epsilon` against the non-private row, seed by seed."""
    rows = sweep["rows"]
    base = next((r for r in rows if r["unit"] == "none"), None)
    priv = next((r for r in rows if r["unit"] == "user" and r["epsilon"] == epsilon), None)
    if base is None or priv is None:
        raise FedrecError(f"population study: a sweep file lacks the no-DP row or the user "
                          f"row at ε = {epsilon:g}; run it with --units user --epsilons "
                          f"inf,{epsilon:g}")
    by_seed = dict(zip(base["seeds"], base["per-seed"][key]))
    pairs = [(by_seed[s], v) for s, v in zip(priv["seeds"], priv["per-seed"][key])
             if s in by_seed]
    if not pairs:
        raise FedrecError("population study: the no-DP and user rows share no seed")
    return int(priv["population"]), [p / b for b, p in pairs]


def study(sweeps: list[dict], epsilon: float = 8.0, key: str = "full/hr@10",
          target: float = 0.9, boots: int = 2000) -> dict:
    points: dict[int, list[float]] = {}
    for sw in sweeps:
        n, r = seed_ratios(sw, epsilon, key)
        points.setdefault(n, []).extend(r)
    return {"epsilon": epsilon, "metric": key, **fit(points, target, boots)}


def interval(res: dict) -> str:
    """The 90% bootstrap interval of N* in words: an upper end past 100x the largest
    population measured (or never reached) is an extrapolation the data cannot bound."""
    b, cap = res["bootstrap"], 100 * max(int(p) for p in res["points"])
    hi = b["p95"]
    return f"{b['p05']:,.0f} to " + (f"{hi:,.0f}" if hi <= cap else f"unbounded (> {cap:,})")


def plot(res: dict, path: str | Path) -> Path:
    """The measured ratio per population (mean ± std over seeds), the fitted trend and the
    target line, population on a log axis."""
    plt = pyplot()
    pops = sorted(int(p) for p in res["points"])
    mean = [res["points"][str(p)]["mean"] for p in pops]
    std = [res["points"][str(p)]["std"] for p in pops]
    star = res["population-at-target"]
    right = max(pops) * 4 if not math.isfinite(star) else max(max(pops) * 1.5, star * 1.5)
    grid = np.geomspace(min(pops) * 0.8, right, 200)
    trend = 1.0 - np.exp(res["log-a"]) * grid ** -res["b"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(pops, mean, yerr=std, marker="o", capsize=3, ls="none", label="measured")
    ax.plot(grid, trend, lw=1, label=f"fit: 1 - {math.exp(res['log-a']):.3g} N^-{res['b']:.2f}")
    ax.axhline(res["target"], color="k", ls=":", lw=1, label=f"{res['target']:g} x no DP")
    if math.isfinite(star):
        ax.axvline(star, color="gray", lw=1, ls="--",
                   label=f"N* = {star:,.0f} (90%: {interval(res)})")
    ax.set_xscale("log")
    ax.set_xlabel("users in the federation (ml-100k subsets)")
    ax.set_ylabel(f"{res['metric']} at ε = {res['epsilon']:g} / no DP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
