"""Dataset readers on tiny generated files: the three layouts agree, bad input fails well."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.data import fetch
from fedrec.data.datasets import (
    GROUPLENS_GENRES,
    Dataset,
    load_dataset,
    read_atomic,
    read_generic,
    read_grouplens,
    render_texts,
)
from fedrec.data.fetch import fetch_ml100k
from fedrec.data.protocol import make_split
from fedrec.errors import FedrecError

TEMPLATE = "{title} ({year}). Genres: {genres}"
ITEMS = {"1": ("Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
         "2": ("Café au lait", "1993", ["Comedy"]),      # non-ASCII: latin-1 vs UTF-8
         "10": ("Heat", "1995", ["Action", "Crime", "Thriller"]),
         "3": ("Unknown year", "", [])}
# (user, item, timestamp) in deliberately scrambled file order; (7, 2) is repeated.
INTER = [("7", "10", 50), ("12", "1", 10), ("7", "2", 30), ("2", "1", 5), ("7", "1", 40),
         ("12", "2", 10), ("7", "2", 60), ("2", "3", 7), ("12", "10", 20)]


@pytest.fixture(autouse=True)
def fedrec_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_grouplens(root: Path, inter=INTER, items=ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for iid, (title, year, genres) in items.items():
        flags = "|".join("1" if g in genres else "0" for g in GROUPLENS_GENRES)
        full = f"{title} ({year})" if year else title
        lines.append(f"{iid}|{full}|01-Jan-{year or 1990}||http://x|{flags}")
    (root / "u.item").write_bytes("\n".join(lines).encode("latin-1"))
    (root / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in inter))
    return root


def write_atomic(root: Path, name="toy", inter=INTER, items=ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in inter))
    (root / f"{name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t{y}\t{' '.join(g)}\n" for i, (t, y, g) in reversed(items.items())))
    return root


def write_generic(root: Path, jsonl=False, inter=INTER, items=ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in inter))
    if jsonl:
        (root / "items.jsonl").write_text("".join(
            json.dumps({"item": int(i), "title": t, "year": y, "genres": g}) + "\n"
            for i, (t, y, g) in items.items()))
    else:
        (root / "items.csv").write_text("item,title,year,genres\n" + "".join(
            f'{i},"{t}",{y},"{", ".join(g)}"\n' for i, (t, y, g) in items.items()))
    return root


def same(a: Dataset, b: Dataset) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert a.item_fields == b.item_fields
    for name in ("users", "items", "times"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.fingerprint() == b.fingerprint()


def test_three_layouts_read_to_the_same_dataset(tmp_path):
    gl = read_grouplens(write_grouplens(tmp_path / "gl"))
    same(gl, read_atomic(write_atomic(tmp_path / "at"), "toy"))
    same(gl, read_generic(write_generic(tmp_path / "csv")))
    same(gl, read_generic(write_generic(tmp_path / "jsonl", jsonl=True)))
    same(gl, load_dataset(str(tmp_path / "at")))
    assert gl.user_ids == ["2", "7", "12"]              # numeric order, not file order
    assert gl.item_ids == ["1", "2", "3", "10"]
    # user "7": items 2@30 (the repeat @60 dropped), 1@40, 10@50, in time order
    assert gl.users.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert gl.items.tolist() == [0, 2, 1, 0, 3, 0, 1, 3]
    assert gl.times.tolist() == [5, 7, 30, 40, 50, 10, 10, 20]


def test_item_template_renders(tmp_path):
    ds = read_grouplens(write_grouplens(tmp_path / "gl"))
    texts = ds.item_texts(TEMPLATE)
    assert texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert texts[1] == "Café au lait (1993). Genres: Comedy"
    assert texts[2] == "Unknown year (). Genres:"  # whitespace collapsed
    assert render_texts([{"a": "x  y"}], "<{a}>") == ["<x y>"]


def test_grouplens_and_atomic_copies_give_the_same_split(tmp_path, fedrec_home):
    gl = read_grouplens(write_grouplens(tmp_path / "toy"))
    at = read_atomic(write_atomic(tmp_path / "at"), "toy")
    a, b = (make_split(ds, 0.25, 0, 2) for ds in (gl, at))
    assert gl.fingerprint() == at.fingerprint() and gl.name == at.name == "toy"
    for name in ("train_items", "val", "test", "cold", "test_negatives"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert len(list((fedrec_home / "splits").glob("*.npz"))) == 1  # one cache entry


def test_duplicate_interactions_keep_the_first(tmp_path):
    inter = [("1", "1", 1), ("1", "2", 2), ("1", "1", 3), ("1", "1", 1)]
    ds = read_generic(write_generic(tmp_path, inter=inter))
    assert ds.items.tolist() == [0, 1] and ds.times.tolist() == [1, 2]


def error(root_fn, *parts):
    with pytest.raises(FedrecError) as info:
        root_fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def test_bad_input_messages(tmp_path):
    def generic(name, inter="user,item,timestamp\n1,1,5\n", items="item,title\n1,A\n",
                items_name="items.csv"):
        root = tmp_path / name
        root.mkdir()
        if inter is not None:
            (root / "interactions.csv").write_bytes(inter if isinstance(inter, bytes)
                                                    else inter.encode())
        if items is not None:
            (root / items_name).write_bytes(items if isinstance(items, bytes) else items.encode())
        return lambda: load_dataset(str(root))

    error(generic("missing", items=None), "items.csv: file not found", "README")
    error(generic("empty", inter=""), "interactions.csv: file is empty", "re-create")
    error(generic("blank", inter=",,\n  \n"), "interactions.csv: no rows")
    error(generic("header", inter="user,item,timestamp\n"), "interactions.csv: no interactions",
          "only a header", "add one row")
    error(generic("noitems", items="item,title\n"), "items.csv: lists no items")
    error(generic("tabs", inter="user\titem\ttimestamp\n1\t1\t5\n"),
          "interactions.csv: missing column 'user'", "separated by ','")
    error(generic("column", inter="user,item,time\n1,1,5\n"),
          "interactions.csv: missing column 'timestamp'")
    error(generic("time", inter="user,item,timestamp\n1,1,5\n2,1,yesterday\n"),
          "interactions.csv:3: field 'timestamp'", "'yesterday'", "Unix seconds")
    error(generic("inf", inter="user,item,timestamp\n1,1,inf\n"), "interactions.csv:2")
    error(generic("short", inter="user,item,timestamp\n1,1\n"), "interactions.csv:2",
          "check the delimiter")
    error(generic("unknown", inter="user,item,timestamp\n1,1,5\n1,99,6\n1,98,7\n"),
          "interactions.csv:3: item id '99' is not in items.csv", "(2 such rows)", "add the items")
    error(generic("dup", items="item,title\n1,A\n2,B\n1,C\n"),
          "items.csv:4: item id '1' is listed twice", "keep one row")
    error(generic("ragged", items="item,title\n1,A,extra\n"), "items.csv:2: expected 2 fields")
    error(generic("latin", items="item,title\n1,Caf\xe9\n".encode("latin-1")),
          "items.csv: not valid utf-8 (byte 16)", "re-save")
    error(generic("json", items='{"item": 1}\n{"item": 2\n', items_name="items.jsonl"),
          "items.jsonl:2: not valid JSON")
    error(generic("jsonkey", items='{"item": 1}\n["x"]\n', items_name="items.jsonl"),
          "items.jsonl:2: each line needs an object with key 'item'")
    error(generic("fields", items='{"item": 1, "a": 1}\n{"item": 2}\n',
                  items_name="items.jsonl"), "items.jsonl:2: item '2' has fields")
    error(generic("quote", inter='user,item,timestamp\n1,1,5\n"2,1,6\n'),
          "interactions.csv")  # unterminated quote: swallowed or reported, never a crash
    ds = generic("template")()
    error(lambda: ds.item_texts("{title} {plot}"), "data.item-template", "items.csv",
          "field 'plot'", "use one of: title")
    error(lambda: ds.item_texts("{title"), "data.item-template", "not a valid template")
    error(lambda: load_dataset("ml-1m"), "data.dataset: 'ml-1m'", "fedrec data fetch ml-1m")
    error(lambda: load_dataset(""), "data.dataset: empty")
    error(lambda: load_dataset(str(tmp_path / "absent")), "neither a directory")
    (tmp_path / "nothing").mkdir()
    error(lambda: load_dataset(str(tmp_path / "nothing")), "no known layout")


def test_bad_grouplens_and_atomic(tmp_path):
    root = write_grouplens(tmp_path / "gl")
    (root / "u.data").write_text("1,1,4,5\n")
    error(lambda: read_grouplens(root), "u.data:1: expected at least 4 fields",
          "check the delimiter")
    (root / "u.item").write_text("1,Toy Story (1995)\n")
    error(lambda: read_grouplens(root), "u.item:1: expected 24 '|'-separated fields")
    (root / "u.item").unlink()
    error(lambda: read_grouplens(root), "u.item: file not found", "fedrec data fetch ml-100k")
    root = write_atomic(tmp_path / "at")
    (root / "toy.item").write_text("item_id:token\tmovie_title:token_seq\n1\tA\tB\n")
    error(lambda: read_atomic(root, "toy"), "toy.item:2: expected 2 tab-separated fields")
    (root / "toy.inter").write_text("user_id:token\titem:token\n")
    error(lambda: read_atomic(root, "toy"), "toy.inter: missing column 'item_id'")


# ---------------------------------------------------------------- fetching (never online)

def fake_recbole(tmp):
    write_atomic(tmp, "ml-100k")


def test_fetch_uses_recbole_without_touching_grouplens(monkeypatch, fedrec_home):
    monkeypatch.setattr(fetch, "_fetch_recbole", fake_recbole)
    monkeypatch.setattr(fetch, "_fetch_grouplens", lambda tmp: pytest.fail("waited on GroupLens"))
    dest = fetch_ml100k()
    assert dest == fedrec_home / "ml-100k" and load_dataset("ml-100k").n_users == 3
    assert [p.name for p in fedrec_home.iterdir()] == ["ml-100k"]  # no temp dirs left
    monkeypatch.setattr(fetch, "_fetch_recbole", lambda tmp: pytest.fail("refetched"))
    assert fetch_ml100k() == dest  # a valid copy is kept


def test_fetch_failure_leaves_nothing_half_written(monkeypatch, fedrec_home):
    def partial(tmp):
        (tmp / "ml-100k.inter").write_text("user_id:token\n")
        raise OSError("connection reset")

    def interrupted(tmp):
        (tmp / "u.data").write_text("1\t1\t1\t1\n")
        raise RuntimeError("no route to host")

    monkeypatch.setattr(fetch, "_fetch_recbole", partial)
    monkeypatch.setattr(fetch, "_fetch_grouplens", interrupted)
    msg = error(fetch_ml100k, "recbole: connection reset", "grouplens: no route to host",
                str(fedrec_home / "ml-100k"))
    assert "check network" in msg and list(fedrec_home.iterdir()) == []
    monkeypatch.setattr(fetch, "_fetch_recbole", lambda tmp: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fetch_ml100k(source="recbole")
    assert list(fedrec_home.iterdir()) == []
    error(lambda: fetch_ml100k(source="kaggle"), "--source: 'kaggle'")


def test_fetch_replaces_a_corrupt_copy_and_falls_back(monkeypatch, fedrec_home):
    (fedrec_home / "ml-100k").mkdir(parents=True)
    (fedrec_home / "ml-100k" / "ml-100k.inter").write_text("garbage")
    monkeypatch.setattr(fetch, "_fetch_recbole", lambda tmp: (tmp / "x.inter").write_text("x"))
    monkeypatch.setattr(fetch, "_fetch_grouplens", lambda tmp: write_grouplens(tmp))
    dest = fetch_ml100k()
    assert sorted(p.name for p in dest.iterdir()) == ["u.data", "u.item"]
    assert [p.name for p in fedrec_home.iterdir()] == ["ml-100k"]


# ---------------------------------------------------------------- property tests

def check_valid(ds: Dataset) -> None:
    n = len(ds.users)
    assert n > 0 and len(ds.items) == len(ds.times) == n
    assert ds.users.dtype == ds.items.dtype == np.int64 and ds.times.dtype == np.float64
    assert len(set(ds.user_ids)) == ds.n_users and len(set(ds.item_ids)) == ds.n_items
    assert len(ds.item_fields) == ds.n_items
    assert set(np.unique(ds.users).tolist()) == set(range(ds.n_users))  # no empty users
    assert ds.items.min() >= 0 and ds.items.max() < ds.n_items
    assert np.isfinite(ds.times).all()
    order = np.lexsort((ds.times, ds.users))
    assert np.array_equal(ds.users[order], ds.users) and np.array_equal(ds.times[order], ds.times)
    assert len(np.unique(ds.users * ds.n_items + ds.items)) == n
    ds.fingerprint()


def read_or_fail(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "gen"
        root.mkdir()
        for name, blob in files.items():
            (root / name).write_bytes(blob)
        try:
            ds = load_dataset(str(root))
        except FedrecError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        check_valid(ds)
        try:
            ds.item_texts(" ".join("{" + k + "}" for k in ds.item_fields[0]))
        except FedrecError:
            pass


IDS = st.sampled_from(["1", "2", "3", "10", "01", "a", " 2", "x y", "é", '"1"'])
TIME = st.one_of(st.integers(-5, 50).map(str), st.integers(0, 9).map(str),
                 st.sampled_from(["1.5", "1e3", " 7", "nan", "x", ""]))
GARBAGE = st.one_of(st.text(alphabet=',"\t|\n\r é\x00:{}[]1', max_size=8),
                    st.binary(max_size=8).map(lambda b: b.decode("latin-1")))


@st.composite
def files(draw, layout):
    """Consistent files for `layout`, then maybe one corruption (garbage, cut, dup line)."""
    items = draw(st.lists(IDS, min_size=1, max_size=5, unique=True))
    users = st.sampled_from(["1", "2", "10", "u", "09"])
    inter = draw(st.lists(st.tuples(users, st.sampled_from(items), TIME), min_size=1,
                          max_size=8))
    titles = st.text(alphabet="ab ,|\t\"é", max_size=4)
    if layout == "grouplens":
        out = {"u.data": "\n".join(f"{u}\t{i}\t1\t{t}" for u, i, t in inter),
               "u.item": "\n".join(f"{i}|{draw(titles)} (1999)|d||url" + "|0" * 19
                                   for i in items)}
    elif layout == "atomic":
        out = {"g.inter": "user_id:token\titem_id:token\ttimestamp:float\n"
                          + "\n".join("\t".join(r) for r in inter),
               "g.item": "item_id:token\ttitle:token_seq\n"
                         + "\n".join(f"{i}\t{draw(titles)}" for i in items)}
    else:
        out = {"interactions.csv": "user,item,timestamp\n" + "\n".join(",".join(r) for r in inter)}
        if layout == "jsonl":
            value = st.one_of(st.none(), st.integers(), titles, st.lists(titles, max_size=2))
            out["items.jsonl"] = "\n".join(json.dumps({"item": i, "title": draw(value)})
                                           for i in items)
        else:
            out["items.csv"] = "item,title\n" + "\n".join(f"{i},{draw(titles)}" for i in items)
    name = draw(st.sampled_from(sorted(out)))
    lines = out[name].split("\n")
    at = draw(st.integers(0, len(lines) - 1))
    kind = draw(st.sampled_from(["none", "none", "none", "line", "cut", "dup", "bytes"]))
    if kind == "line":
        lines[at] = draw(GARBAGE)
    elif kind == "dup":
        lines.insert(at, lines[at])
    blob = "\n".join(lines).encode("latin-1" if name == "u.item" else "utf-8")
    if kind == "cut":
        blob = blob[:draw(st.integers(0, len(blob)))]
    elif kind == "bytes":
        blob = blob[:at] + draw(st.binary(min_size=1, max_size=4)) + blob[at:]
    return {**{k: v.encode("latin-1" if k == "u.item" else "utf-8") for k, v in out.items()},
            name: blob}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["grouplens", "atomic", "csv", "jsonl"]).flatmap(files))
def test_generated_layouts_read_or_fail_cleanly(files):
    read_or_fail(files)


RAW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@RAW
@given(st.sampled_from(["user,item,timestamp", "user,item", "item,user,timestamp,x", ""]),
       st.lists(st.lists(st.one_of(IDS, TIME, GARBAGE), max_size=4).map(",".join), max_size=6),
       st.lists(st.tuples(IDS, GARBAGE).map(",".join), max_size=5), st.booleans())
def test_garbage_csv_reads_or_fails_cleanly(header, lines, item_lines, crlf):
    sep = "\r\n" if crlf else "\n"
    read_or_fail({"interactions.csv": sep.join([header, *lines]).encode(),
                  "items.csv": sep.join(["item,title", *item_lines]).encode()})


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
                                    st.floats(allow_nan=False)),
                          lambda c: st.lists(c, max_size=2), max_leaves=4)


@RAW
@given(st.lists(st.tuples(IDS, IDS, TIME).map(",".join), max_size=6),
       st.lists(st.one_of(
           st.dictionaries(st.sampled_from(["item", "title", "year"]), JSON_VALUE, max_size=3)
           .map(json.dumps),
           st.text(alphabet='{}[]":, item1\u2028', max_size=12)), max_size=5))
def test_garbage_jsonl_reads_or_fails_cleanly(lines, item_lines):
    read_or_fail({"interactions.csv": "\n".join(["user,item,timestamp", *lines]).encode(),
                  "items.jsonl": "\n".join(item_lines).encode()})


@RAW
@given(st.lists(st.lists(st.one_of(IDS, TIME, GARBAGE), max_size=4).map("\t".join), max_size=5),
       st.lists(st.lists(st.one_of(IDS, GARBAGE), min_size=1, max_size=24).map("|".join),
                max_size=4), st.binary(max_size=20))
def test_garbage_grouplens_reads_or_fails_cleanly(lines, item_lines, genre):
    read_or_fail({"u.data": "\n".join(lines).encode(), "u.genre": genre,
                  "u.item": "\n".join(item_lines).encode("utf-8")})


def test_default_template_falls_back_to_the_item_files_fields(tmp_path, capsys):
    """A catalog with item,title,genres and the template left at its default: item texts
    from the file's own fields (said in one stderr line); an explicit template that names
    a missing field still fails."""
    from fedrec.config import load_defaults
    from fedrec.data.datasets import render_texts

    fields = [{"title": "Heat", "genres": "Action, Crime"}, {"title": "Babe", "genres": ""}]
    default = load_defaults()["data.item-template"]
    assert "{year}" in default
    texts = render_texts(fields, default, "byo/items.csv")
    assert texts == ["Heat. genres: Action, Crime", "Babe"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "byo/items.csv" in err and "'year'" in err
    render_texts(fields, default, "byo/items.csv")
    assert capsys.readouterr().err == ""  # said once per file
    with pytest.raises(FedrecError, match="field 'year' is not in the item file"):
        render_texts(fields, "{title} ({year})", "byo/items.csv")
