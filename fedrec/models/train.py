"""One training epoch and one optimizer for every model and every caller: a device (one
user), the centralized reference (all users, fedrec.models.central) and the public warm
start. No PLM runs here: item text embeddings E arrive precomputed and frozen.
"""

import numpy as np
import torch

from fedrec.models.protocol import Recommender, batch_inputs, target_mask


def make_optimizer(name: str, lr: float, weight_decay: float, model: Recommender,
                   users: torch.Tensor | None = None, skip: tuple[str, ...] = ()
                   ) -> torch.optim.Optimizer:
    """The optimizer of the federated parameters (but those named with a `skip` prefix)
    and, if any, the user-local vectors (never weight-decayed). sgd keeps gradient
    magnitudes for the server's averaging; adam is the centralized reference's."""
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith(skip)],
               "weight_decay": weight_decay}]
    if users is not None:
        groups.append({"params": [users], "weight_decay": 0.0})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr)


def stride_of(cfg) -> int:
    """The training windows' stride (train.window-stride; 0 or more than model.max-len:
    model.max-len, disjoint windows)."""
    return min(cfg.train.window_stride or cfg.model.max_len, cfg.model.max_len)


def windows_per_step(interactions: int, stride: int) -> int:
    """Batch sizes count training interactions (targets); a step takes whole rows, each
    counting `stride` new targets (fedrec.models.protocol.windows)."""
    return max(1, interactions // stride)


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


def train_epoch(model: Recommender, opt, E: torch.Tensor, rows: np.ndarray,
                allowed: torch.Tensor, per_step: int, rng: np.random.Generator,
                users: torch.Tensor | None = None, owner: np.ndarray | None = None,
                proximal: Proximal | None = None, first: int = 0) -> float:
    """One pass over training rows [W, L + 1] in a random order, per_step rows a step;
    returns the mean loss over targets. allowed [N] bool: the released items (the
    softmax). users [U, user_dim], owner [W]: the user-local vectors and whose each row
    is (models with user_dim > 0). first: the first counted target position of each row
    (L - stride for overlapping windows)."""
    model.train()
    order = rng.permutation(len(rows))
    total, n = 0.0, 0
    for start in range(0, len(order), per_step):
        pick = order[start:start + per_step]
        batch = torch.from_numpy(rows[pick])
        user = None if users is None else users[torch.from_numpy(owner[pick])]
        loss = model.loss(E, batch, allowed, user=user, first=first)
        targets = int(target_mask(batch, first).sum())
        total += loss.item() * targets
        n += targets
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if proximal is not None:
            proximal.add_gradient()
        opt.step()
    return total / max(n, 1)


def scorer(model: Recommender, E: torch.Tensor, users: torch.Tensor | None = None):
    """A protocol Scorer (fedrec.data.evaluate) for this model; users [n_users, user_dim]:
    the user-local vectors, by user index (models with user_dim > 0)."""
    @torch.no_grad()
    def score(u: np.ndarray, inputs: list[np.ndarray]) -> np.ndarray:
        model.eval()
        user = None if users is None else users[torch.from_numpy(np.asarray(u))]
        return model.score_all(E, batch_inputs(inputs, model.max_len), user).numpy()
    return score
