"""What a device does in a federated round, independent of Flower.

A device holds one user's history (private), the public catalog embeddings, and its
user-local parameters. `local_update` trains the federated parameters from the global
ones and returns only those; `local_evaluate` scores the device's own held-out item.
The Flower handlers in clients/ are thin wrappers around these two functions.
"""

import time

import numpy as np
import torch

from fedrec.config import Config
from fedrec.data.evaluate import candidates, rank_of_positive, top_k
from fedrec.data.protocol import ClientData
from fedrec.models.build import build_model
from fedrec.models.protocol import Recommender, batch_inputs, blocks, windows
from fedrec.models.train import (
    Proximal,
    make_optimizer,
    stride_of,
    train_epoch,
    windows_per_step,
)
from fedrec.privacy.accounting import EPSILON_METRIC, Accountant, local_plan, noise_multiplier
from fedrec.privacy.dpsgd import dp_epoch, secret_randomness


def _model_and_user(cfg: Config, E: torch.Tensor, data: ClientData, arrays: dict,
                    local_state: dict | None, seed: int
                    ) -> tuple[Recommender, torch.Tensor | None]:
    """The global model, and this device's user-local vector [user_dim] (kept, or new
    with a seed of its own; None for a model without one)."""
    model = build_model(cfg, E.shape[1], data.n_items, data.warm)
    load_arrays(model, arrays)
    if not model.user_dim:
        return model, None
    if local_state and "user" in local_state:
        user = torch.as_tensor(local_state["user"], dtype=torch.float32).reshape(-1).clone()
    else:
        user = model.new_users(1, torch.Generator().manual_seed(seed))[0]
    return model, user.requires_grad_(True)


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


def local_update(cfg: Config, E: np.ndarray, data: ClientData, arrays: dict,
                 local_state: dict | None, seed: int, proximal_mu: float = 0.0, *,
                 accountant: Accountant | None = None, participation: float = 1.0):
    """Train from the global federated parameters; return (new federated params,
    new local state, metrics). Only the federated parameters are meant to leave.

    privacy.mode = "sample": DP-SGD over the device's blocks (fedrec/privacy/dpsgd.py);
    `accountant` (this device's, restored from context.state) is stepped in place and
    metrics carry its cumulative "epsilon"; participation = expected fraction of rounds
    this device joins (to solve sigma for privacy.target-epsilon). Metrics then hold no
    data-dependent values but ε."""
    t0 = time.perf_counter()
    E_t = torch.from_numpy(E)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, user = _model_and_user(cfg, E_t, data, arrays, local_state, seed)
    opt = make_optimizer(cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, model, user)
    allowed = torch.from_numpy(data.warm)
    if cfg.privacy.mode == "sample":
        if accountant is None:
            raise ValueError("privacy.mode = 'sample' needs the device's accountant")
        rows = blocks(data.history, model.max_len)
        n = len(rows)
        sigma = noise_multiplier(cfg, n, participation)
        if n:
            check_device_budget(cfg, accountant, sigma, n, participation)
            q = local_plan(cfg, n, participation)[0]
            sampling, noise = secret_randomness()  # not from seeds the server knows
            for _ in range(cfg.train.local_epochs):
                accountant.step(sigma, *dp_epoch(model, opt, E_t, rows, allowed, q, sigma,
                                                 cfg.privacy.max_grad_norm, sampling, noise,
                                                 user))
        # num-examples 1: the true count would itself reveal whether one interaction is there
        metrics = {"num-examples": 1, "noise-multiplier": sigma,
                   EPSILON_METRIC: accountant.epsilon(cfg.privacy.delta)}
    else:
        stride = stride_of(cfg)
        rows = windows(data.history, model.max_len, stride)
        proximal = Proximal(model.parameters(), proximal_mu) if proximal_mu > 0 else None
        per_step = windows_per_step(cfg.train.batch_size, stride)
        users = None if user is None else user[None]
        owner = np.zeros(len(rows), np.int64)
        losses = [train_epoch(model, opt, E_t, rows, allowed, per_step, rng, users, owner,
                              proximal, first=model.max_len - stride)
                  for _ in range(cfg.train.local_epochs)]
        metrics = {"train-loss": float(losses[-1]), "num-examples": len(data.history),
                   "update-seconds": time.perf_counter() - t0}
    new_local = {} if user is None else {"user": user.detach().numpy().copy()}
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return params, new_local, metrics


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
    """The device ranks its own held-out items (val and test) as the protocol does on the
    server (fedrec.data.evaluate): sampled and full ranking, and for a cold test item its
    rank among the unreleased items. Returns this user's hits and gains with group flags;
    the server averages them (aggregate_client_metrics, num-examples = 1)."""
    E_t = torch.from_numpy(E)
    model, user = _model_and_user(cfg, E_t, data, arrays, local_state, seed)
    ranked = ("sampled", "full")
    keys = ([f"{p}{n}/{m}@{k}" for p in ("", "val/") for n in ranked for m in ("hr", "ndcg")]
            + [f"{n}/{g}/{m}@{k}" for n in ranked for g in GROUPS for m in ("hr", "ndcg")]
            + [f"new-items/{m}@{k}" for m in ("hr", "ndcg")]
            + [f"{g}/users" for g in GROUPS] + [f"top{k}/unreleased-share"])
    if data.test < 0 or data.val < 0 or len(data.history) == 0:
        return {"num-examples": 0, **dict.fromkeys(keys, 0.0)}  # same keys in every reply
    out: dict[str, float] = {"num-examples": 1}
    inputs = [data.eval_history("val"), data.eval_history("test")]
    with torch.no_grad():
        both = model.eval().score_all(E_t, batch_inputs(inputs, model.max_len),
                                      None if user is None else user.detach().expand(2, -1))
    both = both.numpy().astype(np.float64)
    unreleased = ~data.warm
    stages = (("val", data.val, data.val_negatives), ("test", data.test, data.test_negatives))
    for (stage, target, negs), seen, scores in zip(stages, inputs, both):
        full = scores.copy()[None]
        full[0, seen] = -np.inf
        if stage == "test":
            out[f"top{k}/unreleased-share"] = float(unreleased[top_k(full, k)].mean())
        pos, cands = candidates(scores[None], full, np.array([target]), negs[None], unreleased)
        prefix = "" if stage == "test" else "val/"
        for name in (*ranked, "new-items"):
            r = int(rank_of_positive(pos, cands[name])[0])
            hit, gain = float(r < k), float(1.0 / np.log2(r + 2.0)) if r < k else 0.0
            if name in ranked:
                out[f"{prefix}{name}/hr@{k}"], out[f"{prefix}{name}/ndcg@{k}"] = hit, gain
            if stage == "test":
                flags = {"cold": float(data.test_is_cold), "warm": 1.0 - data.test_is_cold}
                for group, flag in flags.items():
                    out[f"{group}/users"] = flag
                    if name in ranked:
                        out[f"{name}/{group}/hr@{k}"] = flag * hit
                        out[f"{name}/{group}/ndcg@{k}"] = flag * gain
                if name == "new-items":
                    out[f"new-items/hr@{k}"] = flags["cold"] * hit
                    out[f"new-items/ndcg@{k}"] = flags["cold"] * gain
    return out


GROUPS = ("cold", "warm")


def aggregate_client_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean over evaluated devices; a group's metrics (".../cold/...", ".../warm/...",
    new-items: cold) are means over that group's devices (NaN for an empty group)."""
    records = [r for r in records if r.get("num-examples", 0) > 0]
    if not records:
        return {}
    keys = [key for key in records[0] if key != "num-examples"]
    sums = {key: float(sum(r[key] for r in records)) for key in keys}
    out = {}
    for key, total in sums.items():
        group = next((g for g in GROUPS if f"/{g}/" in key), "cold" if key.startswith(
            "new-items/") else None)
        if key.endswith("/users") or group is None:
            out[key] = total if key.endswith("/users") else total / len(records)
        else:
            users = sums[f"{group}/users"]
            out[key] = total / users if users else float("nan")
    out["users"] = float(len(records))
    return out


def client_seed(cfg: Config, user: int, server_round: int) -> int:
    return int(np.random.SeedSequence([cfg.train.seed, user, server_round]).generate_state(1)[0])
