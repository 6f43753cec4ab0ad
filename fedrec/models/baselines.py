"""Non-learned reference points, in the protocol of every other row (docs/protocol.md)."""

from pathlib import Path

import numpy as np

from fedrec.config import Config
from fedrec.data.datasets import load_dataset
from fedrec.data.evaluate import evaluate
from fedrec.data.features import graph_location
from fedrec.data.graph import find_graph, read_graph
from fedrec.data.pipeline import catalog_vectors, list_spaces, prepare
from fedrec.data.protocol import make_split, population
from fedrec.results import summarize


def popularity(cfg: Config, split_seeds: list[int]) -> dict:
    """Rank items by training popularity (cold items score zero), per protocol split seed."""
    runs = []
    for seed in split_seeds:
        p = prepare(cfg.override(**{"data.split-seed": seed}))
        pop = p.split.item_popularity().astype(np.float64)
        runs.append({"seed": seed, "test": evaluate(lambda u, _, q=pop: np.tile(q, (len(u), 1)),
                                                    p.split, spaces=list_spaces(cfg, p))})
    summary = summarize([r["test"] for r in runs])
    name = "popularity" + ("" if cfg.data.cold_fraction else " (no cold items)")
    return {"method": name, "config": cfg.to_flat(), "seed_kind": "data.split-seed",
            "runs": runs, "summary": {"best": summary, "final": summary}}


def text_similarity(cfg: Config) -> dict:
    """The untrained content model: cosine of each item's frozen PLM embedding with the
    mean embedding of the input's last model.max-len items (cold items included)."""
    p = prepare(cfg, progress=True)
    E, L = catalog_vectors(cfg, p).astype(np.float64), cfg.model.max_len
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)

    def score(users, inputs):
        return np.stack([E[h[-L:]].mean(0) for h in inputs]) @ E.T
    summary = summarize([evaluate(score, p.split, spaces=list_spaces(cfg, p))])
    return {"method": "text-similarity", "config": cfg.to_flat(),
            "seed_kind": "none (deterministic)", "runs": [{"seed": 0, "test": summary}],
            "summary": {"best": summary, "final": summary}}


def dataset_stats(cfg: Config) -> list[tuple[str, object]]:
    """Users, items, interactions and the protocol split of the configured dataset, and
    its knowledge graph where it has one (data.graph or the dataset's directory)."""
    d = cfg.data
    ds = load_dataset(d.dataset, d.cache_dir)
    s = population(make_split(ds, d.cold_fraction, d.split_seed, d.eval_negatives, d.cache_dir,
                              d.tie_order), d.users, d.split_seed)
    lengths = np.diff(s.train_ptr)
    test_users = s.eval_users("test")
    return [("dataset", ds.name), ("users", ds.n_users), ("items", ds.n_items), ("interactions", len(ds.users)),
            ("density", f"{len(ds.users) / (ds.n_users * ds.n_items):.4f}"),
            ("train interactions", len(s.train_items)),
            ("history length min/median/max",
             f"{lengths.min()}/{int(np.median(lengths))}/{lengths.max()}"),
            ("evaluated users", len(test_users)), ("cold items", int(s.cold.sum())),
            ("users with a cold test item", int(s.cold[s.test[test_users]].sum())),
            ("example item text", ds.item_texts(cfg.data.item_template)[0])] + _graph_stats(cfg, ds)


def _graph_stats(cfg: Config, ds) -> list[tuple[str, object]]:
    where = graph_location(cfg, Path(ds.source).parent)
    if find_graph(where) is None:
        return [("knowledge graph", "none (model.item-features graph needs one: data.graph)")]
    g = read_graph(where, ds.item_ids).stats(ds.item_ids)
    return [("knowledge graph", g["source"]), ("graph triples read", g["triples"]),
            ("linked items", f"{g['linked-items']} of {g['items']}"),
            ("facts (relation, entity) of linked items", g["facts"]),
            ("facts per linked item (median)", int(g["facts-per-linked-item-median"])),
            ("relations", g["relations"])]
