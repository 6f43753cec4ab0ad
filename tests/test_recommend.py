"""fedrec recommend: unseen items only, best first, explained by history items; every
user mistake is one line on stderr with exit code 2."""


import numpy as np
import pytest

import tiny
from fedrec.data.device import CACHE_DIR, read_catalog, read_history, write_device_dir
from fedrec.errors import FedrecError
from fedrec.ranking.recommend import recommend


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny run directory (random federated parameters) and a device for user u0."""
    root = tiny.build(tmp_path_factory.mktemp("rec"))
    cfg = tiny.tiny_config(root)
    # away from the zero-initialised residuals and ID vectors, so every part matters
    run = tiny.write_run(root, cfg, scale=0.2, seed=0)
    cat = read_catalog(root / "data")
    hist = ["1", "4", "7", "10", "13"]
    dev = write_device_dir(root / "device", cat, hist, [10, 20, 30, 40, 50])
    return root, run, dev, hist


def test_top_k_is_unseen_sorted_and_explained_by_history(setup):
    _, run, dev, hist = setup
    recs = recommend(dev / "history.csv", run, k=8)
    assert [r.rank for r in recs] == list(range(1, 9))
    assert not {r.item for r in recs} & set(hist)
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    for r in recs:
        assert 1 <= len(r.because) <= 3
        assert {iid for iid, _, _ in r.because} <= set(hist)
        weights = [w for _, _, w in r.because]
        assert weights == sorted(weights, reverse=True)
    assert list((dev / CACHE_DIR / "embeddings").glob("*.npz"))  # cached on the device
    # More items than the catalog has left: every unseen item, once.
    everything = recommend(dev / "history.csv", run, k=1000)
    assert len(everything) == tiny.N_ITEMS - len(hist)
    assert [r.item for r in everything[:8]] == [r.item for r in recs]


def test_a_reason_is_the_score_drop_without_that_history_item(setup, tmp_path):
    root, run, dev, hist = setup
    top = recommend(dev / "history.csv", run, k=3)[0]
    reason, _, drop = top.because[0]
    assert drop > 0
    rest = [i for i in hist if i != reason]
    (tmp_path / "history.csv").write_text("item\n" + "".join(f"{i}\n" for i in rest))
    again = {r.item: r.score for r in recommend(tmp_path / "history.csv", run, k=1000,
                                                catalog=root / "data",
                                                cache_dir=dev / CACHE_DIR)}
    logit = np.log(top.score / (1 - top.score))
    logit_without = np.log(again[top.item] / (1 - again[top.item]))
    assert logit - logit_without == pytest.approx(drop, abs=1e-4)


def test_a_single_history_item_explains_everything(setup, tmp_path):
    root, run, dev, _ = setup
    (tmp_path / "history.csv").write_text("item,timestamp\n42,1\n")
    recs = recommend(tmp_path / "history.csv", run, k=3, catalog=root / "data",
                     cache_dir=dev / CACHE_DIR)
    assert all([iid for iid, _, _ in r.because] == ["42"] for r in recs)
    assert not (tmp_path / CACHE_DIR).exists()  # the given cache was used


def test_history_without_timestamps_uses_file_order(setup, tmp_path):
    root, _, _, _ = setup
    (tmp_path / "history.csv").write_text("item\n7\n3\n7\n")
    cat = read_catalog(root / "data")
    assert [cat.item_ids[i] for i in read_history(tmp_path / "history.csv", cat)] == ["7", "3"]


def test_cli_prints_a_table_with_reasons(setup, run_cli):
    _, run, dev, _ = setup
    code, out, err = run_cli("recommend", "--history",
                             str(dev / "history.csv"), "--model", str(run), "-k", "5")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 5
    expected = recommend(dev / "history.csv", run, k=5)
    for line, r in zip(rows, expected):
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        assert cells[:2] == [str(r.rank), r.item] and float(cells[3]) == pytest.approx(r.score,
                                                                                         abs=1e-3)
        assert f"[{r.because[0][0]}]" in cells[4] and r.because[0][1] in cells[4]


@pytest.mark.parametrize("case, message", [
    ("missing", "history file not found"),
    ("empty", "file is empty"),
    ("unknown", "item 'nope' is not in the catalog"),
    ("no-final", "has no final.safetensors"),
    ("k", "-k must be >= 1"),
])
def test_cli_errors_are_one_line_exit_2(setup, run_cli, tmp_path, case, message):
    _, run, dev, _ = setup
    history, model, k = dev / "history.csv", run, "3"
    if case == "missing":
        history = tmp_path / "nothing.csv"
    elif case == "empty":
        history = tmp_path / "history.csv"
        history.write_text("")
    elif case == "unknown":
        history = tmp_path / "history.csv"
        history.write_text("item,timestamp\n1,1\nnope,2\n")
    elif case == "no-final":
        model = tmp_path / "half-run"
        model.mkdir()
        (model / "run_config.json").write_bytes((run / "run_config.json").read_bytes())
    else:
        k = "0"
    code, out, err = run_cli("recommend", "--history", str(history),
                             "--model", str(model), "-k", k, "--catalog", str(dev))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.strip()


def test_library_rejects_parameters_of_another_catalog(setup, tmp_path):
    root, run, _, _ = setup
    cat = read_catalog(root / "data")
    keep = np.arange(0, 30)  # half the catalog: the id-free text model still fits...
    small = type(cat)([cat.item_ids[i] for i in keep], [cat.item_fields[i] for i in keep],
                      cat.cold[keep], cat.source)
    small_dev = write_device_dir(tmp_path / "d", small, ["1", "2"], [1, 2])
    text_only = tiny.write_run(tmp_path / "text", tiny.tiny_config(
        root, {"model.id-embeddings": False}), 0.05, 0)
    assert recommend(small_dev / "history.csv", text_only, k=3)  # text models are catalog-free
    cfg_run = run  # ... but a hybrid with per-item rows does not
    with pytest.raises(FedrecError, match="do not fit this catalog"):
        recommend(small_dev / "history.csv", cfg_run, k=3)


def test_a_model_whose_user_vectors_stay_on_the_devices_is_refused_in_one_line(
        setup, run_cli, tmp_path):
    """FedMF: h_u is each device's user-local vector, not in the run directory."""
    root, _, dev, _ = setup
    run = tiny.write_run(tmp_path, tiny.tiny_config(root, {"model.kind": "fedmf"}), 0.0, 0)
    with pytest.raises(FedrecError, match="user vectors stay on the devices"):
        recommend(dev / "history.csv", run)
    code, out, err = run_cli("recommend", "--history", str(dev / "history.csv"),
                             "--model", str(run), "--catalog", str(dev))
    assert code == 2 and "user vectors stay on the devices" in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.strip()


def test_recommend_and_explain_eval_use_a_centrally_trained_model(tmp_path, run_cli, monkeypatch):
    """`fedrec train-central --save-dir DIR` keeps the best model as a run directory, which
    recommend, explain-eval, diversity-curve and audit read like a federated one."""
    import json

    from fedrec.federation.simulate import write_overrides

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    root = tiny.build(tmp_path / "tiny")
    conf = write_overrides(tmp_path / "tiny.toml", tiny.tiny_config(
        root, {"central.epochs": 3}).to_flat())
    code, out, err = run_cli("train-central", "--config", str(conf), "--seeds", "0",
                             "--save-dir", str(tmp_path / "central"), "--quiet")
    assert code == 0, err
    model = tmp_path / "central"
    assert (model / "final.safetensors").is_file() and (model / "run_config.json").is_file()
    dev = write_device_dir(tmp_path / "dev", read_catalog(root / "data"), ["1", "4", "7"],
                           [1, 2, 3])
    code, out, err = run_cli("recommend", "--history", str(dev / "history.csv"), "--model",
                             str(model), "-k", "3")
    assert code == 0, err
    assert out.count("because of") == 1 and "1    " in out
    for cmd in (["explain-eval", "--users", "3"], ["diversity-curve", "--lambdas", "0,0.1"],
                ["audit", "--users", "2", "--epsilons", "inf"]):
        code, _, err = run_cli(*cmd, "--model", str(model), "--json", str(tmp_path / "o.json"))
        assert code == 0, (cmd, err)
        assert json.loads((tmp_path / "o.json").read_text())["method"]
    # several seeds: one run directory each
    code, _, err = run_cli("train-central", "--config", str(conf), "--seeds", "0,1",
                           "--save-dir", str(tmp_path / "two"), "--quiet")
    assert code == 0 and sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["seed-0", "seed-1"]


def test_an_item_added_after_training_is_ranked_by_its_text(tmp_path, monkeypatch, run_cli):
    """A catalog that grew after training: every trained item keeps its exact score (its
    ID rows are found by item id, not position) and the new item, a text twin of a liked
    item the history lacks, is scored through its text and the learned text-to-ID map,
    in the upper half of the list; `fedrec recommend` lists it."""
    import shutil

    import torch

    from fedrec.data.device import item_embeddings
    from fedrec.data.pipeline import prepare
    from fedrec.models.central import train_central
    from fedrec.models.saved import load_model, save_model

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    root = tiny.build(tmp_path / "tiny")
    cfg = tiny.tiny_config(root, {"central.epochs": 15})
    p = prepare(cfg)
    out = train_central(cfg, p.split, p.item_emb, log=lambda _: None)
    run = save_model(tmp_path / "run", cfg, out["model"], p.dataset.item_ids, p.split.released)
    # A Horror fan's history of Horror classics (ids 31, 34, ...); item 46 is one too.
    hist = ["31", "34", "37", "40", "43"]
    twin = "46"
    grown = tmp_path / "grown"
    shutil.copytree(root / "data", grown)
    rows = (grown / "items.csv").read_text().splitlines()
    line = next(r for r in rows if r.startswith(f"{twin},"))
    (grown / "items.csv").write_text("\n".join(rows + ["61" + line[len(twin):]]) + "\n")
    dev = write_device_dir(tmp_path / "dev", read_catalog(root / "data"), hist, [1, 2, 3, 4, 5])
    old = {r.item: r.score for r in recommend(dev / "history.csv", run, k=100,
                                              catalog=root / "data")}
    new = recommend(dev / "history.csv", run, k=100, catalog=grown,
                    cache_dir=tmp_path / "cache2")
    scores = {r.item: r.score for r in new}
    assert set(scores) == set(old) | {"61"}
    assert all(scores[i] == pytest.approx(s, abs=1e-6) for i, s in old.items())
    assert scores["61"] > np.median(list(old.values()))  # in the upper half, by its text
    at = [r.item for r in new].index("61") + 1
    code, out, err = run_cli("recommend", "--history", str(dev / "history.csv"), "--model",
                             str(run), "--catalog", str(grown), "--cache-dir",
                             str(tmp_path / "cache2"), "-k", str(at))
    assert code == 0, err
    last = [line.split("│")[1:3] for line in out.splitlines() if line.startswith("│")][-1]
    assert [c.strip() for c in last] == [str(at), "61"]  # the new item, at its rank
    # Its item vector is exactly its twin's were the twin new too: its text alone.
    cat = read_catalog(grown)
    E = torch.from_numpy(item_embeddings(cfg, cat, tmp_path / "cache2"))
    twin_new = np.isin(cat.item_ids, [twin])
    _, model = load_model(run, E.shape[1], cat.item_ids, twin_new)
    h, b = model.eval().item_table(E)
    a, t = cat.item_ids.index("61"), cat.item_ids.index(twin)
    assert torch.allclose(h[a], h[t], atol=1e-6) and torch.allclose(b[a], b[t], atol=1e-6)
    _, model = load_model(run, E.shape[1], cat.item_ids)
    h2, _ = model.eval().item_table(E)
    assert not torch.allclose(h2[a], h2[t], atol=1e-3)  # the known twin: its own trained ID vector
