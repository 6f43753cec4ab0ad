"""Cost of sample-level DP-SGD on a device: one client update with and without it.

    OMP_NUM_THREADS=1 .venv/bin/python simulations/bench_dp.py [--users 50] [--repeats 3]
        (the default seq model: DP-SGD over disjoint blocks, fedrec/privacy/seq_dpsgd.py)
    OMP_NUM_THREADS=1 .venv/bin/python simulations/bench_dp.py --run-config \
        "model.pooling='none'" --json results/bench_dp_nopool.json
    OMP_NUM_THREADS=1 .venv/bin/python simulations/bench_dp.py --run-config \
        "privacy.pool-gradient='none'" --json results/bench_dp_poolinput.json

On ml-100k, for the same users, global parameters and seeds, times `local_update` under
privacy.mode=none and privacy.mode=sample (DP-SGD), both with train.optimizer=sgd and the
same local epochs and batch size, interleaved (user by user, order alternating) and
repeated, after one untimed warm-up update of each kind (imports and first-call set-up,
which a long-running device pays once; the accountant's per-(q, sigma) cache is emptied
again after it); prints the mean per-update times and the ratio DP / plain (target <= 2).
The clipped per-row gradients come from the path DP-SGD takes (fedrec.privacy.dpsgd.per_row_method):
ghost norms through the history pool for the default text model (fedrec/privacy/pooled_norms.py),
the direct ghost-norm path for models whose rows share nothing (model.pooling='none',
fedmf; and a history-pooled model with privacy.pool-gradient='none', whose pool is each
row's input), torch.func otherwise. For reference it also times one batch of per-row
gradients with torch.func and with Opacus' default hook-based GradSampleModule on the same
model and loss (both always exact through the pool), and that path's clipped sum. --run-config
passes more config overrides; writes --json (default results/bench_dp.json).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import load_config, parse_overrides
from fedrec.data.pipeline import prepare
from fedrec.federation.local import ClientData, _histories, local_update
from fedrec.models.build import build_model
from fedrec.models.seqrec import SeqRec
from fedrec.models.train import row_loss
from fedrec.privacy.accounting import Accountant, _rdp_per_step
from fedrec.privacy.dpsgd import clipped_grad_sum, per_row_grads, per_row_method
from fedrec.results import machine, write_json


class OpacusRows(torch.nn.Module):
    """The same per-row loss as fedrec.privacy.dpsgd._Row, batched with rows first (what Opacus'
    hooks need): each row pools its own leave-one-out copy of the history (pooling 'none':
    the user vector is the user-local one alone)."""

    def __init__(self, model, dim):
        super().__init__()
        self.m = model
        self.local = torch.nn.Embedding(1, dim)  # the user-local vector, as a hookable layer
        torch.nn.init.zeros_(self.local.weight)

    def forward(self, E_hist, keep, cand_emb):  # [B, L, D], [B, L] bool, [B, 1+K, D]
        m = self.m
        hu = self.local(torch.zeros(len(keep), dtype=torch.long))
        if m.uses_history:
            h = m.item_adapter(E_hist)
            a = m.attention(h).squeeze(-1)
            w = torch.softmax(a.masked_fill(~keep, -torch.inf), dim=1)
            hu = m.user_adapter((w[..., None] * h).sum(1)) + hu
        hc, bc = m.item_adapter(cand_emb), m.item_bias(cand_emb).squeeze(-1)
        return torch.einsum("bd,bcd->bc", hu, hc) + bc


def opacus_batch(gsm, E, hist, rows, negs, loss):
    E_hist = E[hist.items].expand(len(rows), -1, -1)
    keep = torch.arange(len(hist.items))[None] != torch.from_numpy(rows)[:, None]
    cand = torch.from_numpy(np.concatenate([hist.items.numpy()[rows, None], negs], axis=1))
    gsm.zero_grad(set_to_none=True)
    scores = gsm(E_hist, keep, E[cand])
    row_loss(scores, loss).backward()
    return [p.grad_sample for p in gsm.parameters() if p.requires_grad]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run-config", default="", help="more config overrides, key=value ...")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_dp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus on a frozen input
    base = load_config(parse_overrides("train.optimizer='sgd' " + args.run_config))
    cfgs = {"plain": base.override(**{"privacy.mode": "none"}),
            "dp": base.override(**{"privacy.mode": "sample", "privacy.target-epsilon": 0.0})}
    p = prepare(base, with_text=True)
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
           "history_length_mean": float(np.mean([len(c.history) for c in clients.values()]))}
    pool_gradient = base.privacy.pool_gradient
    if isinstance(model, SeqRec):  # fedrec/privacy/seq_dpsgd.py: one path, nothing to compare
        method, args.no_opacus = "blocks", True
        out["per_row_path"] = "torch.func over disjoint blocks"
    else:
        method = per_row_method(model, torch.zeros(1), pool_gradient)
        out["per_row_path"] = {"direct": "direct", "pooled": "pooled ghost norms",
                               "vmap": "torch.func"}[method]
    print(f"client update: plain {out['plain_seconds_mean']:.4f} s, DP-SGD "
          f"{out['dp_seconds_mean']:.4f} s, ratio DP/plain {ratio:.2f} (target <= 2)")

    if not args.no_opacus:  # per-row gradients of one full batch: torch.func vs Opacus hooks
        from opacus import GradSampleModule

        gsm = GradSampleModule(OpacusRows(build_model(base, E.shape[1], split.n_items),
                                          base.model.dim))
        gsm._module.m.load_state_dict(model.state_dict())  # torch.func runs `model`, hook-free
        E_t, loc = torch.from_numpy(E), torch.zeros(1, base.model.dim, requires_grad=True)
        if not model.uses_history:  # the user vector is loc alone: not a zero vector
            loc = (torch.randn(1, base.model.dim) * 0.1).requires_grad_()
        rng, t = np.random.default_rng(0), {"torch.func": [], "opacus": []}
        if method != "vmap":
            t[f"{method} (clipped sum)"] = []
        with torch.no_grad():
            gsm._module.local.weight.copy_(loc)
        for u in users:
            hist = _histories(clients[u])
            b = min(base.train.batch_size, len(hist.items))
            rows = rng.choice(len(hist.items), b, replace=False)
            negs = rng.integers(0, split.n_items, (b, base.train.negatives))
            for name in (list(t) if u % 2 else list(t)[::-1]):
                t0 = time.perf_counter()
                if name == "opacus":
                    opacus_batch(gsm, E_t, hist, rows, negs, base.train.loss)
                elif name == "torch.func":
                    per_row_grads(model, loc, E_t, hist, rows, negs, base.train.loss)
                else:
                    clipped_grad_sum(model, loc, E_t, hist, rows, negs, base.train.loss,
                                     base.privacy.max_grad_norm, method, pool_gradient)
                t[name].append(time.perf_counter() - t0)
        out["per_row_grads_batch_seconds"] = {k: float(np.mean(v)) for k, v in t.items()}
        print("per-row gradients of one batch: " + ", ".join(
            f"{k} {np.mean(v) * 1e3:.1f} ms" for k, v in t.items()))
    write_json(args.json, {"command": " ".join(sys.argv), "config": base.to_flat(),
                           "users": users.tolist(), "repeats": args.repeats,
                           "seconds": {k: v.tolist() for k, v in times.items()}, **out,
                           "machine": machine()})


if __name__ == "__main__":
    main()
