"""Shared set-up of every command: dataset -> protocol split -> frozen item embeddings."""

from dataclasses import dataclass

import numpy as np

from fedrec.config import Config
from fedrec.data.datasets import Dataset, data_home, load_dataset
from fedrec.data.encoder import embed_texts
from fedrec.data.protocol import Split, make_split, population


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    split: Split
    item_emb: np.ndarray  # float32 [n_items, text_dim], frozen PLM output


def catalog_vectors(cfg: Config, prepared: Prepared | None = None) -> np.ndarray:
    """The frozen PLM embeddings of the catalog, whatever the model reads: the common
    space of every method's list diversity (fedrec.ranking.diversity). Reuses `prepared`'s when
    it has them; otherwise encodes (cached) without loading the PLM twice."""
    if prepared is not None and prepared.item_emb.shape[1]:
        return prepared.item_emb
    d = cfg.data
    ds = prepared.dataset if prepared is not None else load_dataset(d.dataset, d.cache_dir)
    return embed_texts(ds.item_texts(d.item_template), data_home(d.cache_dir),
                       cfg.encoder.model_dir, cfg.encoder.batch_size, cfg.encoder.max_length)


def prepare(cfg: Config, progress: bool = False, with_text: bool = True) -> Prepared:
    d = cfg.data
    ds = load_dataset(d.dataset, d.cache_dir)
    split = population(make_split(ds, d.cold_fraction, d.split_seed, d.eval_negatives,
                                  d.cache_dir), d.users, d.split_seed)
    if with_text:
        emb = embed_texts(ds.item_texts(d.item_template), data_home(d.cache_dir),
                          cfg.encoder.model_dir, cfg.encoder.batch_size, cfg.encoder.max_length,
                          progress=progress)
    else:
        emb = np.zeros((ds.n_items, 0), np.float32)
    return Prepared(ds, split, emb)
