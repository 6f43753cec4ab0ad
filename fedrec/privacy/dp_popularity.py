"""DP popularity, the private reference point, and the private recommender built on the
same release (docs/privacy.md, "The frontier").

One release: every contributor (a user, or a block of a user's history: `unit`) adds its
`bound` most recent distinct training items to an item histogram, so one contributor
moves it by at most sqrt(bound) in L2, and Gaussian noise of std sqrt(bound) *
gaussian_sigma(ε', δ) makes the release (ε', δ)-DP exactly (ε' <= the budget ε: see
`dp_popularity`). Everything after it is post-processing:

- "dp-popularity": released items ranked by noisy count (the baseline);
- "dp-prior+device-text": each device re-ranks the same release with what never leaves it,
  log(max(noisy count, 1)) + weight * cosine(its last `last` items' mean PLM vector, item
  vector) over the public catalog's frozen vectors: a personalised private recommender
  at the same ε.
"""

from functools import cache

import numpy as np

from fedrec.config import Config
from fedrec.data.evaluate import evaluate, roc_auc
from fedrec.data.pipeline import catalog_vectors, list_spaces, prepare
from fedrec.data.protocol import Split
from fedrec.errors import FedrecError
from fedrec.privacy.exact import gaussian_sigma
from fedrec.results import summarize

DP_BOUNDS = (1, 2, 5, 10, 20, 50, 100)
SPEND = (1.0, 0.5, 0.25, 0.125)  # shares of the budget ε a release may spend
UNITS = ("user", "block")
DEVICE_TEXT = {"weight": (0.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0), "last": (3, 5, 10)}


def contributors(split: Split, unit: str, block: int) -> list[np.ndarray]:
    """Each contributor's distinct training items, most recent first: one per user
    (unit "user"), or one per block of `block` consecutive positions of a history, cut as
    sample-level DP-SGD cuts it (unit "block", fedrec.privacy.dpsgd)."""
    if unit not in UNITS:
        raise FedrecError(f"--unit: 'user' or 'block', got '{unit}'")
    out = []
    for u in range(split.n_users):
        h = split.history(u)
        parts = [h] if unit == "user" else [h[k:k + block] for k in range(0, len(h), block)]
        for part in parts:
            rev = part[::-1]
            _, first = np.unique(rev, return_index=True)
            out.append(rev[np.sort(first)])
    return out


def bounded_counts(split: Split, bound: int, unit: str = "user", block: int = 51
                   ) -> np.ndarray:
    """float64 [n_items]: how many contributors hold each item among their `bound` most
    recent distinct items; one contributor changes it by at most sqrt(bound) in L2."""
    return _bounded_counts(contributors(split, unit, block), split.n_items, bound)


def _bounded_counts(parts: list[np.ndarray], n_items: int, bound: int) -> np.ndarray:
    counts = np.zeros(n_items)
    for items in parts:
        counts[items[:bound]] += 1.0
    return counts


def text_affinity(E: np.ndarray, inputs: list[np.ndarray], last: int) -> np.ndarray:
    """[len(inputs), n_items]: cosine of every item's (unit) text vector with the mean text
    vector of each input's last `last` items: what a device computes from its own history
    and the public catalog alone."""
    return np.stack([E[h[-last:]].mean(0) for h in inputs]) @ E.T


def release_audit(split: Split, counts: np.ndarray, noisy: np.ndarray, bound: int,
                  users: int = 200, seed: int = 0, parts: list[np.ndarray] | None = None
                  ) -> dict:
    """Membership inference on the release (user unit): for random target users, the AUC
    of telling their contributed items from as many released items they did not
    contribute, mean over users (0.5 = nothing learned), by two attackers:
    - informed: knows every other user's data (DP's worst case): released - others' count;
    - reference: knows a disjoint random half of the other users, scaled to the rest.
    The same statistics on the exact counts are the non-private column. parts: the users'
    contributors(split, "user"), when the caller has them."""
    rng = np.random.default_rng(seed)
    parts = contributors(split, "user", 0) if parts is None else parts
    released = np.flatnonzero(split.released)
    targets = rng.choice(split.n_users, min(users, split.n_users), replace=False)
    out = {k: {"informed": [], "reference": []} for k in ("private", "exact")}
    for u in targets:
        members = parts[u][:bound]
        own = np.zeros(split.n_items)
        own[members] = 1.0
        pool = np.setdiff1d(released, members)
        non = rng.choice(pool, min(len(members), len(pool)), replace=False)
        others = np.setdiff1d(np.arange(split.n_users), [u])
        ref = rng.choice(others, len(others) // 2, replace=False)
        ref_counts = _bounded_counts([parts[v] for v in ref], split.n_items, bound)
        ref_est = ref_counts * (len(others) / len(ref))
        for kind, release in (("private", noisy), ("exact", counts)):
            for name, stat in (("informed", release - (counts - own)),
                               ("reference", release - ref_est)):
                out[kind][name].append(roc_auc(stat[members], stat[non]))
    auc = {k: {n: float(np.mean(v)) for n, v in d.items()} for k, d in out.items()}
    return {"users": len(targets), "auc": auc["private"], "auc-non-private": auc["exact"],
            "best": max(auc["private"].values()),
            "best-non-private": max(auc["exact"].values())}


def dp_popularity(cfg: Config, epsilon: float, delta: float, bounds=DP_BOUNDS,
                  draws: int = 5, split_seeds: list[int] | None = None,
                  device_text: bool = False, unit: str = "user") -> dict:
    """DP popularity at budget ε (one release per noise draw; the rows are each draw's
    test metrics). The bound and the share of ε spent (SPEND: a release at ε' <= ε is
    also ε-DP, and less noise is not always better for the list once the bound can
    change) are chosen on validation full HR@10 (mean over the draws), a choice that
    reads the users' validation items and is not itself accounted; the same rule for the
    baseline and the recommender, whose weight and last (DEVICE_TEXT) are then chosen at
    that release."""
    if draws < 1 or len(split_seeds or [0]) != 1:
        raise FedrecError("--epsilon: one split seed (--split-seeds) and --draws >= 1 noise "
                          "draws")
    gaussian_sigma(epsilon, delta)  # a bad --epsilon / --delta: one clear error, first
    if split_seeds:
        cfg = cfg.override(**{"data.split-seed": split_seeds[0]})
    p = prepare(cfg)
    split, spaces = p.split, list_spaces(cfg, p)
    block = cfg.model.max_len + 1
    parts = contributors(split, unit, block)
    bounds = [b for b in bounds if unit == "user" or b <= block]  # a block holds <= block
    released = split.released
    counts = {b: _bounded_counts(parts, split.n_items, b) for b in bounds}
    sigmas = {f: gaussian_sigma(epsilon * f, delta) for f in SPEND}

    @cache  # each draw's release once: the grids below read it many times
    def noisy(bound: int, spend: float, draw: int) -> np.ndarray:
        rng = np.random.default_rng([draw, bound, int(spend * 1000)])
        return counts[bound] + rng.normal(0.0, sigmas[spend] * np.sqrt(bound), split.n_items)

    def ranked(q):  # unreleased: public catalog fact, never shown
        q = np.where(released, q, -np.inf)
        return lambda u, _: np.tile(q, (len(u), 1))

    def mean_val(make) -> float:
        return float(np.mean([evaluate(make(d), split, "val")["full/hr@10"]
                              for d in range(draws)]))
    E = None
    if device_text:
        E = catalog_vectors(cfg, p).astype(np.float64)
        E /= np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)

    affinity: dict = {}  # (last, the inputs' tails) -> text_affinity: one per chunk, not per grid point

    def device_affinity(inputs, last: int) -> np.ndarray:
        tails = [np.asarray(h[-last:]) for h in inputs]
        key = (last, tuple(map(len, tails)), np.concatenate(tails).tobytes())
        if key not in affinity:
            affinity[key] = text_affinity(E, inputs, last)
        return affinity[key]

    def on_device(q, weight: float, last: int):
        log = np.where(released, np.log(np.maximum(q, 1.0)), -np.inf)
        return lambda u, inputs: log[None] + weight * device_affinity(inputs, last)
    base_text = (12.0, 5)  # stage one: the release chosen under one middle text setting
    make_for = ((lambda b, f: lambda d: on_device(noisy(b, f, d), *base_text)) if device_text
                else (lambda b, f: lambda d: ranked(noisy(b, f, d))))
    val = {(b, f): mean_val(make_for(b, f)) for b in bounds for f in SPEND}
    bound, spend = max(val, key=lambda k: (val[k], -k[1], -k[0]))  # ties: less ε, bound
    make, method, extra = make_for(bound, spend), "dp-popularity", {}
    if device_text:
        grid = {(w, n): mean_val(lambda d, w=w, n=n: on_device(noisy(bound, spend, d), w, n))
                for w in DEVICE_TEXT["weight"] for n in DEVICE_TEXT["last"]}
        weight, last = max(grid, key=lambda k: (grid[k], -k[0], k[1]))
        make = lambda d: on_device(noisy(bound, spend, d), weight, last)
        method = "dp-prior+device-text"
        extra = {"device-text": {"weight": weight, "last": last,
                                 "selection": {f"{w:g},{n}": v for (w, n), v in grid.items()}}}
    if unit == "user":
        extra["audit"] = release_audit(split, counts[bound], noisy(bound, spend, 0), bound,
                                       parts=parts)
    runs = [{"seed": d, "test": evaluate(make(d), split, spaces=spaces)} for d in range(draws)]
    summary = summarize([r["test"] for r in runs])
    unit_name = "user" if unit == "user" else f"block of up to {block} consecutive interactions"
    return {"method": method, "config": cfg.to_flat(), "seed_kind": "noise draw",
            "privacy": {"unit": unit_name, "epsilon": epsilon, "delta": delta,
                        "epsilon-spent": epsilon * spend,
                        "accountant": "analytic Gaussian (exact for one release)",
                        "noise-multiplier": sigmas[spend], "bound": bound,
                        "noise-std": sigmas[spend] * np.sqrt(bound),
                        "selection": {f"{b},{f:g}": v for (b, f), v in val.items()},
                        **extra},
            # draw 0's release: what model.kind = "profile" starts from (model.prior)
            "release": {"draw": 0, "noisy-counts": noisy(bound, spend, 0).tolist()},
            "runs": runs, "summary": {"best": summary, "final": summary}}
