"""Shared builders for tests: a tiny dataset with learnable structure and a tiny random BERT.

Everything is generated on the fly into a temp directory (no network, no user cache):

- ``data/``: the generic layout (interactions.csv + items.csv), 12 users x 8-15
  interactions over 60 items. Two genres, two user groups: even users mostly watch
  Comedy, odd users Horror; every third item is a "Classic" (in its genres) and every
  user leans to classics; each user's validation and test items are classics of their
  own genre. Titles mix two genre words with two shared filler words. The untrained
  model (near-identity adapters) ranks by text similarity, which gets the genre but not
  the classics; the classics are a signal in the text shared by all users, which FedAvg
  learns within a few rounds even from one-user clients. One more user has only 2
  interactions: it trains, but has no validation/test item.
- ``bert/``: a randomly initialised BERT (hidden 32, 2 layers) with a matching
  WordPiece vocabulary, saved with save_pretrained like any Hugging Face model directory.
- ``cache/``: data.cache-dir (splits and embedding cache).
"""

from pathlib import Path

import numpy as np

from fedrec.config import Config, load_defaults
from fedrec.federation.inprocess import InProcessGrid

N_USERS = 12          # regular users (plus one light user with 2 interactions)
N_ITEMS = 60          # half Comedy, half Horror
HIDDEN = 32           # the tiny PLM's hidden size = item text embedding dim
GENRE_WORDS = {
    "Comedy": ["sunny", "happy", "party", "laugh", "holiday", "wedding", "picnic", "silly",
               "bubble", "carnival"],
    "Horror": ["dark", "blood", "night", "grave", "ghost", "shadow", "scream", "crypt",
               "curse", "hollow"],
}
FILLER = [f"w{k:03d}" for k in range(40)]
TITLE_GENRE_WORDS, TITLE_FILLER_WORDS = 2, 2
OTHER_GENRE_WEIGHT, CLASSIC_WEIGHT, CLASSIC_EVERY = 0.15, 10.0, 3
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def genre_of(item: int) -> str:
    """Genre of internal item index `item` (ids are 1..N_ITEMS, sorted numerically)."""
    return "Comedy" if item < N_ITEMS // 2 else "Horror"


def is_classic(item: int) -> bool:
    """Every CLASSIC_EVERY-th item is a 'Classic' (said in its genres); all users like them."""
    return item % CLASSIC_EVERY == 0


def write_dataset(root: Path, seed: int = 0) -> Path:
    """interactions.csv + items.csv under root; returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(N_ITEMS):
        words = list(rng.choice(GENRE_WORDS[genre_of(i)], size=TITLE_GENRE_WORDS, replace=False))
        words += list(rng.choice(FILLER, size=TITLE_FILLER_WORDS, replace=False))
        genres = genre_of(i) + (", Classic" if is_classic(i) else "")
        items.append((str(i + 1), " ".join(rng.permutation(words)).title(),
                      str(1980 + i % 20), genres))
    (root / "items.csv").write_text("item,title,year,genres\n" + "".join(
        f'{iid},"{title}",{year},"{genres}"\n' for iid, title, year, genres in items))
    genre = np.array([genre_of(i) for i in range(N_ITEMS)])
    classic = np.array([is_classic(i) for i in range(N_ITEMS)])
    rows = []
    for u in range(N_USERS):
        own = genre == ("Comedy" if u % 2 == 0 else "Horror")
        # val and test (the last two) are classics of the user's own genre ...
        held = rng.choice(np.flatnonzero(own & classic), size=2, replace=False)
        # ... and the history leans the same way: own genre, classics.
        w = np.where(own, 1.0, OTHER_GENRE_WEIGHT) * np.where(classic, CLASSIC_WEIGHT, 1.0)
        w[held] = 0.0
        n = int(rng.integers(6, 14))
        hist = rng.choice(N_ITEMS, size=n, replace=False, p=w / w.sum())
        seq = np.concatenate([hist, held])
        rows += [(f"u{u}", str(int(i) + 1), 1000 * u + 10 * t) for t, i in enumerate(seq)]
    rows += [("u99", "1", 99000), ("u99", "32", 99010)]  # train-only user: no val/test
    (root / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return root


def vocabulary() -> list[str]:
    words = [w for ws in GENRE_WORDS.values() for w in ws]
    words += [g.lower() for g in GENRE_WORDS] + ["classic", "genres", "(", ")", ".", ",", ":"]
    words += [str(y) for y in range(1980, 2000)]
    words += [f"w{k:03d}" for k in range(200)]  # FILLER and more: a few hundred tokens
    return SPECIAL + words


def write_bert(root: Path, seed: int = 0) -> Path:
    """A random-initialised tiny BERT + WordPiece tokenizer saved in root; returns root."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself; 4.x reads vocab_file.
    tokenizer = BertTokenizerFast(vocab={w: k for k, w in enumerate(vocab)},
                                  vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    if tokenizer.unk_token_id in tokenizer("genres: comedy")["input_ids"]:
        raise RuntimeError("tiny BERT tokenizer did not pick up its vocabulary")
    config = BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = BertModel(config)
    # Random position embeddings are shared by every text and would dominate its mean
    # pooled embedding; without them the embedding reflects the words of the text.
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def build(root: Path) -> Path:
    """Create data/, bert/ and cache/ under root once (idempotent); returns root."""
    root = Path(root)
    if not (root / "data" / "interactions.csv").is_file():
        write_dataset(root / "data")
    if not (root / "bert" / "config.json").is_file():
        write_bert(root / "bert")
    (root / "cache").mkdir(exist_ok=True)
    return root


# Small and fast, yet enough for the model to learn the tiny data's structure.
TINY = {
    "model.max-len": 8, "model.layers": 2, "model.heads": 2,
    "data.eval-negatives": 40,
    "data.item-template": "{title}. {genres}",  # year tokens would only add noise
    "data.cold-fraction": 0.1,
    "encoder.max-length": 32,
    "model.dim": 32,  # = the PLM width: the adapters start as the identity (text similarity)
    "model.hidden": 32,
    "model.dropout": 0.0,
    "train.optimizer": "adam", "train.lr": 0.01,  # a few steps must move the tiny model
    "fed.server-lr": 0.05,  # FedAdam: a few rounds must move the model visibly
    "fed.server-lr-warmup": 0, "fed.server-lr-decay": "none",  # runs of a few rounds
    "train.batch-size": 8,  # one window of model.max-len per step
    "train.local-epochs": 2,
    "central.epochs": 10,
    "central.patience": 100,
    "central.batch-size": 32,
    "central.lr": 0.01,
    "fed.num-rounds": 6,
    "fed.clients-per-round": 6,
    "fed.eval-every": 1,
}


def tiny_config(root: Path, overrides: dict | None = None) -> Config:
    """Defaults from pyproject + TINY + overrides, pointing at the tiny data and PLM in root."""
    root = build(root)
    flat = {**load_defaults(), **TINY,
            "data.dataset": str(root / "data"), "data.cache-dir": str(root / "cache"),
            "encoder.model-dir": str(root / "bert"), "fed.run-dir": str(root / "run"),
            **(overrides or {})}
    return Config.from_flat(flat)


def vectors(arr, width: int) -> np.ndarray:
    """Every length-`width` vector in `arr`: along each axis of that length, and its flat
    consecutive chunks. For "is this vector anywhere in that upload?" checks."""
    arr = np.asarray(arr, np.float64)
    out = [np.moveaxis(arr, ax, -1).reshape(-1, width)
           for ax in range(arr.ndim) if arr.shape[ax] == width]
    if arr.size % width == 0:
        out.append(arr.reshape(-1, width))
    return np.concatenate(out) if out else np.zeros((0, width))


def holding(arrays: dict, vec, rtol: float = 1e-4, atol: float = 1e-6) -> list[str]:
    """Names of the arrays that contain `vec` (up to float tolerance) as one of vectors()."""
    vec = np.asarray(vec, np.float64)
    return [k for k, a in arrays.items()
            if np.isclose(vectors(a, len(vec)), vec, rtol=rtol, atol=atol).all(axis=1).any()]


class Killed(Exception):
    """The process dies: raised by the grid, outside any client."""


class Dying(InProcessGrid):
    """Dies at message `after` + 1 of (kind, round): `after` devices have handled it
    already (after=0: before any device of that round trains)."""

    def __init__(self, *args, at: tuple[str, int], after: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.after, self.seen = at, after, 0

    def _call(self, msg):
        if (msg.metadata.message_type, int(msg.content["config"]["server-round"])) == self.at:
            self.seen += 1
            if self.seen > self.after:
                raise Killed(self.at)
        return super()._call(msg)


def run_inprocess(cfg: Config, grid=None) -> tuple[object, dict]:
    """The real ServerApp main and ClientApp in this process (InProcessGrid unless `grid`
    is given); returns (grid, results.json of cfg's fed.run-dir)."""
    import json

    from flwr.app import Context, RecordDict

    import clients.app
    import server.app
    from fedrec.data.pipeline import prepare

    flat = cfg.to_flat()
    if grid is None:
        grid = InProcessGrid(clients.app.app, flat, prepare(cfg).split.n_users)
    server.app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=flat))
    return grid, json.loads((Path(cfg.fed.run_dir) / "results.json").read_text())


def write_run(root: Path, cfg: Config, scale: float, seed: int) -> Path:
    """A run directory root/run as a finished run leaves it (final.safetensors,
    run_config.json), holding cfg's model moved away from its init by scale * N(0, 1)."""
    import torch

    from fedrec.models.build import build_model
    from fedrec.models.saved import save_model

    torch.manual_seed(seed)
    model = build_model(cfg, HIDDEN, N_ITEMS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return save_model(root / "run", cfg, model)
