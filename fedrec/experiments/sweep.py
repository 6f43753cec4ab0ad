"""Privacy-budget experiments: accuracy against ε, for each unit of privacy.

`fedrec privacy-sweep` runs one federated configuration at every target ε of a grid
(inf = no DP), for each unit of privacy and each seed, and writes one table row per
(unit, ε) with the privacy parameters that produced it and HR@10 / NDCG@10 mean ± std
(federated evaluation, test at the round fed.select picks, as `fedrec simulate`), full
ranking beside sampled, and the population (users) it ran on.

- unit "block" (privacy.mode = sample, DP-SGD on each device over disjoint blocks of its
  history): each device solves its own σ so that its ε over fed.num-rounds at the
  expected participation stays <= the target (fedrec/privacy/dpsgd.py); the row's σ is the
  mean over the devices that trained, and "ε spent" is the largest cumulative ε any
  device reported.
- unit "user" (privacy.mode = user, DP-FedAvg / DP-FedAdam): σ is solved here so that
  fed.num-rounds rounds at sample rate q = clients-per-round / users spend exactly the
  target; the same target is the run's hard budget (fedrec/federation/server_opt.py).
The ε = inf row is the same run without DP, once per seed (it has no unit).
"""

import json
import math
from pathlib import Path

from fedrec.config import Config, parse_overrides, run_identity
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.experiments.runs import check_engine, run_federated
from fedrec.federation.run_store import run_dir_for
from fedrec.files import pyplot, save_figure
from fedrec.privacy.accounting import (
    UNIT,
    describe,
    parse_epsilons,
    solve_noise_multiplier,
    user_epsilon,
)
from fedrec.privacy.exact import smallest, tree_separation, tree_sigma
from fedrec.results import fmt, summarize

MODES = {"block": "sample", "user": "user"}
METRICS = ("full/hr@10", "full/ndcg@10", "sampled/hr@10", "sampled/ndcg@10")


def user_sigma(cfg: Config, epsilon: float, population: int) -> float:
    """σ of DP-FedAvg that spends exactly `epsilon` over fed.num-rounds rounds."""
    k = cfg.fed.clients_per_round or population
    if cfg.privacy.noise == "tree":
        return tree_sigma(epsilon, cfg.privacy.delta, cfg.fed.num_rounds,
                          tree_separation(k / population))
    if cfg.model.kind == "profile":  # the release's ε composed first: bisect on σ
        c = cfg.override(**{"privacy.mode": "user"})

        def within(sigma: float) -> bool:
            return user_epsilon(c.override(**{"privacy.noise-multiplier": sigma}),
                                cfg.fed.num_rounds, k / population) <= epsilon
        if not within(16384.0):
            raise FedrecError(f"--epsilons {epsilon:g}: model.prior's release alone spends "
                              "more; release at a smaller ε")
        return smallest(within, 0.05, rel_tol=1e-3)
    return solve_noise_multiplier(target_epsilon=epsilon, delta=cfg.privacy.delta,
                                  sample_rate=k / population, steps=cfg.fed.num_rounds,
                                  accountant=cfg.privacy.accountant)


def plan(cfg: Config, unit: str, epsilon: float, population: int) -> Config:
    """The run's config for one (unit, ε) cell."""
    if math.isinf(epsilon):
        return cfg.override(**{"privacy.mode": "none", "privacy.target-epsilon": 0.0})
    over = {"privacy.mode": MODES[unit], "privacy.target-epsilon": epsilon}
    if unit == "user":
        over["privacy.noise-multiplier"] = user_sigma(cfg, epsilon, population)
    return cfg.override(**over)


def cells(units: list[str], epsilons: list[float]) -> list[tuple[str, float]]:
    """(unit, ε) pairs to run; the non-private run once, as unit "none"."""
    out = [("none", math.inf)] if any(math.isinf(e) for e in epsilons) else []
    return out + [(u, e) for u in units for e in epsilons if not math.isinf(e)]


def finished(run_dir: Path, cfg: Config) -> dict | None:
    """results.json of a run of exactly this config that ended (all rounds, or stopped by
    its privacy budget) in run_dir, or None: such a cell need not run again, so a killed
    sweep continues and sweeps run side by side (one per unit) combine into one table."""
    try:
        res = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    same = run_identity(res.get("config", {})) == run_identity(cfg.to_flat())
    return res if same and res.get("status") in ("completed", "stopped") and res.get(
        "summary") else None


def row(cfg: Config, unit: str, epsilon: float, runs: list[dict], population: int) -> dict:
    """One table row from the cell's per-seed results (results.json of each run)."""
    trains = [[r["train"] for r in res["rounds"] if "train" in r] for res in runs]
    sigmas = ([cfg.privacy.noise_multiplier] if unit == "user" else  # one σ for all devices
              [t["noise-multiplier"] for ts in trains for t in ts if "noise-multiplier" in t])
    spent = [ts[-1].get("epsilon-max", math.nan) for ts in trains if ts]
    best = summarize([res["summary"]["best"] for res in runs])
    return {"unit": UNIT.get(MODES.get(unit, ""), "none"), "unit-detail": describe(cfg)["unit"],
            "epsilon": epsilon,
            "epsilon-spent-max": max(spent) if spent and unit != "none" else None,
            "delta": cfg.privacy.delta if unit != "none" else None,
            "accountant": describe(cfg)["accountant"] if unit != "none" else None,
            "sigma": sum(sigmas) / len(sigmas) if sigmas else None,
            "max-grad-norm": cfg.privacy.max_grad_norm if unit != "none" else None,
            "clipping": cfg.privacy.clipping if unit == "user" else None,
            "batch-size": cfg.train.batch_size, "local-epochs": cfg.train.local_epochs,
            "server-lr": cfg.fed.server_lr, "server-tau": cfg.fed.server_tau, "lr": cfg.train.lr,
            "rounds": max(len(ts) for ts in trains), "planned-rounds": cfg.fed.num_rounds,
            "clients-per-round": cfg.fed.clients_per_round, "population": population,
            "seeds": [res["config"]["train.seed"] for res in runs],
            "per-seed": {m: [res["summary"]["best"][m] for res in runs] for m in METRICS},
            **{m: best[m] for m in METRICS if m in best}}


def plot(rows: list[dict], path: str | Path) -> Path:
    """Full and sampled HR@10 against ε, one line per unit, the non-private run as a
    horizontal band and 0.9 x it dotted."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("full/hr@10", "sampled/hr@10")):
        for r in rows:
            if r["unit"] == "none" and key in r:
                m, s = r[key]["mean"], r[key]["std"]
                ax.axhline(m, color="k", lw=1, label="no DP (ε = ∞)")
                ax.axhspan(m - s, m + s, color="k", alpha=0.1)
                ax.axhline(0.9 * m, color="k", lw=1, ls=":", label="0.9 × no DP")
        for unit, marker in (("block", "o"), ("user", "s")):
            pts = sorted((r["epsilon"], r[key]) for r in rows if r["unit"] == unit and key in r)
            if pts:
                ax.errorbar([e for e, _ in pts], [v["mean"] for _, v in pts],
                            yerr=[v["std"] for _, v in pts], marker=marker, capsize=3,
                            label=f"unit: one {unit}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target ε (δ in the table)")
        ax.set_ylabel(f"test {key.split('/')[0]} HR@10")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(cfg: Config, *, seeds: list[int], epsilons: str, units: str, engine: str,
        runs_dir: str | None, per_unit: dict[str, str], log=print) -> dict:
    """Every (unit, ε) cell over the seeds (a finished cell's run directory is reused),
    per_unit: more --run-config overrides for one unit's cells: a result file's body."""
    eps_grid = parse_epsilons(epsilons)
    unit_list = [u.strip() for u in units.split(",") if u.strip()]
    if not unit_list or any(u not in MODES for u in unit_list):
        raise FedrecError(f"--units: '{units}' must name block and/or user")
    check_engine(engine)
    population = prepare(cfg, progress=True).split.n_users
    base = (Path(runs_dir).expanduser() if runs_dir else run_dir_for(cfg)).resolve()
    rows = []
    for unit, eps in cells(unit_list, eps_grid):
        c = plan(cfg.override(**parse_overrides(per_unit.get(unit, ""))), unit, eps, population)
        results = []
        for seed in seeds:
            run_dir = base / f"{unit}-eps{eps:g}" / f"seed-{seed}"
            cs = c.override(**{"train.seed": seed})
            done = finished(run_dir, cs)
            log(f"privacy sweep: unit {unit}, ε {eps:g}, seed {seed} -> {run_dir}"
                f"{' (finished earlier: reused)' if done else ''}")
            results.append(done or run_federated(cs, run_dir, engine, log))
        rows.append(row(c, unit, eps, results, population))
    return {"method": "privacy-sweep", "config": cfg.to_flat(), "seed_kind": "train.seed",
            "rows": rows}


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) of the sweep's console table."""
    opt = lambda v, spec: "-" if v is None else format(v, spec)
    return (["unit", "ε", "ε spent", "δ", "σ", "C", "rounds", "full HR@10", "full NDCG@10",
             "sampled HR@10"],
            [[r["unit"], "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}",
              opt(r["epsilon-spent-max"], ".2f"), opt(r["delta"], "g"), opt(r["sigma"], ".3f"),
              opt(r["max-grad-norm"], "g"), str(r["rounds"]), fmt(r["full/hr@10"]),
              fmt(r["full/ndcg@10"]), fmt(r["sampled/hr@10"])] for r in rows])
