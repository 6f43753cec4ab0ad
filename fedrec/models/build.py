"""Model construction from the config: the one place that knows the model kinds."""

import torch

from fedrec.data.features import extra_widths
from fedrec.models.fedmf import FedMF
from fedrec.models.profile import ProfileRec
from fedrec.models.protocol import Recommender
from fedrec.models.seqrec import SeqRec


def build_model(cfg, text_dim: int, n_items: int, known=None) -> Recommender:
    """cfg's model for n_items items whose frozen tables are text_dim wide in all (the
    PLM text, then model.item-features' other tables); known: bool [n_items], the items
    with trained ID rows (the released ones; None: every item)."""
    m = cfg.model
    extras = extra_widths(cfg)
    if m.kind == "fedmf":
        return FedMF(n_items, m.dim, m.max_len).know(known)
    if m.kind == "profile":
        return ProfileRec(text_dim, n_items, prior=m.prior, dim=m.dim, max_len=m.max_len,
                          new_item_bias=m.new_item_bias).know(known)
    return SeqRec(text_dim - sum(w for _, w in extras), n_items, dim=m.dim, hidden=m.hidden, layers=m.layers,
                  heads=m.heads, max_len=m.max_len, dropout=m.dropout, item_text=m.item_text,
                  id_embeddings=m.id_embeddings, id_dropout=m.id_dropout,
                  new_item_bias=m.new_item_bias, extras=extras,
                  combine=m.feature_combine).know(known)


def model_name(cfg) -> str:
    """seq (text items), seq+id (text + ID items), seq-id (SASRec over IDs), with
    "+graph", "+image" for the other item features; fedmf; profile."""
    m = cfg.model
    if m.kind != "seq":
        return m.kind
    return ("seq" + ("" if m.item_text else "-id") + ("+id" if m.item_text and m.id_embeddings else "")
            + "".join(f"+{name}" for name, _ in extra_widths(cfg)))


def model_from_arrays(cfg, text_dim: int, n_items: int, arrays, known=None) -> Recommender:
    """The model of `cfg` holding `arrays` (numpy arrays or Flower Arrays, by parameter
    name; copied), in eval mode. Built on the meta device: no random initialisation runs
    (an orthogonal init is a QR per call) and no global RNG state is drawn. A training
    step builds its own model instead (its init is part of the seeded stream). Missing
    or misshapen arrays raise RuntimeError (strict loading)."""
    with torch.device("meta"):
        model = build_model(cfg, text_dim, n_items)
    model.know(known)
    model.load_state_dict({k: torch.tensor(v.numpy() if hasattr(v, "numpy") else v,
                                           dtype=torch.float32) for k, v in arrays.items()},
                          assign=True)
    return model.eval()


def id_tables(cfg) -> tuple[str, ...]:
    """Array-name prefixes of the configured model's per-item ID tables."""
    return {"fedmf": FedMF, "profile": ProfileRec}.get(cfg.model.kind, SeqRec).id_tables
