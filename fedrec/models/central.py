"""The centralized reference: the same model trained on all users' data (the accuracy
ceiling of federated training), selected on validation."""

import copy
import time

import numpy as np
import torch

from fedrec.config import Config
from fedrec.data.evaluate import evaluate
from fedrec.data.protocol import Split
from fedrec.models.build import build_model
from fedrec.models.protocol import stack_rows
from fedrec.models.train import (
    make_optimizer,
    scorer,
    stride_of,
    train_epoch,
    windows_per_step,
)
from fedrec.models.warm_start import warm_start
from fedrec.results import CURVE_KEYS, SELECT


def central_config(cfg: Config) -> Config:
    """cfg as the centralized model uses it: its own new-item offset (central.new-item-bias)
    in place of the federated model's, since the two train to different score scales."""
    return cfg.override(**{"model.new-item-bias": cfg.central.new_item_bias})


def train_central(cfg: Config, split: Split, E: np.ndarray, log=print,
                  spaces: dict | None = None,
                  item_fields: list[dict[str, str]] | None = None) -> dict:
    """Train cfg's model on every user's history with its own optimizer and learning rate
    (central.*: a change of the device's train.optimizer never changes the reference), and
    its own new-item offset (central_config).
    Model selection by validation full HR@10 only (results.SELECT); returns test metrics
    at the best-validation epoch and at the final epoch, the per-epoch curve, and the
    best model with its user-local vectors ("model", "users") and the config it trained
    with ("config"). spaces: what list
    diversity is measured in (fedrec.data.pipeline.list_spaces; None: none). item_fields: the public
    catalog's fields, for model.public-warm-start (fedrec.models.warm_start)."""
    cfg = central_config(cfg)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    E_t = torch.from_numpy(E)
    model = build_model(cfg, E.shape[1], split.n_items, split.released)
    if cfg.model.public_warm_start:
        warm_start(model, cfg, E, item_fields, split.released, log)
    users = model.new_users(split.n_users).requires_grad_() if model.user_dim else None
    c = cfg.central
    opt = make_optimizer(c.optimizer, c.lr, cfg.train.weight_decay, model, users)
    stride = stride_of(cfg)
    rows, owner = stack_rows([split.history(u) for u in range(split.n_users)], model.max_len,
                             stride)
    allowed = torch.from_numpy(split.released)
    per_step, first = windows_per_step(c.batch_size, stride), model.max_len - stride
    score = scorer(model, E_t, None if users is None else users.detach())
    best, best_state, curve, bad = -1.0, None, [], 0
    for epoch in range(1, c.epochs + 1):
        t0 = time.time()
        loss = train_epoch(model, opt, E_t, rows, allowed, per_step, rng, users, owner,
                           first=first)
        val = evaluate(score, split, "val", spaces=spaces)
        curve.append({"epoch": epoch, "loss": loss, **{f"val/{k}": val[k] for k in CURVE_KEYS},
                      "seconds": time.time() - t0})
        log(f"epoch {epoch:3d}  loss {loss:.4f}  val sampled HR@10 {val['sampled/hr@10']:.4f}  "
            f"full HR@10 {val['full/hr@10']:.4f}  ({time.time() - t0:.1f}s)")
        if best_state is None or val[SELECT] > best:  # NaN: no val users, keep last
            best, bad = val[SELECT], 0
            best_state = (epoch, copy.deepcopy(model.state_dict()),
                          None if users is None else users.detach().clone())
        else:
            bad += 1
            if bad >= c.patience:
                log(f"early stop: no better val HR@10 for {bad} epochs")
                break
    final = evaluate(score, split, "test", spaces=spaces)
    best_epoch, state, best_users = best_state
    model.load_state_dict(state)
    if users is not None:
        users.data.copy_(best_users)
    return {"final": final, "best": evaluate(score, split, "test", spaces=spaces), "config": cfg,
            "best_epoch": best_epoch, "epochs_run": len(curve), "curve": curve,
            "model": model.eval(), "users": None if users is None else users.detach()}
