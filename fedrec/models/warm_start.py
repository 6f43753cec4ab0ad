"""A public warm start of the v2 model: pretraining on the public catalog alone.

Before any user takes part, the server trains the model (model.public-warm-start epochs)
on synthetic sessions built only from what the catalog publishes: each session is one
catalog term (a genre, a tag) drawn uniformly, then up to SESSION_LEN released items that
carry it, drawn uniformly without replacement, in random order. Training is the v2 loss
itself (next-item softmax over the released items, fedrec.models.train.train_epoch)
with the central optimizer, so the adapter learns a term-aware geometry of the frozen PLM
embeddings and the encoder learns to read a history before the first noisy round.

What it uses: item texts (through the frozen PLM), the catalog's list-like fields, the
released-item set. What it does not: interactions, item popularity (popularity is user
data), anything per user. It therefore costs no privacy budget under either unit, which
docs/privacy.md states as an assumption: the catalog is public. The ID part stays at zero
(ID vectors and the text-to-ID map are learned from interactions only) and unreleased
items take no part.
"""

import numpy as np
import torch

from fedrec.config import Config
from fedrec.data.datasets import item_terms
from fedrec.errors import FedrecError
from fedrec.models.protocol import Recommender, stack_rows
from fedrec.models.train import make_optimizer, train_epoch, windows_per_step

SESSION_LEN = 20     # items per synthetic session
SESSIONS_PER_ITEM = 2  # sessions per released item


def sessions(item_fields: list[dict[str, str]], released: np.ndarray,
             rng: np.random.Generator) -> list[np.ndarray]:
    """Synthetic sessions [<= SESSION_LEN] of released items sharing one catalog term."""
    by_term: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(item_fields):
        if released[i]:
            for ft in item_terms(item):
                by_term.setdefault(ft, []).append(i)
    groups = [np.array(v) for v in by_term.values() if len(v) >= 2]
    if not groups:
        raise FedrecError("model.public-warm-start: no catalog term (genre, tag) is shared by "
                          "two released items, so there is nothing public to pretrain on; set "
                          "model.public-warm-start = 0")
    n = SESSIONS_PER_ITEM * int(released.sum())
    return [rng.permutation(g)[:SESSION_LEN] for g in (groups[k] for k in
                                                         rng.integers(len(groups), size=n))]


def warm_start(model: Recommender, cfg: Config, E: np.ndarray, item_fields: list[dict[str, str]],
               released: np.ndarray, log=print) -> list[float]:
    """Train `model` in place for cfg.model.public_warm_start epochs on public sessions
    (its ID vectors left out); returns the loss per epoch. Seeded by train.seed."""
    rng = np.random.default_rng(cfg.train.seed)
    rows, _ = stack_rows(sessions(item_fields, released, rng), model.max_len)
    opt = make_optimizer(cfg.central.optimizer, cfg.central.lr, cfg.train.weight_decay, model,
                         skip=model.id_tables + ("id_from_text.",))
    E_t, allowed = torch.from_numpy(E), torch.from_numpy(np.asarray(released, bool))
    per_step = windows_per_step(cfg.central.batch_size, model.max_len)
    losses = []
    for epoch in range(cfg.model.public_warm_start):
        losses.append(train_epoch(model, opt, E_t, rows, allowed, per_step, rng))
        log(f"public warm start: epoch {epoch + 1} of {cfg.model.public_warm_start}, "
            f"{len(rows)} catalog sessions, loss {losses[-1]:.4f}")
    model.zero_grad(set_to_none=True)
    return losses
