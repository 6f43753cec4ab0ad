"""The population study of docs/privacy.md: private / non-private HR@10 at one ε against the
number of users, a fitted power-law trend and the population at which it reaches 0.9x.

    python simulations/population_study.py results/privacy-v2/population-118.json ... \\
        results/privacy-v2/sweep.json --json results/privacy-v2/population.json \\
        --plot results/privacy-v2/population.png

Each input is a `fedrec privacy-sweep` result file holding the no-DP row and the user-level
row at --epsilon (one file per population; the full-population sweep counts as one).
The fit is on full-ranking HR@10 (the headline); the sampled one is fitted beside it.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.errors import FedrecError
from fedrec.privacy import population
from fedrec.results import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", help="privacy-sweep result files, one per population")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()
    sweeps = []
    for f in args.sweeps:
        try:
            sweeps.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as exc:
            sys.exit(f"error: {f}: cannot read a privacy-sweep result file ({exc})")
    try:
        res = population.study(sweeps, args.epsilon, "full/hr@10", args.target)
        res["sampled"] = population.study(sweeps, args.epsilon, "sampled/hr@10", args.target)
    except FedrecError as exc:
        sys.exit(f"error: {exc}")
    user_rows = [next(r for r in sw["rows"] if r["unit"] == "user" and r["epsilon"] == args.epsilon)
                 for sw in sweeps]
    res["runs"] = [{"file": f, "population": r["population"], "clients-per-round":
                    r["clients-per-round"], "sigma": r["sigma"], "command": sw.get("command")}
                   for f, r, sw in zip(args.sweeps, user_rows, sweeps)]
    write_result(args.json, {"method": "population-study", **res})
    star = res["population-at-target"]
    print(f"{res['metric']} ratio at ε = {args.epsilon:g}: "
          + ", ".join(f"N={p}: {v['mean']:.3f}" for p, v in res["points"].items())
          + f"; trend reaches {args.target:g}x at N = "
          + (f"{star:,.0f}" if math.isfinite(star) else "never")
          + f" (90% bootstrap {population.interval(res)})")
    if args.plot:
        population.plot(res, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
