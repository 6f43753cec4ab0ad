"""Shared set-up of every command: dataset -> protocol split -> frozen item embeddings,
prepared once per process (a federated run's CLI process, its ServerApp process and each
ClientApp actor each ask many times)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.config import Config, uses_text
from fedrec.data.datasets import Dataset, item_terms, load_dataset
from fedrec.data.encoder import embed_texts
from fedrec.data.evaluate import Space
from fedrec.data.features import extra_tables, extra_widths
from fedrec.data.protocol import Split, make_split, population
from fedrec.files import data_home


@dataclass(frozen=True, eq=False)
class Prepared:
    dataset: Dataset
    split: Split
    item_emb: np.ndarray  # float32 [n_items, width]: the frozen tables the model reads,
    #                       text (the PLM's output) first, then model.item-features' others
    text_width: int = -1  # the text's columns (-1: all of them)

    @property
    def text_emb(self) -> np.ndarray:
        """The frozen PLM part alone ([n, 0]: a model that reads no text)."""
        return self.item_emb if self.text_width < 0 else self.item_emb[:, :self.text_width]


def catalog_vectors(cfg: Config, prepared: Prepared) -> np.ndarray:
    """The frozen PLM embeddings of the catalog, whatever the model reads: the common
    space of every method's list diversity (fedrec.data.evaluate)."""
    if prepared.text_emb.shape[1]:
        return prepared.text_emb
    return _encode(prepared.dataset, cfg, False)


def list_spaces(cfg: Config, prepared: Prepared) -> dict[str, Space]:
    """What every method's lists are judged in (fedrec.data.evaluate.ILD_KEYS): the frozen
    PLM vectors, raw and mean-centred, and the catalog's genre (and tag) sets, where the
    catalog has them. Computed once per Prepared."""
    if prepared not in _SPACES:
        vectors = catalog_vectors(cfg, prepared)
        out = {"plm": Space.vectors(vectors), "plm-centred": Space.vectors(vectors, True)}
        terms = [{t for _, t in item_terms(f)} for f in prepared.dataset.item_fields]
        if any(terms):
            out["genres"] = Space.sets(terms)
        _SPACES[prepared] = out
    return _SPACES[prepared]


def prepare(cfg: Config, progress: bool = False) -> Prepared:
    """The dataset, split and (for a model that reads text) item embeddings of cfg; the
    same object for every call of this process with the same data and encoder keys."""
    d, e = cfg.data, cfg.encoder
    key = (d.dataset, str(data_home(d.cache_dir)), d.item_template, d.cold_fraction,
           d.split_seed, d.eval_negatives, d.users, d.tie_order, e.model_dir, e.batch_size,
           e.max_length, uses_text(cfg), extra_widths(cfg), cfg.model.graph_min_items, d.graph,
           d.images, e.vision_dir)
    if key not in _PREPARED:
        ds = load_dataset(d.dataset, d.cache_dir)
        split = population(make_split(ds, d.cold_fraction, d.split_seed, d.eval_negatives,
                                      d.cache_dir, d.tie_order), d.users, d.split_seed)
        emb = (_encode(ds, cfg, progress) if uses_text(cfg)
               else np.zeros((ds.n_items, 0), np.float32))
        extra = extra_tables(cfg, ds.item_ids, Path(ds.source).parent,
                             data_home(d.cache_dir), progress=progress,
                             log=print if progress else (lambda *_: None))
        while len(_PREPARED) >= 4:  # a few configurations per process at most
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = Prepared(ds, split, np.concatenate([emb, extra], 1),
                                  emb.shape[1] if extra.shape[1] else -1)
    return _PREPARED[key]


_PREPARED: dict[tuple, Prepared] = {}
_SPACES: dict[Prepared, dict[str, Space]] = {}


def _encode(ds: Dataset, cfg: Config, progress: bool) -> np.ndarray:
    return embed_texts(ds.item_texts(cfg.data.item_template), data_home(cfg.data.cache_dir),
                       cfg.encoder.model_dir, cfg.encoder.batch_size, cfg.encoder.max_length,
                       progress=progress)
