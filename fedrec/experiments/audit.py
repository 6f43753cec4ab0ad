"""Membership-inference audit: from one uploaded update, can the server tell which items
a user trained on?

Threat: the honest-but-curious server (docs/privacy.md). It sent the global parameters θ0, it
receives a device's update Δ = θ1 - θ0 (one `local_update`, with the config's privacy
settings) and it knows the public catalog embeddings E. For each candidate item X it
computes statistics of Δ alone; members are the user's training items, non-members as
many random catalog items outside them. The audit reports the ROC AUC of each statistic
(0.5 = the attacker learns nothing; below 0.5 the statistic separates members the
other way). Statistics, for the model's item side h(X), b(X) = model.item_table(E_X) and
score s(X) = <h_u, h(X)> + b(X):

- bias:        b1(X) - b0(X), the change of the item's score bias.
- item-vector: <ĥ_u, h1(X) - h0(X)>, the change of the item vector along the user vector
               implied by the update (below).
- score:       the change of the implied score <ĥ_u, h(X)> + b(X) (the two above, summed).
- grad-align:  cos(Δ, ∇θ s(X) at θ0): does the update point where training on X would?
               (the loss-gradient alignment attack; per-item gradients with torch.func).

The implied user vector: an item's vector and its bias receive the same ∂loss/∂score,
times h_u and 1, so the item side's update is about Δh(X) ≈ Δb(X) h_u; ĥ_u is that
least-squares fit over the catalog. h_u itself never leaves the device, but its direction
can be read off an update (cosine ~0.97-1.0 to the true h_u on ml-100k, no DP).

Calibration: negatives are drawn uniformly from the catalog, so every item's statistic
also moves with its similarity to the catalog's mean embedding c(X) = <E_X, mean E>, by
an amount and sign that vary per user. The first three statistics are computed for the
whole catalog and their least-squares fit on c(X) is subtracted (the text model; FedMF
has no E). grad-align, computed for the candidates only, is the uncalibrated baseline.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedrec.config import Config, stored_config
from fedrec.data.evaluate import roc_auc
from fedrec.data.pipeline import prepare
from fedrec.data.protocol import ClientData
from fedrec.errors import FedrecError
from fedrec.federation.local import client_seed, local_update
from fedrec.models.build import build_model, model_from_arrays
from fedrec.models.saved import load_run
from fedrec.privacy.accounting import EPSILON_METRIC, Accountant, describe, parse_epsilons
from fedrec.privacy.dp_popularity import bounded_counts, release_audit

STATS = ("bias", "item-vector", "score", "grad-align")


def privacy_settings(cfg, epsilons: str) -> list[tuple[float, object]]:
    """--epsilons "inf,8" -> [(ε, config)]: inf = privacy.mode none, a number = sample-level
    DP-SGD (privacy.mode sample) with that privacy.target-epsilon; the rest of privacy.*
    comes from cfg."""
    return [(eps, cfg.override(**({"privacy.mode": "none"} if math.isinf(eps) else
                                  {"privacy.mode": "sample", "privacy.target-epsilon": eps})))
            for eps in parse_epsilons(epsilons)]


def global_params(cfg, text_dim: int, n_items: int, run_dir: str | None = None) -> dict:
    """The global federated parameters the audited round starts from: a trained model's
    (a run directory) or a fresh model's (seed train.seed)."""
    if run_dir is not None:
        arrays = load_run(run_dir)[1]  # trained on this very catalog: rows as they are
        try:
            model_from_arrays(cfg, text_dim, n_items, arrays)
        except RuntimeError as exc:
            raise FedrecError(f"--model: '{run_dir}' does not fit its own config and data "
                              f"({str(exc).splitlines()[-1].strip()}); give a complete run "
                              "directory") from None
        return {k: v.astype(np.float32) for k, v in arrays.items()}
    torch.manual_seed(cfg.train.seed)
    return {k: v.numpy() for k, v in build_model(cfg, text_dim, n_items).state_dict().items()}


def targets(split, n_users: int, seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(user, members, non-members) for n random users with a training history: members =
    the training items, non-members = as many random catalog items outside them."""
    rng = np.random.default_rng(seed)
    users = np.flatnonzero(np.diff(split.train_ptr) > 0)
    out = []
    for u in np.sort(rng.choice(users, min(n_users, len(users)), replace=False)):
        members = np.unique(split.history(int(u)))
        outside = np.setdiff1d(np.arange(split.n_items), members)
        out.append((int(u), members,
                    np.sort(rng.choice(outside, min(len(members), len(outside)), replace=False))))
    return out


class _Score(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, e, i, hu):
        h, b = self.m.item_table(e[None], i[None])
        return h[0] @ hu + b[0]


def _model(cfg, E: torch.Tensor, n_items: int, arrays: dict):
    return model_from_arrays(cfg, E.shape[1], n_items, arrays)  # every row as it is


@torch.no_grad()
def _flat(arrays: dict, names) -> torch.Tensor:
    return torch.cat([torch.as_tensor(arrays[k], dtype=torch.float32).reshape(-1) for k in names])


def _calibrate(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """v minus its least-squares fit on c over the catalog (no-op if c is constant)."""
    vc, cc = v - v.mean(), c - c.mean()
    return v - (vc @ cc) / (cc @ cc).clamp_min(1e-30) * c


def attack_scores(cfg, E: np.ndarray, before: dict, after: dict, items: np.ndarray,
                  chunk: int = 128) -> dict[str, np.ndarray]:
    """Each statistic (STATS) for candidate `items`, from the global parameters `before`
    and the uploaded ones `after` (and the public E)."""
    E_t, n_items = torch.from_numpy(E), len(E)
    m0, m1 = _model(cfg, E_t, n_items, before), _model(cfg, E_t, n_items, after)
    everything = torch.arange(n_items)
    x = torch.from_numpy(np.asarray(items, np.int64))
    with torch.no_grad():
        (h0, b0), (h1, b1) = m0.item_table(E_t, everything), m1.item_table(E_t, everything)
        dh, db = h1 - h0, b1 - b0
        dhc, dbc = dh - dh.mean(0), db - db.mean()
        hu = dhc.T @ dbc / dbc.dot(dbc).clamp_min(1e-30)  # Δh(X) ≈ Δb(X) h_u, over the catalog
        centrality = E_t @ E_t.mean(0) if E_t.shape[1] else torch.zeros(n_items)
        out = {k: _calibrate(v, centrality)[x] for k, v in
               (("bias", db), ("item-vector", dh @ hu), ("score", dh @ hu + db))}
    names = [k for k, _ in m0.named_parameters()]
    delta = _flat(after, names) - _flat(before, names)
    params = {f"m.{k}": v.detach() for k, v in m0.named_parameters()}
    score_grad = vmap(grad(lambda p, e, i: functional_call(_Score(m0), p, (e, i, hu))),
                      in_dims=(None, 0, 0))
    align = []
    for c in torch.split(x, chunk):
        g = score_grad(params, E_t[c], c)
        g = torch.cat([g[f"m.{k}"].reshape(len(c), -1) for k in names], dim=1)
        align.append(g @ delta / (g.norm(dim=1) * delta.norm()).clamp_min(1e-30))
    out["grad-align"] = torch.cat(align)
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def audit(cfg, E: np.ndarray, split, arrays: dict, target_list, log=print) -> dict:
    """One local_update per target user from `arrays` under cfg's privacy settings; the
    AUC of every statistic: mean over users of the per-user AUC (the attacker ranks one
    user's candidates) and pooled over all (user, item) pairs."""
    k = cfg.fed.clients_per_round
    participation = min(1.0, k / split.n_users) if k else 1.0
    per_user = {s: [] for s in STATS}
    pooled = {s: ([], []) for s in STATS}
    eps, sigma = [], []
    for j, (u, members, non) in enumerate(target_list):
        new, _, metrics = local_update(cfg, E, ClientData.from_split(split, u), arrays, None,
                                       client_seed(cfg, u, 1),
                                       accountant=Accountant(cfg.privacy.accountant),
                                       participation=participation)
        eps.append(metrics.get(EPSILON_METRIC, float("inf")))
        sigma.append(metrics.get("noise-multiplier", 0.0))
        scores = attack_scores(cfg, E, arrays, new, np.concatenate([members, non]))
        for s, v in scores.items():
            per_user[s].append(roc_auc(v[:len(members)], v[len(members):]))
            pooled[s][0].append(v[:len(members)])
            pooled[s][1].append(v[len(members):])
        if (j + 1) % 50 == 0:
            log(f"  {j + 1}/{len(target_list)} users")
    auc = {s: float(np.nanmean(v)) for s, v in per_user.items()}
    best = max(auc, key=auc.get)
    return {"auc": auc,
            "auc_pooled": {s: roc_auc(np.concatenate(m), np.concatenate(n))
                           for s, (m, n) in pooled.items()},
            "best": {"statistic": best, "auc": auc[best]},
            "epsilon_spent": {"mean": float(np.mean(eps)), "max": float(np.max(eps))},
            "noise_multiplier_mean": float(np.mean(sigma)),
            "users": len(target_list),
            "members": int(sum(len(m) for _, m, _ in target_list)),
            "nonmembers": int(sum(len(n) for _, _, n in target_list))}


def run(cfg, *, model: str | None, users: int, epsilons: str, log=print) -> dict:
    """The audit at every ε of `epsilons` on `users` random targets, from the trained
    model in run directory `model` (cfg: its config) or a fresh one: a result file's
    body."""
    if users < 1:
        raise FedrecError(f"--users must be >= 1, got {users}")
    settings = privacy_settings(cfg, epsilons)
    p = prepare(cfg, progress=True)
    arrays = global_params(cfg, p.item_emb.shape[1], p.split.n_items, model)
    chosen = targets(p.split, users, cfg.train.seed)
    rows = []
    for eps, c in settings:
        log(f"audit: ε {eps:g} ({describe(c)['unit']}), {len(chosen)} users")
        r = audit(c, p.item_emb, p.split, arrays, chosen, log=log)
        if math.isinf(eps):  # no DP: no ε (JSON has no infinity)
            r["epsilon_spent"] = None
        rows.append({"epsilon": None if math.isinf(eps) else eps, "privacy": describe(c), **r})
    return {"method": "audit", "threat": "one update", "config": cfg.to_flat(),
            "params": model or f"fresh model (train.seed {cfg.train.seed})", "rows": rows}


def release_file(path: str, users: int) -> dict:
    """The audit of a one-release recommender (the result file of `fedrec baseline
    popularity --epsilon E --json FILE`, user unit): its release against the exact counts,
    by the informed and the reference attacker (fedrec.privacy.dp_popularity.release_audit)."""
    try:
        res = json.loads(Path(path).read_text())
        p, noisy = res["privacy"], np.asarray(res["release"]["noisy-counts"], float)
        cfg = Config.from_flat(stored_config(res["config"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedrecError(f"--model: '{path}' is not a release file of `fedrec baseline "
                          f"popularity --epsilon E --json FILE` ({type(exc).__name__}: {exc})") from None
    if p["unit"] != "user" or users < 1:
        raise FedrecError(f"--model: '{path}' is a {p['unit']} release, --users {users}: the "
                          "release audit takes a user-level release and --users >= 1")
    split = prepare(cfg).split
    a = release_audit(split, bounded_counts(split, p["bound"]), noisy, p["bound"], users)
    rows = []
    for eps, auc in ((None, a["auc-non-private"]), (p["epsilon"], a["auc"])):
        best = max(auc, key=auc.get)
        rows.append({"epsilon": eps, "auc": auc, "best": {"statistic": best, "auc": auc[best]},
                     "privacy": {"mode": "release", "unit": "user" if eps else "none",
                                 "accountant": p["accountant"], "delta": p["delta"]},
                     "epsilon_spent": eps and {"mean": p["epsilon-spent"],
                                               "max": p["epsilon-spent"]},
                     "noise_multiplier_mean": p["noise-multiplier"] if eps else 0.0,
                     "users": a["users"]})
    return {"method": "audit", "threat": "the release", "config": res["config"],
            "params": path, "rows": rows}


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) of the audit's console table."""
    stats = list(rows[0]["auc"])
    return (["ε", "unit", "ε spent", "σ", *stats, "best"],
            [["∞" if r["epsilon"] is None else f"{r['epsilon']:g}", r["privacy"]["unit"],
              "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']['max']:.2f}",
              f"{r['noise_multiplier_mean']:.3f}", *(f"{r['auc'][s]:.3f}" for s in stats),
              f"{r['best']['auc']:.3f} ({r['best']['statistic']})"] for r in rows])
