"""Cost of sample-level DP-SGD on a device: one client update with and without it.

    OMP_NUM_THREADS=1 .venv/bin/python simulations/bench_dp.py [--users 50] [--repeats 3]
    OMP_NUM_THREADS=1 .venv/bin/python simulations/bench_dp.py --run-config \
        "model.kind='fedmf'" --json results/bench_dp_fedmf.json

On ml-100k, for the same users, global parameters and seeds, times `local_update` under
privacy.mode=none and privacy.mode=sample (DP-SGD over disjoint blocks, one path for every
model: fedrec/privacy/dpsgd.py), both with train.optimizer=sgd and the same local epochs
and batch size, interleaved (user by user, order alternating) and repeated, after one
untimed warm-up update of each kind (imports and first-call set-up, which a long-running
device pays once; the accountant's per-(q, sigma) cache is emptied again after it);
prints the mean per-update times and the ratio DP / plain. --run-config passes more
config overrides; writes --json (default results/bench_dp.json).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import load_config, parse_overrides
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.federation.local import local_update
from fedrec.models.build import build_model
from fedrec.privacy.accounting import Accountant, _rdp_per_step
from fedrec.results import machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run-config", default="", help="more config overrides, key=value ...")
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_dp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_config(parse_overrides("train.optimizer='sgd' " + args.run_config))
    cfgs = {"plain": base.override(**{"privacy.mode": "none"}),
            "dp": base.override(**{"privacy.mode": "sample", "privacy.target-epsilon": 0.0})}
    p = prepare(base)
    E, split = p.item_emb, p.split
    users = np.sort(np.random.default_rng(0).choice(split.n_users, args.users, replace=False))
    clients = {u: ClientData.from_split(split, int(u)) for u in users}
    torch.manual_seed(base.train.seed)
    model = build_model(base, E.shape[1], split.n_items)
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    times = {k: np.zeros((args.repeats, len(users))) for k in cfgs}
    for c in cfgs.values():  # warm-up, untimed: imports and first-call set-up
        local_update(c, E, clients[users[0]], arrays, None, seed=0,
                     accountant=Accountant(base.privacy.accountant))
    _rdp_per_step.cache_clear()  # every user's first ε is computed inside the timing
    for r in range(args.repeats):
        for j, u in enumerate(users):
            order = list(cfgs) if (r + j) % 2 == 0 else list(cfgs)[::-1]
            for name in order:
                acc = Accountant(base.privacy.accountant)
                t0 = time.perf_counter()
                local_update(cfgs[name], E, clients[u], arrays, None, seed=int(u), accountant=acc)
                times[name][r, j] = time.perf_counter() - t0
        print(f"repeat {r}: plain {times['plain'][r].mean():.4f} s  dp {times['dp'][r].mean():.4f}"
              f" s  ratio {times['dp'][r].sum() / times['plain'][r].sum():.2f}", flush=True)
    ratio = float(times["dp"].sum() / times["plain"].sum())
    out = {"plain_seconds_mean": float(times["plain"].mean()),
           "dp_seconds_mean": float(times["dp"].mean()), "ratio_dp_over_plain": ratio,
           "ratio_per_repeat": (times["dp"].sum(1) / times["plain"].sum(1)).tolist(),
           "history_length_mean": float(np.mean([len(c.history) for c in clients.values()])),
           "per_row_path": "torch.func over disjoint blocks"}
    print(f"client update: plain {out['plain_seconds_mean']:.4f} s, DP-SGD "
          f"{out['dp_seconds_mean']:.4f} s, ratio DP/plain {ratio:.2f}")
    write_json(args.json, {"command": " ".join(sys.argv), "config": base.to_flat(),
                           "users": users.tolist(), "repeats": args.repeats,
                           "seconds": {k: v.tolist() for k, v in times.items()}, **out,
                           "machine": machine()})


if __name__ == "__main__":
    main()
