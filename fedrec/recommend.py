"""On-device recommendation: top-K items for one user's local history, with reasons.

Everything runs on the device: the history file, the catalog and its cached embeddings,
and the trained federated parameters of a run (``RUN_DIR/final.safetensors`` and
``RUN_DIR/run_config.json``). The user vector h_u is computed here and never leaves.

    h_i = item_adapter(e_i)                 every catalog item (cached PLM output e_i)
    w_j = softmax_j(attention(h_j))         over the history items j (uniform for mean pooling)
    h_u = user_adapter(sum_j w_j h_j)
    score_i = sigmoid(<h_u, h_i> + b_i)     history items are excluded

Explanation: history item j contributed to recommendation i by how much the score
<h_u, h_i> + b_i drops when j is left out of the pool (the leave-one-out pool of
training). For a near-linear user adapter that is about w_j/(1-w_j) * <h_j - pool, h_i>:
attention weight times how much closer j is to i than the user's average item, so a
reason is specific to the recommendation rather than the user's most central items.
The (up to) three largest positive drops are named, by title. The user-local residual of
model.user-embedding lives in the SuperNode's context.state, not in RUN_DIR, so it is
zero here: the scores are those of the federated user tower over the history.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from fedrec.config import Config, load_defaults
from fedrec.device import (
    CACHE_DIR,
    Catalog,
    catalog_file,
    item_embeddings,
    read_catalog,
    read_history,
)
from fedrec.errors import FedrecError
from fedrec.model import build_model, pool_history
from fedrec.seqrec import SeqRec, batch_inputs

FINAL, RUN_CONFIG = "final.safetensors", "run_config.json"
MAX_REASONS = 3


@dataclass(frozen=True)
class Recommendation:
    rank: int                 # 1-based
    item: str                 # catalog item id
    text: str                 # the item text the PLM read
    score: float              # sigmoid(<h_u, h_i> + b_i)
    because: list[tuple[str, str, float]]  # (history item id, title, score drop) largest first


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


def recommend(history: str | Path, run_dir: str | Path, k: int = 10,
              catalog: str | Path | None = None, model_dir: str = "",
              cache_dir: str | Path | None = None) -> list[Recommendation]:
    """Top-k unseen items for the user of `history`, best first.

    catalog: file or directory; default the history's directory if it holds one (a device
    directory), else the run's data.dataset. cache_dir: where catalog embeddings are
    cached; default ``<history dir>/cache`` (the device layout). model_dir: the PLM;
    default the run's encoder.model-dir, else the bundled MiniLM.
    """
    if k < 1:
        raise FedrecError(f"-k must be >= 1, got {k}")
    history = Path(history).expanduser()
    cfg, params = load_run(run_dir)
    if catalog is None:
        catalog = history.parent if catalog_file(history.parent) else cfg.data.dataset
    cat = read_catalog(catalog, cfg.data.cache_dir)
    seq = read_history(history, cat)
    cache = Path(cache_dir).expanduser() if cache_dir else history.parent / CACHE_DIR
    E = torch.from_numpy(item_embeddings(cfg, cat, cache, model_dir))
    with torch.device("meta"):  # no random init (an orthogonal init is a QR per call)
        model = build_model(cfg, E.shape[1], cat.n_items)
    try:
        model.load_state_dict({n: torch.from_numpy(v).float() for n, v in params.items()},
                              assign=True)
    except RuntimeError as exc:
        raise FedrecError(f"--model: its parameters do not fit this catalog and PLM "
                          f"({cat.n_items} items, {E.shape[1]}-d text): "
                          f"{str(exc).splitlines()[-1].strip()}; use the catalog and "
                          "encoder the run trained with") from None
    # One thread: a ~2k-item catalog is too small for intra-op parallelism, and on a busy
    # device extra threads only contend (measured here: 53 ms with 1 thread, 430 ms with 2
    # on 2 loaded cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rank_items(model, E, seq, cat, cfg.data.item_template, k)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def rank_items(model, E: torch.Tensor, seq: np.ndarray, cat: Catalog, template: str,
               k: int) -> list[Recommendation]:
    """Top-k of the catalog minus `seq`, each with the history items whose removal would
    lower its score most (leave-one-out: the input without that item, re-scored)."""
    model.eval()
    if isinstance(model, SeqRec):
        return _rank_seq(model, E, seq, cat, template, k)
    h, b, a = model.items(E, torch.arange(E.shape[0]))
    hist = torch.from_numpy(seq)
    n = len(seq)
    seg = torch.zeros(n, dtype=torch.long)
    pooled = pool_history(h, a, hist, seg, 1, torch.zeros(1, dtype=torch.long))
    scores = h @ model.users(pooled, None)[0] + b
    scores[hist] = -torch.inf
    k = min(k, cat.n_items - n)
    top = torch.topk(scores, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)
    # Row j pools the history without item j: [n, d] -> scores of the top items [n, k].
    without = pool_history(h, a, hist, seg, 1, seg, exclude=hist)
    drop = scores[top][None] - (model.users(without, None) @ h[top].T + b[top])
    return _explained(cat, template, seq, top, scores, drop)


def _rank_seq(model: SeqRec, E: torch.Tensor, seq: np.ndarray, cat: Catalog, template: str,
              k: int) -> list[Recommendation]:
    """SeqRec: the model reads the last max_len items; reasons are among those, each found
    by scoring the input with that one item removed (a batch of its leave-one-out inputs)."""
    tail = seq[-model.max_len:]
    scores = model.score_all(E, batch_inputs([seq], model.max_len))[0]
    scores[torch.from_numpy(seq)] = -torch.inf
    k = min(k, cat.n_items - len(np.unique(seq)))
    top = torch.topk(scores, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)
    # Row j: the input without tail item j (seq's other items shift in from the left).
    rows = [np.delete(seq, len(seq) - len(tail) + j) for j in range(len(tail))]
    without = model.score_pairs(E, batch_inputs(rows, model.max_len), top.expand(len(rows), -1))
    drop = scores[top][None] - without
    return _explained(cat, template, tail, top, scores, drop)


def _explained(cat: Catalog, template: str, seq: np.ndarray, top: torch.Tensor,
               scores: torch.Tensor, drop: torch.Tensor) -> list[Recommendation]:
    """Recommendations for the top items; drop [len(seq), k]: how much removing history
    item j lowers top item r's score."""
    texts = cat.texts(template)
    labels = [f.get("title") or t for f, t in zip(cat.item_fields, texts)]
    out = []
    for r, i in enumerate(top.tolist()):
        order = torch.argsort(drop[:, r], descending=True)[:MAX_REASONS].tolist()
        keep = [j for j in order if drop[j, r] > 0] or order[:1]
        out.append(Recommendation(
            r + 1, cat.item_ids[i], texts[i], float(torch.sigmoid(scores[i])),
            [(cat.item_ids[seq[j]], labels[seq[j]], float(drop[j, r])) for j in keep]))
    return out
