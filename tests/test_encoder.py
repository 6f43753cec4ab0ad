"""fedrec.data.encoder on a tiny random BERT: order, pooling, normalisation and the disk cache."""

import os
from pathlib import Path

import numpy as np
import pytest

from fedrec.data import encoder
from fedrec.data.encoder import EmbeddingCache, TextEncoder, embed_texts, model_fingerprint
from fedrec.errors import FedrecError

WORDS = ["comedy", "horror", "drama", "night", "party", "ghost", "sunny", "dark", "the", "of"]
TEXTS = ["comedy", "the dark night of the ghost", "sunny party", "horror . drama , comedy",
         "ghost", "the the the the the the the the the the of of of of of", "night , dark"]


def write_bert(root: Path, seed: int = 0) -> Path:
    """A random-initialised BERT (hidden 32, 2 layers) + WordPiece tokenizer, saved in root."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself; 4.x reads vocab_file.
    tokenizer = BertTokenizerFast(vocab={w: k for k, w in enumerate(vocab)},
                                  vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tiny(bert) -> TextEncoder:
    return TextEncoder(str(bert), batch_size=3, max_length=32)


@pytest.fixture(autouse=True)
def fresh_encoders():
    encoder._encoder.cache_clear()
    yield
    encoder._encoder.cache_clear()


def passes(bert: Path) -> int:
    """Forward passes so far of the encoder embed_texts uses for `bert` (defaults)."""
    return encoder._encoder(str(bert), 64, 128).forward_passes


def test_shape_unit_norm_and_no_token_is_unknown(tiny):
    assert tiny.tokenizer.unk_token_id not in tiny.tokenizer(" ".join(WORDS))["input_ids"]
    emb = tiny.encode(TEXTS)
    assert emb.shape == (len(TEXTS), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert tiny.encode([]).shape == (0, 32)


def test_rows_follow_input_order_not_length_order(tiny):
    emb = tiny.encode(TEXTS)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    np.testing.assert_allclose(tiny.encode([TEXTS[i] for i in perm]), emb[perm], atol=1e-6)
    # distinct texts give distinct rows, so a scrambled order cannot pass by accident
    assert np.abs(emb[:, None] - emb[None]).sum(-1)[~np.eye(len(TEXTS), dtype=bool)].min() > 1e-3


def test_mean_pooling_ignores_padding(tiny):
    alone = tiny.encode(["ghost"])
    padded = tiny.encode(["ghost", " ".join(["the dark night"] * 8)])[:1]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    one_by_one = np.concatenate([tiny.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(tiny.encode(TEXTS), one_by_one, atol=1e-5)


def test_warm_cache_does_no_forward_pass_and_returns_the_same(bert, tmp_path):
    first = embed_texts(TEXTS, tmp_path, str(bert))
    before, loaded = passes(bert), encoder._encoder.cache_info().currsize
    second = embed_texts(TEXTS, tmp_path, str(bert))
    assert passes(bert) == before and encoder._encoder.cache_info().currsize == loaded
    np.testing.assert_array_equal(second, first)
    encoder._encoder.cache_clear()  # a new process: no encoder in memory, only the file
    np.testing.assert_array_equal(embed_texts(TEXTS[::-1], tmp_path, str(bert)), first[::-1])
    assert encoder._encoder.cache_info().currsize == 0


def test_a_new_text_is_the_only_one_encoded(bert, tmp_path, monkeypatch):
    embed_texts(TEXTS[:4], tmp_path, str(bert))
    seen = []
    real = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts, progress=False:
                        seen.append(list(texts)) or real(self, texts, progress))
    emb = embed_texts(TEXTS[:4] + ["dark party"], tmp_path, str(bert))
    assert seen == [["dark party"]]
    fresh = TextEncoder(str(bert)).encode(TEXTS[:4] + ["dark party"])
    np.testing.assert_allclose(emb, fresh, atol=1e-6)


@pytest.mark.parametrize("garbage", [b"not a cache", b"PK\x03\x04 torn zip", "truncated", "shape"])
def test_a_corrupt_cache_is_rebuilt_not_trusted(bert, tmp_path, garbage):
    good = embed_texts(TEXTS, tmp_path, str(bert))
    path = EmbeddingCache(tmp_path, model_fingerprint(bert, 128)).path
    if garbage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif garbage == "shape":  # a valid file whose rows do not match its keys
        with open(path, "wb") as f:
            np.savez(f, keys=np.array(["a", "b"]), vectors=np.zeros(3, np.float32))
    else:
        path.write_bytes(garbage)
    assert EmbeddingCache(tmp_path, model_fingerprint(bert, 128)).load() == {}
    before = passes(bert)
    np.testing.assert_allclose(embed_texts(TEXTS, tmp_path, str(bert)), good, atol=1e-6)
    assert passes(bert) > before
    assert len(EmbeddingCache(tmp_path, model_fingerprint(bert, 128)).load()) == len(TEXTS)


def test_an_interrupted_save_leaves_the_old_cache_whole(bert, tmp_path, monkeypatch):
    old = embed_texts(TEXTS[:3], tmp_path, str(bert))
    path = EmbeddingCache(tmp_path, model_fingerprint(bert, 128)).path
    old_bytes = path.read_bytes()

    def torn_savez(file, **arrays):  # writes half a file, then the process is killed
        file.write(old_bytes[: len(old_bytes) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder.np, "savez", torn_savez)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(TEXTS, tmp_path, str(bert))
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    before = passes(bert)
    np.testing.assert_array_equal(embed_texts(TEXTS[:3], tmp_path, str(bert)), old)
    assert passes(bert) == before


def test_cache_key_follows_the_model_not_its_location(tmp_path):
    a = write_bert(tmp_path / "a", seed=0)
    b = write_bert(tmp_path / "b", seed=1)  # same shape and file sizes, other weights
    a_copy = write_bert(tmp_path / "a_copy", seed=0)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_fingerprint(a, 128) != model_fingerprint(b, 128)
    assert model_fingerprint(a, 128) != model_fingerprint(a, 64)
    assert model_fingerprint(a, 128) == model_fingerprint(a_copy, 128)
    emb_a = embed_texts(TEXTS, tmp_path / "cache", str(a))
    emb_b = embed_texts(TEXTS, tmp_path / "cache", str(b))
    assert np.abs(emb_a - emb_b).max() > 1e-2  # b was encoded, not served from a's cache
    np.testing.assert_allclose(emb_b, TextEncoder(str(b)).encode(TEXTS), atol=1e-6)


@pytest.mark.parametrize("make", ["missing", "no-config", "bad-config"])
def test_a_bad_model_dir_names_the_setting(tmp_path, make):
    path = tmp_path / "model"
    if make != "missing":
        path.mkdir()
    if make == "bad-config":
        (path / "config.json").write_text("{not json")
    for load in (lambda: TextEncoder(str(path)), lambda: embed_texts(["x"], tmp_path, str(path))):
        with pytest.raises(FedrecError, match="encoder.model-dir") as err:
            load()
        assert str(path) in str(err.value)


@pytest.mark.slow
def test_real_minilm_gives_unit_384d_vectors_that_group_similar_titles(tmp_path):
    texts = ["Toy Story (1995). Genres: Animation, Children's, Comedy",
             "Toy Story 2 (1999). Genres: Animation, Children's, Comedy",
             "Schindler's List (1993). Genres: Drama, War",
             "Saving Private Ryan (1998). Genres: Action, Drama, War"]
    emb = embed_texts(texts, tmp_path)
    assert emb.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3]) and sim[2, 3] > max(sim[2, 0], sim[2, 1])
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(encoder.default_model_dir(), device="cpu").encode(texts)
    assert np.abs(emb - ref).max() < 1e-5
