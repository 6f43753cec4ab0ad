"""Plot full HR@10 against intra-list diversity of re-ranked top-10 lists, one curve per
re-ranker's file.

    .venv/bin/python simulations/plot_diversity.py results/diversity.json \
        results/diversity-dpp.json --out results/diversity.png

The inputs are written by `fedrec diversity-curve [--method dpp] --json`; one point per
lambda, mean ± std over its runs (seeds), diversity in the space the file re-ranked with
(genres: 1 - mean pairwise Jaccard of the items' genre sets; plm: 1 - mean cosine).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedrec.data.evaluate import ILD_KEYS
from fedrec.files import save_figure

WORDS = {"plm": "1 - mean PLM cosine", "plm-centred": "1 - mean centred PLM cosine",
         "genres": "1 - mean genre Jaccard"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    spaces = set()
    for path in args.results:
        res = json.loads(Path(path).read_text())
        rows = res["summary"]
        space = res.get("similarity", "plm")
        key = ILD_KEYS[space].format(k=10)
        spaces.add(WORDS[space])
        x = [r[key]["mean"] for r in rows]
        y = [r["full/hr@10"]["mean"] for r in rows]
        ax.errorbar(x, y, xerr=[r[key]["std"] for r in rows],
                    yerr=[r["full/hr@10"]["std"] for r in rows], marker="o", capsize=2,
                    label=f"{res['method'].split('(')[-1].rstrip(')')}, {len(res['runs'])} runs")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"λ={r['lambda']:g}", (xi, yi), textcoords="offset points",
                        xytext=(4, 4), fontsize=6)
    ax.set_xlabel(f"intra-list diversity of the top-10 ({' / '.join(sorted(spaces))})")
    ax.set_ylabel("full-ranking HR@10 (test)")
    ax.set_title("re-ranking for diversity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
