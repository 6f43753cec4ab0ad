"""What a device does in a federated round, independent of Flower.

A device holds one user's history (private), the public catalog embeddings, and its
user-local parameters. `local_update` trains the federated parameters from the global
ones and returns only those; `local_evaluate` scores the device's own held-out item.
The Flower handlers in clients/ are thin wrappers around these two functions.
"""

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedrec.config import Config, uses_text
from fedrec.data.protocol import Split
from fedrec.models.build import build_model, init_local_users, uses_local_user
from fedrec.models.seqrec import SeqRec, windows
from fedrec.models.train import (
    Histories,
    Proximal,
    make_optimizer,
    score_histories,
    seq_train_epoch,
    train_epoch,
    windows_per_step,
)
from fedrec.privacy import seq_dpsgd as seq_privacy
from fedrec.privacy.accounting import EPSILON_METRIC, Accountant, local_plan, noise_multiplier
from fedrec.privacy.dpsgd import dp_train_epoch, secret_randomness
from fedrec.ranking.metrics import rank_of_positive


@dataclass(frozen=True)
class ClientData:
    """One user's private data plus the public catalog facts a device may know."""

    history: np.ndarray          # int64 [L] training items, time order
    val: int                     # held-out items (-1 = none)
    test: int
    val_negatives: np.ndarray    # int64 [K] sampled-ranking candidates (-1 = padding)
    test_negatives: np.ndarray
    warm: np.ndarray             # bool [n_items]: released at training time (negatives, softmax)
    test_is_cold: bool

    @classmethod
    def from_split(cls, split: Split, u: int) -> "ClientData":
        test = int(split.test[u])
        # Cold items are not released yet: never a negative, never in a training softmax.
        return cls(split.history(u).copy(), int(split.val[u]), test, split.val_negatives[u],
                   split.test_negatives[u], split.released.copy(),
                   bool(test >= 0 and split.cold[test]))

    def eval_history(self, stage: str) -> np.ndarray:
        """The input when ranking for `stage` (the protocol's Split.eval_history)."""
        h = self.history
        return np.append(h, self.val) if stage == "test" and self.val >= 0 else h

    @property
    def n_items(self) -> int:
        return len(self.warm)


def _histories(data: ClientData) -> Histories:
    h = torch.from_numpy(data.history.astype(np.int64))
    return Histories(h, torch.zeros(len(h), dtype=torch.long), 1)


def sample_client_negatives(data: ClientData, rows: int, k: int, rng: np.random.Generator):
    """[rows, k] warm items outside the device's own training items (leak-free)."""
    allowed = data.warm.copy()
    allowed[data.history] = False
    pool = np.flatnonzero(allowed)
    return pool[rng.integers(0, len(pool), size=(rows, k))]


def _model_and_local(cfg: Config, E: torch.Tensor, data: ClientData, arrays: dict,
                     local_state: dict | None, seed: int):
    model = build_model(cfg, E.shape[1], data.n_items)
    load_arrays(model, arrays)
    local = None
    if uses_local_user(cfg):
        if local_state and "user" in local_state:
            local = torch.as_tensor(local_state["user"], dtype=torch.float32).reshape(1, -1).clone()
        else:
            g = torch.Generator().manual_seed(seed)
            local = init_local_users(1, cfg.model.dim, cfg.model.kind, g, cfg.model.pooling)
        local.requires_grad_(True)
    return model, local


def load_arrays(model: torch.nn.Module, arrays: dict) -> None:
    """Copy the global arrays into the model's tensors in place (as load_state_dict with
    strict keys, without its per-module recursion: ~1 ms of each client update)."""
    state = model.state_dict()
    if state.keys() != arrays.keys():
        missing, extra = sorted(state.keys() - arrays.keys()), sorted(arrays.keys() - state.keys())
        raise ValueError(f"arrays do not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for k, t in state.items():
            a = torch.as_tensor(arrays[k])
            if a.shape != t.shape:
                raise ValueError(f"array {k}: shape {tuple(a.shape)}, the model's is {tuple(t.shape)}")
            t.copy_(a)


def sample_catalog_negatives(data: ClientData, positives: np.ndarray, k: int,
                             rng: np.random.Generator) -> np.ndarray:
    """[rows, k] warm items other than each row's own positive: under DP a row's negatives
    must not depend on the rest of the history (fedrec/privacy/dpsgd.py)."""
    pool = np.flatnonzero(data.warm)
    out = pool[rng.integers(0, len(pool), size=(len(positives), k))]
    clash = out == positives[:, None]
    while clash.any():
        out[clash] = pool[rng.integers(0, len(pool), size=int(clash.sum()))]
        clash = out == positives[:, None]
    return out


def local_update(cfg: Config, E: np.ndarray, data: ClientData, arrays: dict,
                 local_state: dict | None, seed: int, proximal_mu: float = 0.0, *,
                 accountant: Accountant | None = None, participation: float = 1.0):
    """Train from the global federated parameters; return (new federated params,
    new local state, metrics). Only the federated parameters are meant to leave.

    privacy.mode = "sample": DP-SGD (fedrec/privacy/dpsgd.py); `accountant` (this device's,
    restored from context.state) is stepped in place and metrics carry its cumulative
    "epsilon"; participation = expected fraction of rounds this device joins (to solve
    sigma for privacy.target-epsilon). Metrics then hold no data-dependent values but ε."""
    t0 = time.perf_counter()
    E_t = torch.from_numpy(E)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, local = _model_and_local(cfg, E_t, data, arrays, local_state, seed)
    hist = _histories(data)
    opt = make_optimizer(model, local, cfg)
    proximal = Proximal(model.parameters(), proximal_mu) if proximal_mu > 0 else None
    if isinstance(model, SeqRec) and cfg.privacy.mode == "sample":
        return _seq_dp_update(cfg, model, opt, E_t, data, accountant, participation)
    if isinstance(model, SeqRec):
        rows = windows(data.history, model.max_len)
        allowed = torch.from_numpy(data.warm)
        per_step = windows_per_step(cfg.train.batch_size, model.max_len)
        losses = [seq_train_epoch(model, opt, E_t, rows, allowed, per_step, rng, proximal)
                  for _ in range(cfg.train.local_epochs)]
    elif cfg.privacy.mode == "sample":
        if accountant is None:
            raise ValueError("privacy.mode = 'sample' needs the device's accountant")
        if proximal is not None:
            raise ValueError("privacy.mode = 'sample' does not support FedProx's proximal term")
        sigma = noise_multiplier(cfg, len(data.history), participation)
        check_device_budget(cfg, accountant, sigma, len(data.history), participation)
        sampling, noise = secret_randomness()  # not from seeds the server knows
        cache = {}  # what DP-SGD computes once per history (fedrec/privacy/pooled_norms.py)
        for _ in range(cfg.train.local_epochs):
            q, steps = dp_train_epoch(
                model, local, opt, E_t, hist, cfg, sampling,
                lambda n: sample_catalog_negatives(data, data.history, cfg.train.negatives, rng),
                sigma, cfg.privacy.max_grad_norm, noise, cache)
            accountant.step(sigma, q, steps)
        new_local = {} if local is None else {"user": local.detach().reshape(-1).numpy().copy()}
        params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        # num-examples 1: the true count would itself reveal whether one interaction is there
        return params, new_local, {"num-examples": 1, "noise-multiplier": sigma,
                                   EPSILON_METRIC: accountant.epsilon(cfg.privacy.delta)}
    else:
        losses = [train_epoch(model, local, opt, E_t, hist, cfg, rng,
                              lambda segs: sample_client_negatives(data, len(segs),
                                                                   cfg.train.negatives, rng),
                              proximal)
                  for _ in range(cfg.train.local_epochs)]
    new_local = {} if local is None else {"user": local.detach().reshape(-1).numpy().copy()}
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return params, new_local, {"train-loss": float(losses[-1]), "num-examples": len(data.history),
                               "update-seconds": time.perf_counter() - t0}


def _seq_dp_update(cfg: Config, model, opt, E_t: torch.Tensor, data: ClientData,
                   accountant: Accountant | None, participation: float):
    """DP-SGD on the seq model over the device's disjoint blocks (fedrec/privacy/seq_dpsgd.py)."""
    if accountant is None:
        raise ValueError("privacy.mode = 'sample' needs the device's accountant")
    rows = seq_privacy.blocks(data.history, model.max_len)
    n = len(rows)
    sigma = noise_multiplier(cfg, n, participation)
    if n:
        check_device_budget(cfg, accountant, sigma, n, participation)
        q = local_plan(cfg, n, participation)[0]
        sampling, noise = secret_randomness()  # not from seeds the server knows
        for _ in range(cfg.train.local_epochs):
            accountant.step(sigma, *seq_privacy.dp_train_epoch(
                model, opt, E_t, rows, torch.from_numpy(data.warm), q, sigma,
                cfg.privacy.max_grad_norm, sampling, noise))
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return params, {}, {"num-examples": 1, "noise-multiplier": sigma,
                        EPSILON_METRIC: accountant.epsilon(cfg.privacy.delta)}


class DeviceBudgetExhausted(RuntimeError):
    """This device's next round would take its ε past privacy.target-epsilon."""


def check_device_budget(cfg: Config, accountant: Accountant, sigma: float, n: int,
                        participation: float) -> None:
    """Refuse a round that would bring this device's cumulative ε above the target.

    sigma is solved for the *expected* participation; a device sampled more often than
    that would otherwise overspend. It declines instead (its reply is an error the server
    drops and counts), so every device's ε stays <= privacy.target-epsilon."""
    target = cfg.privacy.target_epsilon
    if target <= 0:
        return
    q, per_round, _ = local_plan(cfg, n, participation)
    ahead = Accountant.from_state(accountant.to_state(), cfg.privacy.accountant)
    ahead.step(sigma, q, per_round)
    eps = ahead.epsilon(cfg.privacy.delta)
    if eps > target:
        raise DeviceBudgetExhausted(
            f"privacy budget exhausted on this device: this round would bring ε to {eps:.3f} "
            f"> privacy.target-epsilon {target:g} (spent {accountant.epsilon(cfg.privacy.delta):.3f}); "
            "it declines to train")


def local_evaluate(cfg: Config, E: np.ndarray, data: ClientData, arrays: dict,
                   local_state: dict | None, seed: int, k: int = 10) -> dict[str, float]:
    """The device ranks its own held-out items (val and test): sampled and full ranking.

    Returns per-user hits/gains; the server averages them over devices (num-examples = 1).
    """
    E_t = torch.from_numpy(E)
    model, local = _model_and_local(cfg, E_t, data, arrays, local_state, seed)
    if local is not None:
        local = local.detach()
    keys = [f"{p}{n}/{m}@{k}" for p in ("", "val/") for n in ("sampled", "full")
            for m in ("hr", "ndcg")] + [f"{g}/{m}" for g in ("cold", "warm")
                                        for m in ("users", f"hr@{k}", f"ndcg@{k}")]
    if data.test < 0 or data.val < 0 or len(data.history) == 0:
        return {"num-examples": 0, **dict.fromkeys(keys, 0.0)}  # same keys in every reply
    out: dict[str, float] = {"num-examples": 1}
    inputs = [data.eval_history("val"), data.eval_history("test")]
    both = score_histories(model, E_t, inputs, None if local is None else local.expand(2, -1))
    stages = (("val", data.val, data.val_negatives), ("test", data.test, data.test_negatives))
    for (stage, target, negs), seen, scores in zip(stages, inputs, both):
        pos = scores[[target]]
        samp = np.where(negs >= 0, scores[np.maximum(negs, 0)], -np.inf)[None]
        full = scores.copy()
        full[seen] = -np.inf
        full[target] = -np.inf
        prefix = "" if stage == "test" else "val/"
        for name, cand in (("sampled", samp), ("full", full[None])):
            r = int(rank_of_positive(pos, cand)[0])
            out[f"{prefix}{name}/hr@{k}"] = float(r < k)
            out[f"{prefix}{name}/ndcg@{k}"] = float(1.0 / np.log2(r + 2.0)) if r < k else 0.0
    cold = float(data.test_is_cold)
    out["cold/users"], out["warm/users"] = cold, 1.0 - cold
    for group, flag in (("cold", cold), ("warm", 1.0 - cold)):
        out[f"{group}/hr@{k}"] = flag * out[f"sampled/hr@{k}"]
        out[f"{group}/ndcg@{k}"] = flag * out[f"sampled/ndcg@{k}"]
    return out


def aggregate_client_metrics(records: list[dict[str, float]], k: int = 10) -> dict[str, float]:
    """Mean over evaluated devices; cold/warm metrics are means over their own groups."""
    records = [r for r in records if r.get("num-examples", 0) > 0]
    if not records:
        return {}
    keys = [key for key in records[0] if key != "num-examples"]
    sums = {key: float(sum(r[key] for r in records)) for key in keys}
    n = len(records)
    out = {key: v / n for key, v in sums.items() if not key.startswith(("cold/", "warm/"))}
    for group in ("cold", "warm"):
        users = sums.get(f"{group}/users", 0.0)
        for m in (f"hr@{k}", f"ndcg@{k}"):
            out[f"{group}/{m}"] = sums[f"{group}/{m}"] / users if users else float("nan")
        out[f"{group}/users"] = users
    out["users"] = float(n)
    return out


@lru_cache(maxsize=2)
def _population(flat: tuple) -> tuple[Config, Split, np.ndarray]:
    """Catalog embeddings and the protocol split, loaded once per process (Ray actor)."""
    from fedrec.data.pipeline import prepare

    # One thread per client process: the simulation runs one actor per core, and torch's
    # default thread pool oversubscribes the cores (measured ~40x slower client updates).
    torch.set_num_threads(1)
    cfg = Config.from_flat(dict(flat))
    p = prepare(cfg, with_text=uses_text(cfg))
    return cfg, p.split, p.item_emb


def load_simulated_client(run_config: dict, partition_id: int):
    """(config, catalog embeddings, ClientData) for virtual SuperNode `partition_id`
    (= user index: one virtual client per user)."""
    cfg, split, E = _population(tuple(sorted(run_config.items())))
    if not 0 <= partition_id < split.n_users:
        raise ValueError(f"partition-id {partition_id} outside 0..{split.n_users - 1}; "
                         "run with num-supernodes equal to the number of users")
    return cfg, E, ClientData.from_split(split, partition_id)


def client_seed(cfg: Config, user: int, server_round: int) -> int:
    return int(np.random.SeedSequence([cfg.train.seed, user, server_round]).generate_state(1)[0])
