"""Shared builders for tests: a tiny dataset with learnable structure and a tiny random BERT.

Everything is generated on the fly into a temp directory (no network, no user cache):

- ``data/``: the generic layout (interactions.csv + items.csv). Two genres, two user
  groups: even users mostly watch Comedy, odd users mostly Horror, and the titles use
  genre-specific words, so even a random-initialised PLM gives item texts that separate
  the genres and a model can learn the preference in a few epochs. One extra user has
  only 2 interactions, so it trains but has no validation/test item.
- ``bert/``: a randomly initialised BERT (hidden 32, 2 layers) with a matching
  WordPiece vocabulary, saved with save_pretrained like any Hugging Face model directory.
- ``cache/``: data.cache-dir (splits and embedding cache).
"""

from pathlib import Path

import numpy as np

from fedrec.config import Config, load_defaults

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
TITLE_GENRE_WORDS, TITLE_FILLER_WORDS = 2, 4
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def genre_of(item: int) -> str:
    """Genre of internal item index `item` (ids are 1..N_ITEMS, sorted numerically)."""
    return "Comedy" if item < N_ITEMS // 2 else "Horror"


def write_dataset(root: Path, seed: int = 0) -> Path:
    """interactions.csv + items.csv under root; returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(N_ITEMS):
        words = list(rng.choice(GENRE_WORDS[genre_of(i)], size=TITLE_GENRE_WORDS, replace=False))
        words += list(rng.choice(FILLER, size=TITLE_FILLER_WORDS, replace=False))
        words = rng.permutation(words)
        items.append((str(i + 1), " ".join(words).title(), str(1980 + i % 20), genre_of(i)))
    (root / "items.csv").write_text("item,title,year,genres\n" + "".join(
        f'{iid},"{title}",{year},"{genres}"\n' for iid, title, year, genres in items))
    half = N_ITEMS // 2
    # Popularity within each genre (Zipf-like): a second, easier signal on top of the genre.
    pop = 1.0 / np.arange(1, half + 1) ** 0.7
    rows = []
    for u in range(N_USERS):
        own = 0 if u % 2 == 0 else half
        n = int(rng.integers(8, 16))
        n_other = int(rng.binomial(n, 0.1))
        mine = own + rng.choice(half, size=n - n_other, replace=False, p=pop / pop.sum())
        other = (half - own) + rng.choice(half, size=n_other, replace=False)
        seq = rng.permutation(np.concatenate([mine, other]))
        # Time order ends with an own-genre item, so val/test follow the user's taste.
        seq = np.concatenate([[x for x in seq if x not in mine[-2:]], mine[-2:]])
        rows += [(f"u{u}", str(int(i) + 1), 1000 * u + 10 * t) for t, i in enumerate(seq)]
    rows += [("u99", "1", 99000), ("u99", "2", 99010)]  # train-only user: no val/test
    (root / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return root


def vocabulary() -> list[str]:
    words = [w for ws in GENRE_WORDS.values() for w in ws]
    words += [g.lower() for g in GENRE_WORDS] + ["genres", "(", ")", ".", ",", ":"]
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
    # pooled embedding; without them the embedding reflects the words (here: the genre).
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
    "data.eval-negatives": 20,
    "data.item-template": "{title}. {genres}",  # the year tokens only blur the genres
    "data.cold-fraction": 0.1,
    "encoder.max-length": 32,
    "model.dim": 16,
    "model.hidden": 32,
    "model.dropout": 0.0,
    "train.lr": 0.01,
    "train.batch-size": 32,
    "train.negatives": 4,
    "central.epochs": 8,
    "central.patience": 100,
    "fed.num-rounds": 3,
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
