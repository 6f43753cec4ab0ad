"""The privacy frontier in one file: every private method per (unit, ε) beside the DP
popularity baseline at the same (unit, ε, δ) and the best non-private federated model,
from the result files simulations/privacy_frontier.sh writes (docs/privacy.md).

    python simulations/privacy_frontier.py   # -> results/privacy-frontier.json and .png

Rows: `method`, `unit` ("user", "block" or "none"), `epsilon`, `delta`, `accountant`,
`seeds` (training seeds, or the noise draws of a one-release method: `seed_kind`), and
`full/hr@10`, `full/ndcg@10`, `sampled/hr@10` as {"mean", "std"}. `best` holds, per (unit,
ε), the private method with the highest full HR@10 and its ratio to DP popularity.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedrec.files import pyplot, save_figure, write_text_atomic
from fedrec.results import machine

DIR = ROOT / "results" / "privacy-frontier"
OUT = ROOT / "results" / "privacy-frontier.json"
PLOT = ROOT / "results" / "privacy-frontier.png"
REFERENCE = ROOT / "results" / "fed-seq+id-sched.json"
KEYS = ("full/hr@10", "full/ndcg@10", "sampled/hr@10")
TRAINED = {"trained-user-a": "dp-fedavg", "trained-user-b": "dp-fedavg",
           "trained-block": "dp-sgd", "ftrl-fedadam": "dp-ftrl-tree (fedadam)",
           "ftrl-fedavg": "dp-ftrl-tree (fedavg)",
           "profile-eps8": "dp-profile (release + DP-FedAvg)"}
EPSILONS = (8.0, 4.0, 2.0, 1.0)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def one_release_rows() -> list[dict]:
    """dp-popularity and dp-prior+device-text: `fedrec baseline popularity --epsilon`."""
    rows = []
    for path in sorted(DIR.glob("dp-*-eps*.json")):
        res = json.loads(path.read_text())
        p, s = res["privacy"], res["summary"]["final"]
        unit = "user" if p["unit"] == "user" else "block"
        text = p.get("device-text")
        rows.append({
            "method": res["method"], "unit": unit, "unit-detail": p["unit"],
            "epsilon": p["epsilon"], "delta": p["delta"], "accountant": p["accountant"],
            "seeds": [r["seed"] for r in res["runs"]], "seed_kind": res["seed_kind"],
            **{k: s[k] for k in KEYS},
            "settings": {"epsilon-spent": p["epsilon-spent"], "bound": p["bound"],
                         "noise-std": p["noise-std"],
                         **({"text-weight": text["weight"], "text-last": text["last"]}
                            if text else {})},
            "audit": p.get("audit"), "source": _rel(path), "command": res["command"],
            "commit": res["machine"]["commit"]})
    return rows


def trained_rows() -> list[dict]:
    """The DP-trained federated model: privacy-sweep tables."""
    rows = []
    for name, method in TRAINED.items():
        path = DIR / f"{name}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        for r in res["rows"]:
            if r["unit"] not in ("user", "block"):
                continue
            rows.append({
                "method": method, "unit": r["unit"], "unit-detail": r.get("unit-detail"),
                "epsilon": r["epsilon"], "delta": r["delta"], "accountant": r["accountant"],
                "seeds": r["seeds"], "seed_kind": "training seed", **{k: r[k] for k in KEYS},
                "settings": {k: r.get(k) for k in ("sigma", "max-grad-norm", "rounds",
                                                   "clients-per-round", "local-epochs",
                                                   "server-lr", "epsilon-spent-max")},
                "source": _rel(path), "command": res["command"],
                "commit": res["machine"]["commit"]})
    return rows


def reference_row() -> dict:
    res = json.loads(REFERENCE.read_text())
    s = res["summary"]["final"]
    return {"method": "federated text + ID (default, 100 rounds, no DP)", "unit": "none",
            "epsilon": None, "delta": None, "accountant": None,
            "seeds": [r["seed"] for r in res["runs"]], "seed_kind": "training seed",
            **{k: s[k] for k in KEYS}, "source": _rel(REFERENCE), "command": res["command"],
            "commit": res["machine"]["commit"]}


def best_points(rows: list[dict]) -> list[dict]:
    out = []
    for unit in ("user", "block"):
        for eps in EPSILONS:
            here = [r for r in rows if r["unit"] == unit and r["epsilon"] == eps]
            base = next((r for r in here if r["method"] == "dp-popularity"), None)
            private = [r for r in here if r["method"] != "dp-popularity"]
            if not base or not private:
                continue
            top = max(private, key=lambda r: r["full/hr@10"]["mean"])
            out.append({"unit": unit, "epsilon": eps, "method": top["method"],
                        "full/hr@10": top["full/hr@10"],
                        "dp-popularity full/hr@10": base["full/hr@10"],
                        "ratio": top["full/hr@10"]["mean"] / base["full/hr@10"]["mean"]})
    return out


def plot(rows: list[dict], ref: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"user": "-", "block": "--"}
    for unit in ("user", "block"):
        for method, marker in (("dp-prior+device-text", "o"), ("dp-popularity", "s"),
                               ("dp-fedavg", "^"), ("dp-sgd", "v")):
            pts = sorted((r["epsilon"], r["full/hr@10"]["mean"], r["full/hr@10"]["std"])
                         for r in rows if r["unit"] == unit and r["method"] == method)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker=marker, linestyle=styles[unit],
                            capsize=2, label=f"{method} ({unit})")
    m = ref["full/hr@10"]["mean"]
    ax.axhline(m, color="k", linestyle=":", label=f"no DP, federated ({m:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (δ = 1e-4)")
    ax.set_ylabel("full HR@10 (ml-100k)")
    ax.set_title("Private recommenders against DP popularity")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=2)
    save_figure(fig, path)


def main() -> None:
    rows = one_release_rows() + trained_rows()
    ref = reference_row()
    rows.sort(key=lambda r: (r["unit"], -r["epsilon"], r["method"]))
    best = best_points(rows)
    body = {"method": "privacy-frontier", "command": "python simulations/privacy_frontier.py",
            "rows": [*rows, ref], "best": best, "machine": machine()}
    write_text_atomic(OUT, json.dumps(body, indent=2) + "\n")
    plot(rows, ref, PLOT)
    for b in best:
        print(f"{b['unit']:5} ε {b['epsilon']:g}: {b['method']} "
              f"{b['full/hr@10']['mean']:.4f} = {b['ratio']:.2f}x DP popularity")


if __name__ == "__main__":
    main()
