"""The item side's frozen feature tables beside the PLM text: a public knowledge graph
(fedrec.data.graph) and bring-your-own images (fedrec.data.images).

`model.item-features` names what an item is made of ("text", "text,graph",
"text,graph,image"). The model reads one frozen matrix per catalog, the tables side by
side in that order, text first; each non-text table has its own small trainable adapter
(fedrec.models.seqrec). Both tables are public catalog data: reading them costs no ε.
"""

from pathlib import Path

import numpy as np

from fedrec.data.graph import Graph, find_graph, graph_table, read_graph
from fedrec.data.images import image_table, vision_width
from fedrec.errors import FedrecError

FEATURES = ("text", "graph", "image")


def feature_names(cfg) -> tuple[str, ...]:
    names = tuple(x.strip() for x in cfg.model.item_features.split(",") if x.strip())
    bad = [x for x in names if x not in FEATURES]
    if bad or not names or names[0] != "text" or len(set(names)) != len(names):
        raise FedrecError(f"model.item-features: '{cfg.model.item_features}' must be text "
                          "followed by any of graph, image (e.g. \"text,graph\")")
    return names


def extra_widths(cfg) -> tuple[tuple[str, int], ...]:
    """(name, width) of each non-text table, in the matrix's order; () for text alone and
    for models that read no text (computable from the config alone: the server builds
    models without reading any table)."""
    if cfg.model.kind != "seq" or not cfg.model.item_text:
        return ()
    out = []
    for name in feature_names(cfg)[1:]:
        out.append((name, cfg.model.graph_dim if name == "graph"
                    else vision_width(cfg.encoder.vision_dir)))
    return tuple(out)


def graph_location(cfg, dataset_dir: Path | None) -> Path | None:
    """Where the graph is looked for: data.graph, else the dataset's (or device's)
    directory."""
    return Path(cfg.data.graph).expanduser() if cfg.data.graph else dataset_dir


def graph_source(cfg, dataset_dir: Path | None) -> Path:
    """graph_location, checked to hold a graph."""
    where = graph_location(cfg, dataset_dir)
    if where is None or find_graph(where) is None:
        hint = ("run `fedrec data fetch ml-100k` (it fetches the graph too) or set data.graph"
                if not cfg.data.graph else "point it at a graph.csv or a .kg file")
        raise FedrecError(f"data.graph: no graph at '{where}' for model.item-features "
                          f"graph; {hint}")
    return where


def extra_tables(cfg, item_ids: list[str], dataset_dir: Path | None, cache_root: Path,
                 log=print, progress: bool = False) -> np.ndarray:
    """float32 [n_items, sum of extra widths]: the non-text tables side by side ([n, 0]
    for text alone). Items a table has nothing for get zero rows, counted in one line."""
    parts = []
    for name, width in extra_widths(cfg):
        if name == "graph":
            t = graph_table(load_graph(cfg, item_ids, dataset_dir), item_ids, width,
                            cache_root)
        else:
            t = image_table(cfg.data.images, item_ids, cfg.encoder.vision_dir, cache_root,
                            cfg.encoder.batch_size, progress)
        missing = int((~t.any(1)).sum())
        if missing:
            log(f"item features: {missing} of {len(item_ids)} items have no {name} "
                f"(scored from their other features)")
        parts.append(t)
    return (np.concatenate(parts, 1) if parts
            else np.zeros((len(item_ids), 0), np.float32))


def load_graph(cfg, item_ids: list[str], dataset_dir: Path | None) -> Graph:
    """The graph the model reads: its facts under model.graph-min-items."""
    return read_graph(graph_source(cfg, dataset_dir), item_ids, cfg.model.graph_min_items)
