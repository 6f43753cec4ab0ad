"""Training, used both by a device (one user) and by the centralized reference (all users).

seq (v2): windows of the history, next-item softmax cross-entropy over the released
items (SeqRec.loss). text / fedmf (v1): one epoch of (positive + sampled negatives) rows,
one segment per user.

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
from fedrec.data.protocol import Split, evaluate, sample_negatives
from fedrec.errors import FedrecError
from fedrec.models.build import build_model, init_local_users, pool_history, uses_local_user
from fedrec.models.seqrec import SeqRec, batch_inputs, target_mask, windows
from fedrec.models.warm_start import warm_start
from fedrec.results import CURVE_KEYS, SELECT


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

    @classmethod
    def from_lists(cls, histories: list[np.ndarray]) -> "Histories":
        """One segment per history, in list order."""
        items = np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, np.int64)
        seg = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        return cls(torch.from_numpy(items), torch.from_numpy(seg), len(histories))


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
                proximal: "Proximal | None" = None) -> float:
    """One pass over every training interaction in `hist`; returns the mean loss.

    negatives(segments [B]) -> [B, K] sampled negative items for those rows; proximal:
    FedProx's term, if any.
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
        _step(opt, loss, proximal)
    return total / max(n, 1)


class Proximal:
    """FedProx's proximal term 0.5 * mu * ||w - w_start||^2 over `params`, from their
    values now (the global model). Its gradient mu * (w - w_start) is added to the loss's
    after backward: the same step (bit for bit: tests/test_train.py) without a second
    autograd graph over every parameter in each step."""

    def __init__(self, params, mu: float):
        self.mu = mu
        self.pairs = [(p, p.detach().clone()) for p in params]

    def add_gradient(self) -> None:
        with torch.no_grad():
            for p, start in self.pairs:
                g = (p - start) * self.mu
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g


def _step(opt, loss: torch.Tensor, proximal: Proximal | None) -> None:
    """One optimizer step on loss (+ FedProx's proximal term)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if proximal is not None:
        proximal.add_gradient()
    opt.step()


@torch.no_grad()
def user_scores(model, E: torch.Tensor, hist: Histories, local: torch.Tensor | None,
                segs: np.ndarray) -> np.ndarray:
    """v1 models: full score matrix [len(segs), n_items] with each whole history pooled."""
    model.eval()
    h, b, a = model.items(E, torch.arange(E.shape[0]))
    seg = torch.from_numpy(np.asarray(segs))
    pooled = pool_history(h, a, hist.items, hist.seg, hist.n_seg, seg) if model.uses_history else None
    hu = model.users(pooled, local[seg] if local is not None else None)
    return (hu @ h.T + b).numpy()


@torch.no_grad()
def score_histories(model, E: torch.Tensor, inputs: list[np.ndarray],
                    local: torch.Tensor | None = None) -> np.ndarray:
    """Scores [len(inputs), n_items] of every item for each input history (time order);
    local [len(inputs), d]: those users' user-local vectors (v1 models), if any."""
    if isinstance(model, SeqRec):
        model.eval()
        return model.score_all(E, batch_inputs(inputs, model.max_len)).numpy()
    segs = np.arange(len(inputs))
    return user_scores(model, E, Histories.from_lists(inputs), local, segs)


def scorer(model, E: torch.Tensor, local: torch.Tensor | None = None):
    """A protocol Scorer (fedrec.data.protocol.evaluate) for this model; local [n_users, d]."""
    def score(users: np.ndarray, inputs: list[np.ndarray]) -> np.ndarray:
        return score_histories(model, E, inputs, None if local is None else local[users])
    return score


def seq_rows(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """Every history's training windows stacked: [W, max_len + 1]."""
    rows = [windows(h, max_len) for h in histories]
    return np.concatenate(rows) if rows else np.zeros((0, max_len + 1), np.int64)


def seq_train_epoch(model: SeqRec, opt, E: torch.Tensor, rows: np.ndarray, allowed: torch.Tensor,
                    per_step: int, rng: np.random.Generator,
                    proximal: Proximal | None = None) -> float:
    """One pass over training windows rows [W, L + 1], per_step windows a step; returns
    the mean loss over targets. allowed [N] bool: the released items (the softmax)."""
    model.train()
    order = rng.permutation(len(rows))
    total, n = 0.0, 0
    for start in range(0, len(order), per_step):
        batch = torch.from_numpy(rows[order[start:start + per_step]])
        loss = model.loss(E, batch, allowed)
        targets = int(target_mask(batch).sum())
        total += loss.item() * targets
        n += targets
        _step(opt, loss, proximal)
    return total / max(n, 1)


def windows_per_step(interactions: int, max_len: int) -> int:
    """Batch sizes count training interactions; a seq step takes whole windows."""
    return max(1, interactions // max_len)


def make_optimizer(model, local, cfg: Config) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters()), "weight_decay": cfg.train.weight_decay}]
    if local is not None:
        groups.append({"params": [local], "weight_decay": 0.0})
    return named_optimizer(cfg.train.optimizer, groups, cfg.train.lr)


def named_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":  # plain steps keep gradient magnitudes for averaging
        return torch.optim.SGD(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr)


def train_central(cfg: Config, split: Split, E: np.ndarray, log=print,
                  item_vectors: np.ndarray | None = None,
                  item_fields: list[dict[str, str]] | None = None) -> dict:
    """Centralized training of the same model on all users' data: the accuracy ceiling.

    It has its own optimizer and learning rate (central.*), so a change of the device's
    train.optimizer never changes the reference. Model selection by validation full
    HR@10 only (results.SELECT); returns test metrics at the best-validation epoch and at the final epoch,
    plus the per-epoch curve. item_vectors: the PLM embeddings list diversity is measured
    in (default E; pipeline.catalog_vectors for a model that reads no text). item_fields:
    the public catalog's fields, for model.public-warm-start (fedrec.models.warm_start).
    """
    div = E if item_vectors is None else item_vectors
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    E_t = torch.from_numpy(E)
    cfg = cfg.override(**{"train.batch-size": cfg.central.batch_size, "train.lr": cfg.central.lr,
                          "train.optimizer": cfg.central.optimizer})
    model = build_model(cfg, E.shape[1], split.n_items)
    if cfg.model.public_warm_start:
        if item_fields is None:
            raise FedrecError("model.public-warm-start: train_central needs the catalog's "
                              "item_fields (the public data it pretrains on)")
        warm_start(model, cfg, E, item_fields, split.released, log)
    local = None
    if uses_local_user(cfg):
        local = init_local_users(split.n_users, cfg.model.dim, cfg.model.kind,
                                 pooling=cfg.model.pooling).requires_grad_()
    opt = make_optimizer(model, local, cfg)
    if isinstance(model, SeqRec):
        rows = seq_rows([split.history(u) for u in range(split.n_users)], model.max_len)
        allowed = torch.from_numpy(split.released)
        per_step = windows_per_step(cfg.central.batch_size, model.max_len)

        def epoch_fn() -> float:
            return seq_train_epoch(model, opt, E_t, rows, allowed, per_step, rng)
    else:
        hist = Histories.from_split(split)

        def epoch_fn() -> float:
            return train_epoch(model, local, opt, E_t, hist, cfg, rng,
                               lambda users: sample_negatives(split, users, cfg.train.negatives, rng))

    score = scorer(model, E_t, None if local is None else local.detach())
    best, best_state, curve, bad = -1.0, None, [], 0
    for epoch in range(1, cfg.central.epochs + 1):
        t0 = time.time()
        loss = epoch_fn()
        val = evaluate(score, split, "val", item_vectors=div)
        curve.append({"epoch": epoch, "loss": loss, **{f"val/{k}": val[k] for k in CURVE_KEYS},
                      "seconds": time.time() - t0})
        log(f"epoch {epoch:3d}  loss {loss:.4f}  val sampled HR@10 {val['sampled/hr@10']:.4f}  "
            f"full HR@10 {val['full/hr@10']:.4f}  ({time.time() - t0:.1f}s)")
        if best_state is None or val[SELECT] > best:  # NaN: no val users, keep last
            best, bad = val[SELECT], 0
            best_state = (epoch, copy.deepcopy(model.state_dict()),
                          None if local is None else local.detach().clone())
        else:
            bad += 1
            if bad >= cfg.central.patience:
                log(f"early stop: no better val HR@10 for {bad} epochs")
                break
    final = evaluate(score, split, "test", item_vectors=div)
    best_epoch, state, best_local = best_state
    model.load_state_dict(state)
    if local is not None:
        local.data.copy_(best_local)
    return {"final": final, "best": evaluate(score, split, "test", item_vectors=div), "best_epoch": best_epoch,
            "epochs_run": len(curve), "curve": curve, "model": model}

