"""Plot test full and sampled HR@10 (federated evaluation) against rounds.

    .venv/bin/python simulations/plot_rounds.py results/fed-seq+id-e2.json results/fed-seq.json \
        --central results/central-seq+id.json --out results/rounds.png

Each input is a result file written by `fedrec simulate --json`; each run in it holds its
per-round curve. Curves are mean ± std over seeds.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedrec.files import save_figure

METRICS = ("full/hr@10", "sampled/hr@10")


def curves(result_file: str) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    res = json.loads(Path(result_file).read_text())
    per_seed = [{r["round"]: r for r in run["curve"] if f"federated/{METRICS[0]}" in r}
                for run in res["runs"]]
    common = sorted(set.intersection(*(set(s) for s in per_seed)))
    values = {m: np.array([[s[r][f"federated/{m}"] for r in common] for s in per_seed])
              for m in METRICS}
    return res["method"], np.array(common), values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--central", nargs="*", default=[], help="horizontal reference lines")
    ap.add_argument("--out", default="results/rounds.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, METRICS):
        for f in args.results:
            name, x, vals = curves(f)
            mean, std = vals[metric].mean(0), vals[metric].std(0)
            ax.plot(x, mean, marker="o", ms=3, label=name)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        for f in args.central:
            res = json.loads(Path(f).read_text())
            ax.axhline(res["summary"]["best"][metric]["mean"], ls="--", lw=1, color="gray")
            ax.text(0.01, res["summary"]["best"][metric]["mean"], res["method"], fontsize=8,
                    color="gray", va="bottom", transform=ax.get_yaxis_transform())
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {metric} (federated evaluation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
