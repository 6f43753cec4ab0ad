"""Training: one epoch of (positive + sampled negatives) rows, used both by a device
(one user, one segment) and by the centralized reference (all users, one segment each).

No PLM runs here: item text embeddings E arrive precomputed and frozen.
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.config import Config
from fedrec.model import build_model, init_local_users, pool_history, uses_local_user
from fedrec.protocol import Split, evaluate, sample_negatives


@dataclass
class Histories:
    """Users' training histories as flat (item, segment) pairs, as tensors."""

    items: torch.Tensor  # [P]
    seg: torch.Tensor    # [P]
    n_seg: int

    @classmethod
    def from_split(cls, split: Split) -> "Histories":
        return cls(torch.from_numpy(split.train_items), torch.from_numpy(split.train_users),
                   split.n_users)


def row_scores(model, E: torch.Tensor, hist: Histories, local: torch.Tensor | None,
               seg: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores [B, C] of candidate items [B, C] for rows of segments seg [B].

    Column 0 holds the positive, which is left out of that row's history pool. Only the
    items these rows touch go through the adapters (a device never needs the catalog).
    """
    needed = torch.cat([hist.items, items.flatten()]) if model.uses_history else items.flatten()
    idx, inverse = torch.unique(needed, return_inverse=True)
    h, b, a = model.items(E[idx], idx)
    n_hist = len(hist.items) if model.uses_history else 0
    local_items = inverse[n_hist:].view_as(items)
    pooled = None
    if model.uses_history:
        pooled = pool_history(h, a, inverse[:n_hist], hist.seg, hist.n_seg, seg,
                              exclude=local_items[:, 0])
    hu = model.users(pooled, local[seg] if local is not None else None)
    return torch.einsum("bd,bcd->bc", hu, h[local_items]) + b[local_items]


def _bpr_terms(scores: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(scores[:, :1] - scores[:, 1:])


def _labels(scores: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return labels


def row_losses(scores: torch.Tensor, loss: str) -> torch.Tensor:
    """scores [B, 1 + K], positive first -> [B]: each row's loss (the mean over its
    columns), as DP-SGD clips them."""
    if loss == "bpr":
        return _bpr_terms(scores).mean(1)
    return F.binary_cross_entropy_with_logits(scores, _labels(scores), reduction="none").mean(1)


def row_loss(scores: torch.Tensor, loss: str) -> torch.Tensor:
    """scores [B, 1 + K], positive first -> mean loss (the mean of row_losses). BCE keeps
    PyTorch's fused mean reduction: its gradient differs from mean-of-rows in the last bit,
    and plain training stays bit-reproducible with earlier runs."""
    if loss == "bpr":
        return _bpr_terms(scores).mean()
    return F.binary_cross_entropy_with_logits(scores, _labels(scores))


def train_epoch(model, local, opt, E, hist: Histories, cfg: Config, rng: np.random.Generator,
                negatives: Callable[[np.ndarray], np.ndarray],
                penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One pass over every training interaction in `hist`; returns the mean loss.

    negatives(segments [B]) -> [B, K] sampled negative items for those rows; penalty() is an
    extra loss term (FedProx's proximal term).
    """
    model.train()
    seg_of_pos = hist.seg.numpy()
    pos_items = hist.items.numpy()
    negs = negatives(seg_of_pos)
    order = rng.permutation(len(pos_items))
    total, n = 0.0, 0
    for start in range(0, len(order), cfg.train.batch_size):
        rows = order[start:start + cfg.train.batch_size]
        cand = torch.from_numpy(np.concatenate([pos_items[rows, None], negs[rows]], axis=1))
        scores = row_scores(model, E, hist, local, torch.from_numpy(seg_of_pos[rows]), cand)
        loss = row_loss(scores, cfg.train.loss)
        total += loss.item() * len(rows)
        n += len(rows)
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return total / max(n, 1)


@torch.no_grad()
def user_scores(model, E: torch.Tensor, hist: Histories, local: torch.Tensor | None,
                segs: np.ndarray) -> np.ndarray:
    """Full score matrix [len(segs), n_items] with each user's whole history pooled."""
    model.eval()
    h, b, a = model.items(E, torch.arange(E.shape[0]))
    seg = torch.from_numpy(np.asarray(segs))
    pooled = pool_history(h, a, hist.items, hist.seg, hist.n_seg, seg) if model.uses_history else None
    hu = model.users(pooled, local[seg] if local is not None else None)
    return (hu @ h.T + b).numpy()


def make_optimizer(model, local, cfg: Config) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters()), "weight_decay": cfg.train.weight_decay}]
    if local is not None:
        groups.append({"params": [local], "weight_decay": 0.0})
    if cfg.train.optimizer == "sgd":  # plain steps keep gradient magnitudes for averaging
        return torch.optim.SGD(groups, lr=cfg.train.lr)
    return torch.optim.Adam(groups, lr=cfg.train.lr)


def train_central(cfg: Config, split: Split, E: np.ndarray, log=print) -> dict:
    """Centralized training of the same model on all users' data: the accuracy ceiling.

    Model selection by validation sampled HR@10 only; returns test metrics at the
    best-validation epoch and at the final epoch, plus the per-epoch curve.
    """
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    E_t = torch.from_numpy(E)
    cfg = cfg.override(**{"train.batch-size": cfg.central.batch_size, "train.lr": cfg.central.lr})
    model = build_model(cfg, E.shape[1], split.n_items)
    local = None
    if uses_local_user(cfg):
        local = init_local_users(split.n_users, cfg.model.dim, cfg.model.kind,
                                 pooling=cfg.model.pooling).requires_grad_()
    hist = Histories.from_split(split)
    opt = make_optimizer(model, local, cfg)

    def sampler(users: np.ndarray) -> np.ndarray:
        return sample_negatives(split, users, cfg.train.negatives, rng)

    def scorer(users):
        return user_scores(model, E_t, hist, local, users)

    best, best_state, curve, bad = -1.0, None, [], 0
    for epoch in range(1, cfg.central.epochs + 1):
        t0 = time.time()
        loss = train_epoch(model, local, opt, E_t, hist, cfg, rng, sampler)
        val = evaluate(scorer, split, "val")
        curve.append({"epoch": epoch, "loss": loss, "val/sampled/hr@10": val["sampled/hr@10"],
                      "val/sampled/ndcg@10": val["sampled/ndcg@10"], "seconds": time.time() - t0})
        log(f"epoch {epoch:3d}  loss {loss:.4f}  val sampled HR@10 {val['sampled/hr@10']:.4f}  "
            f"NDCG@10 {val['sampled/ndcg@10']:.4f}  ({time.time() - t0:.1f}s)")
        if best_state is None or val["sampled/hr@10"] > best:  # NaN: no val users, keep last
            best, bad = val["sampled/hr@10"], 0
            best_state = (epoch, copy.deepcopy(model.state_dict()),
                          None if local is None else local.detach().clone())
        else:
            bad += 1
            if bad >= cfg.central.patience:
                log(f"early stop: no better val HR@10 for {bad} epochs")
                break
    final = evaluate(scorer, split, "test")
    best_epoch, state, best_local = best_state
    model.load_state_dict(state)
    if local is not None:
        local.data.copy_(best_local)
    return {"final": final, "best": evaluate(scorer, split, "test"), "best_epoch": best_epoch,
            "epochs_run": len(curve), "curve": curve, "model": model}
