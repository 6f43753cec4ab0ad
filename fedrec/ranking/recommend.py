"""On-device recommendation: top-K items for one user's local history, with reasons.

Everything runs on the device: the history file, the catalog and its cached embeddings,
and the trained federated parameters of a run (``RUN_DIR/final.safetensors`` and
``RUN_DIR/run_config.json``). The user vector h_u is computed here and never leaves.

seq (v2 default): the causal encoder reads the last model.max-len history items and
scores every catalog item, <h_u, h_i> + b_i (history items excluded). Reasons: the window
items whose removal lowers the item's score most (fedrec.ranking.explain, leave-one-out; their
faithfulness is measured by `fedrec explain-eval`), with the catalog terms (genres) the
item shares with them. --diversity re-ranks by maximal marginal relevance over the frozen
PLM embeddings (fedrec.ranking.diversity).

text (v1): h_u pools the history items' adapted vectors; a reason's drop is the score
change when it is left out of the pool. The user-local residual of model.user-embedding
lives in the SuperNode's context.state, not in RUN_DIR, so it is zero here.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from fedrec.config import Config, load_defaults
from fedrec.deployment.device import (
    CACHE_DIR,
    Catalog,
    catalog_file,
    item_embeddings,
    read_catalog,
    read_history,
)
from fedrec.errors import FedrecError
from fedrec.models.build import model_from_arrays, pool_history
from fedrec.models.seqrec import SeqRec
from fedrec.ranking.diversity import mmr, unit_rows
from fedrec.ranking.explain import loo_drops, pick_reasons, shared_terms, window_positions

FINAL, RUN_CONFIG = "final.safetensors", "run_config.json"


@dataclass(frozen=True)
class Recommendation:
    rank: int                 # 1-based
    item: str                 # catalog item id
    text: str                 # the item text the PLM read
    score: float              # sigmoid(<h_u, h_i> + b_i)
    because: list[tuple[str, str, float]]  # (history item id, title, score drop) largest first
    shared: list[str]         # catalog terms (genres, tags) the item shares with its reasons

    @property
    def reasons_text(self) -> str:
        """"A [1]; B [7] (shares Drama)": the reasons by title and id, then shared terms."""
        shared = f" (shares {', '.join(self.shared)})" if self.shared else ""
        return "; ".join(f"{title} [{iid}]" for iid, title, _ in self.because) + shared


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, np.ndarray]]:
    """(config, federated parameters) of a finished run directory."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FedrecError(f"--model: '{run_dir}' is not a run directory")
    if not (run_dir / FINAL).is_file():
        status = ""
        try:
            status = json.loads((run_dir / "results.json").read_text()).get("status", "")
        except (OSError, ValueError, AttributeError):
            pass
        why = f" (results.json says status '{status}')" if status else ""
        raise FedrecError(f"--model: '{run_dir}' has no {FINAL}{why}; pass the directory of a "
                          "completed run (its fed.run-dir)")
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text())
        params = load_file(str(run_dir / FINAL))
    except (OSError, ValueError, SafetensorError) as exc:
        raise FedrecError(f"--model: cannot read '{run_dir}' ({str(exc).splitlines()[0]}); "
                          f"it needs {RUN_CONFIG} and {FINAL} from one run") from None
    defaults = load_defaults()  # keys added since the run keep their defaults
    cfg = Config.from_flat({**defaults, **{k: v for k, v in saved.items() if k in defaults}})
    if cfg.model.kind == "fedmf":
        raise FedrecError(f"--model: the run trained model.kind '{cfg.model.kind}', whose user "
                          "vectors stay on the devices; recommend needs a seq or text model")
    if cfg.model.kind == "text" and cfg.model.pooling == "none":
        raise FedrecError("--model: the run trained model.pooling 'none', whose user vectors "
                          "are the devices' user-local embeddings, not in the run directory; "
                          "recommend needs a history-pooled text model (attention or mean)")
    return cfg, params


def model_from_params(cfg: Config, params: dict[str, np.ndarray], text_dim: int, n_items: int):
    """The run's model with its federated parameters, for a catalog of n_items."""
    try:
        return model_from_arrays(cfg, text_dim, n_items, params)
    except RuntimeError as exc:
        raise FedrecError(f"--model: its parameters do not fit this catalog and PLM "
                          f"({n_items} items, {text_dim}-d text): "
                          f"{str(exc).splitlines()[-1].strip()}; use the catalog and "
                          "encoder the run trained with") from None


def load_for_dataset(run_dir: str | Path):
    """(config, model, Prepared) of a finished run on its own dataset and split, for
    evaluations of the trained model (explain-eval, diversity-curve)."""
    from fedrec.data.pipeline import prepare

    cfg, params = load_run(run_dir)
    p = prepare(cfg)
    return cfg, model_from_params(cfg, params, p.item_emb.shape[1], p.split.n_items), p


def recommend(history: str | Path, run_dir: str | Path, k: int = 10,
              catalog: str | Path | None = None, model_dir: str = "",
              cache_dir: str | Path | None = None, diversity: float = 0.0) -> list[Recommendation]:
    """Top-k unseen items for the user of `history`, best first (re-ranked for diversity
    by maximal marginal relevance with weight `diversity` in [0, 1]; 0 = by score).

    catalog: file or directory; default the history's directory if it holds one (a device
    directory), else the run's data.dataset. cache_dir: where catalog embeddings are
    cached; default ``<history dir>/cache`` (the device layout). model_dir: the PLM;
    default the run's encoder.model-dir, else the bundled MiniLM.
    """
    if k < 1:
        raise FedrecError(f"-k must be >= 1, got {k}")
    if not 0.0 <= diversity <= 1.0:
        raise FedrecError(f"--diversity must be in [0, 1] (0 = plain ranking), got {diversity}")
    history = Path(history).expanduser()
    cfg, params = load_run(run_dir)
    if catalog is None:
        catalog = history.parent if catalog_file(history.parent) else cfg.data.dataset
    cat = read_catalog(catalog, cfg.data.cache_dir)
    seq = read_history(history, cat)
    cache = Path(cache_dir).expanduser() if cache_dir else history.parent / CACHE_DIR
    E = torch.from_numpy(item_embeddings(cfg, cat, cache, model_dir))
    model = model_from_params(cfg, params, E.shape[1], cat.n_items)
    # One thread: a ~2k-item catalog is too small for intra-op parallelism, and on a busy
    # device extra threads only contend (measured here: 53 ms with 1 thread, 430 ms with 2
    # on 2 loaded cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rank_items(model, E, seq, cat, cfg.data.item_template, k, diversity)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def rank_items(model, E: torch.Tensor, seq: np.ndarray, cat: Catalog, template: str,
               k: int, diversity: float = 0.0) -> list[Recommendation]:
    """Top-k of the catalog minus `seq` (re-ranked by MMR over the PLM embeddings E when
    diversity > 0, fedrec.ranking.diversity), each with the history items whose removal would
    lower its score most (leave-one-out: the input without that item, re-scored)."""
    model.eval()
    if isinstance(model, SeqRec):
        h, b = model.item_table(E)
        scores = (model.user_states(h, [seq]) @ h.T + b)[0]

        def explain(top):  # reasons are among the items the model reads
            return loo_drops(model, h, b, seq, top), seq[window_positions(seq, model.max_len)]
    else:
        h, b, a = model.items(E, torch.arange(E.shape[0]))
        hist = torch.from_numpy(seq)
        seg = torch.zeros(len(seq), dtype=torch.long)
        pooled = pool_history(h, a, hist, seg, 1, torch.zeros(1, dtype=torch.long))
        scores = h @ model.users(pooled, None)[0] + b
        # Row j pools the history without item j: [n, d] -> scores of the top items [n, k].
        without = pool_history(h, a, hist, seg, 1, seg, exclude=hist)

        def explain(top):
            return scores[top][None] - (model.users(without, None) @ h[top].T + b[top]), seq
    scores[torch.from_numpy(seq)] = -torch.inf
    k = min(k, cat.n_items - len(np.unique(seq)))
    if k <= 0:
        return []
    unit = unit_rows(E.numpy()) if diversity else None  # only re-ranking reads it
    lists = mmr(scores[None].numpy(), unit, k, diversity)
    top = torch.from_numpy(lists[0])
    drop, window = explain(top)
    texts = cat.texts(template)
    labels = [f.get("title") or t for f, t in zip(cat.item_fields, texts)]
    out = []
    for r, (i, reasons) in enumerate(zip(top.tolist(), pick_reasons(drop))):
        items = [int(window[j]) for j in reasons]
        out.append(Recommendation(
            r + 1, cat.item_ids[i], texts[i], float(torch.sigmoid(scores[i])),
            [(cat.item_ids[j], labels[j], float(drop[w, r])) for j, w in zip(items, reasons)],
            shared_terms(cat.item_fields[i], [cat.item_fields[j] for j in items])))
    return out
