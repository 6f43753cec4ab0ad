"""On-device recommendation: top-K items for one user's local history, with reasons.

Everything runs on the device: the history file, the catalog and its cached embeddings,
and a trained model (a run directory: fedrec.models.saved). The user vector h_u is
computed here and never leaves.

The model reads the last model.max-len history items and scores every catalog item,
<h_u, h_i> + b_i (history items excluded). Reasons: the window items whose removal lowers
the item's score most (fedrec.ranking.explain, leave-one-out; their faithfulness is
measured by `fedrec explain-eval`), with the catalog terms (genres) the item shares with
them. --diversity re-ranks by maximal marginal relevance over the frozen PLM embeddings
(fedrec.ranking.diversity).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec.data.device import (
    CACHE_DIR,
    Catalog,
    catalog_file,
    item_embeddings,
    read_catalog,
    read_history,
    tie_seed,
)
from fedrec.data.evaluate import Space
from fedrec.data.features import load_graph
from fedrec.errors import FedrecError
from fedrec.models.protocol import Recommender
from fedrec.models.saved import load_model, load_run
from fedrec.ranking.diversity import mmr
from fedrec.ranking.explain import loo_drops, pick_reasons, scores, shared_terms, window_positions
from fedrec.ranking.facts import FactIndex, fact_index, graph_columns


@dataclass(frozen=True)
class Recommendation:
    rank: int                 # 1-based
    item: str                 # catalog item id
    text: str                 # the item text the PLM read
    score: float              # sigmoid(<h_u, h_i> + b_i)
    because: list[tuple[str, str, float]]  # (history item id, title, score drop) largest first
    shared: list[str]         # catalog terms (genres, tags) the item shares with its reasons
    facts: list[str] = ()     # knowledge-graph facts it shares with them ("same director as ...")

    @property
    def reasons_text(self) -> str:
        """"A [1]; B [7] (shares Drama; same director as A [1] (m.0x))": the reasons by
        title and id, then shared terms and shared facts."""
        extra = [f"shares {', '.join(self.shared)}"] if self.shared else []
        extra += list(self.facts)
        return ("; ".join(f"{title} [{iid}]" for iid, title, _ in self.because)
                + (f" ({'; '.join(extra)})" if extra else ""))


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
    cfg = load_run(run_dir)[0]
    if catalog is None:
        catalog = history.parent if catalog_file(history.parent) else cfg.data.dataset
    cat = read_catalog(catalog, cfg.data.cache_dir)
    seq = read_history(history, cat, tie_seed(cfg))
    cache = Path(cache_dir).expanduser() if cache_dir else history.parent / CACHE_DIR
    E = torch.from_numpy(item_embeddings(cfg, cat, cache, model_dir))
    _, model = load_model(run_dir, E.shape[1], cat.item_ids, cat.cold)
    # One thread: a ~2k-item catalog is too small for intra-op parallelism, and on a busy
    # device extra threads only contend (measured here: 53 ms with 1 thread, 430 ms with 2
    # on 2 loaded cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    index = None
    if graph_columns(model) is not None:  # reasons name shared facts too
        index = fact_index(load_graph(cfg, cat.item_ids, Path(cat.source).parent), cat.item_ids)
    try:
        return rank_items(model, E, seq, cat, cfg.data.item_template, k, diversity, index)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def rank_items(model: Recommender, E: torch.Tensor, seq: np.ndarray, cat: Catalog,
               template: str, k: int, diversity: float = 0.0,
               index: FactIndex | None = None) -> list[Recommendation]:
    """Top-k of the catalog minus `seq` (re-ranked by MMR over the PLM embeddings when
    diversity > 0, fedrec.ranking.diversity), each with the history items whose removal would
    lower its score most (leave-one-out: the input without that item, re-scored) and,
    given the graph's `index`, the facts it shares with them."""
    model.eval()
    h, b = model.item_table(E)
    score = scores(model, h, b, [seq])[0]
    score[torch.from_numpy(seq)] = -torch.inf
    k = min(k, cat.n_items - len(np.unique(seq)))
    if k <= 0:
        return []
    text = E[:, :getattr(model, "text_dim", E.shape[1])]
    space = Space.vectors(text.numpy()) if diversity else None  # only re-ranking reads it
    lists = mmr(score[None].numpy(), space, k, diversity)
    top = torch.from_numpy(lists[0])
    drop = loo_drops(model, h, b, seq, top)  # reasons are among the items the model reads
    window = seq[window_positions(seq, model.max_len)]
    texts = cat.texts(template)
    labels = [f.get("title") or t for f, t in zip(cat.item_fields, texts)]
    out = []
    for r, (i, reasons) in enumerate(zip(top.tolist(), pick_reasons(drop))):
        items = [int(window[j]) for j in reasons]
        out.append(Recommendation(
            r + 1, cat.item_ids[i], texts[i], float(torch.sigmoid(score[i].double())),
            [(cat.item_ids[j], labels[j], float(drop[w, r])) for j, w in zip(items, reasons)],
            shared_terms(cat.item_fields[i], [cat.item_fields[j] for j in items]),
            index.phrases(i, items, labels, cat.item_ids) if index else []))
    return out
