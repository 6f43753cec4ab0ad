"""Dataset readers, fetching, and the item-text template.

Three on-disk layouts are read into one `Dataset` (internal ids 0..n-1, time-ordered
interactions, one text per item):

- GroupLens (the official MovieLens zip): ``u.data`` (user, item, rating, timestamp; tab)
  and ``u.item`` (pipe-separated, latin-1; title with "(year)", genre flags).
- RecBole atomic: ``<name>.inter`` and ``<name>.item``, tab-separated, ``field:type`` header.
- Generic (bring your own catalog): ``interactions.csv`` with columns user,item,timestamp
  and ``items.csv`` or ``items.jsonl`` with column ``item`` plus the text fields that
  ``data.item-template`` names (e.g. title, year, genres).

Every problem a user can fix raises `FedrecError` naming the file, line or field.
"""

import csv
import hashlib
import io
import json
import os
import re
import shutil
import string
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.errors import FedrecError

GROUPLENS_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
                    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
RECBOLE_WHEEL = "recbole==1.2.1"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class Dataset:
    """Implicit feedback: (user, item, time) rows sorted by user then time; item texts."""

    name: str
    user_ids: list[str]           # internal user index -> original id
    item_ids: list[str]           # internal item index -> original id
    item_fields: list[dict[str, str]]  # raw text fields per item (title, year, genres, ...)
    users: np.ndarray             # int64 [n]
    items: np.ndarray             # int64 [n]
    times: np.ndarray             # float64 [n]

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_texts(self, template: str) -> list[str]:
        return render_texts(self.item_fields, template)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.users, self.items, self.times):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\x1f".join(self.item_ids).encode())
        return h.hexdigest()[:16]


def render_texts(item_fields: list[dict[str, str]], template: str) -> list[str]:
    """Fill the item template ("{title} ({year}). Genres: {genres}") for every item."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    available = set(item_fields[0]) if item_fields else set()
    missing = sorted(names - available)
    if missing:
        raise FedrecError(
            f"data.item-template: field '{missing[0]}' is not in the item file; "
            f"available fields: {', '.join(sorted(available))}")
    return [" ".join(template.format(**f).split()) for f in item_fields]


# ----------------------------------------------------------------------------- readers

def _open_text(path: Path, encoding: str = "utf-8") -> str:
    if not path.is_file():
        raise FedrecError(f"{path}: file not found; run `fedrec data fetch ml-100k` or "
                          "point data.dataset at a directory with the files")
    raw = path.read_bytes()
    if not raw.strip():
        raise FedrecError(f"{path}: file is empty")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FedrecError(f"{path}: not valid {encoding} (byte {exc.start}); "
                          f"re-save the file as {encoding}") from None


def _rows(path: Path, delimiter: str, encoding: str = "utf-8") -> list[list[str]]:
    text = _open_text(path, encoding)
    return [r for r in csv.reader(io.StringIO(text), delimiter=delimiter,
                                  quoting=csv.QUOTE_NONE if delimiter != "," else csv.QUOTE_MINIMAL)
            if r and any(c.strip() for c in r)]


def _number(path: Path, line: int, field: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        out = float("nan")
    if not np.isfinite(out):
        raise FedrecError(f"{path}:{line}: field '{field}' is not a number ({value[:40]!r})")
    return out


def read_grouplens(root: Path) -> Dataset:
    item_rows = _rows(root / "u.item", "|", encoding="latin-1")
    genres = GROUPLENS_GENRES
    if (root / "u.genre").is_file():
        genres = [r[0] for r in _rows(root / "u.genre", "|", encoding="latin-1")]
    fields = []
    item_ids = []
    for line, r in enumerate(item_rows, 1):
        if len(r) < 5 + len(genres):
            raise FedrecError(f"{root / 'u.item'}:{line}: expected {5 + len(genres)} "
                              f"'|'-separated fields, found {len(r)}")
        title, year = _split_title_year(r[1])
        flags = r[5:5 + len(genres)]
        fields.append({"title": title, "year": year,
                       "genres": ", ".join(g for g, f in zip(genres, flags) if f == "1")})
        item_ids.append(r[0])
    inter = _rows(root / "u.data", "\t")
    return _build("ml-100k" if root.name == "ml-100k" else root.name, root / "u.data",
                  inter, (0, 1, 3), item_ids, fields, start_line=1)


def _split_title_year(title: str) -> tuple[str, str]:
    m = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    return (m.group(1), m.group(2)) if m else (title.strip(), "")


def read_atomic(root: Path, name: str) -> Dataset:
    inter_path, item_path = root / f"{name}.inter", root / f"{name}.item"
    head, *rows = _rows(inter_path, "\t")
    cols = [h.split(":")[0] for h in head]
    idx = tuple(_column(inter_path, cols, c) for c in ("user_id", "item_id", "timestamp"))
    ihead, *irows = _rows(item_path, "\t")
    icols = [h.split(":")[0] for h in ihead]
    iid = _column(item_path, icols, "item_id")
    rename = {"movie_title": "title", "release_year": "year", "class": "genres"}
    item_ids, fields = [], []
    for line, r in enumerate(irows, 2):
        if len(r) != len(icols):
            raise FedrecError(f"{item_path}:{line}: expected {len(icols)} tab-separated "
                              f"fields, found {len(r)}")
        item_ids.append(r[iid])
        f = {rename.get(c, c): v for c, v in zip(icols, r) if c != "item_id"}
        if "genres" in f:
            f["genres"] = ", ".join(f["genres"].split())
        fields.append(f)
    return _build(name, inter_path, rows, idx, item_ids, fields, start_line=2)


def read_generic(root: Path) -> Dataset:
    inter_path = root / "interactions.csv"
    head, *rows = _rows(inter_path, ",")
    cols = [h.strip() for h in head]
    idx = tuple(_column(inter_path, cols, c) for c in ("user", "item", "timestamp"))
    item_ids, fields = [], []
    if (root / "items.jsonl").is_file():
        path = root / "items.jsonl"
        for line, raw in enumerate(_open_text(path).splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise FedrecError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "item" not in obj:
                raise FedrecError(f"{path}:{line}: each line needs an object with key 'item'")
            item_ids.append(str(obj.pop("item")))
            fields.append({k: _as_text(v) for k, v in obj.items()})
    else:
        path = root / "items.csv"
        ihead, *irows = _rows(path, ",")
        icols = [h.strip() for h in ihead]
        iid = _column(path, icols, "item")
        for line, r in enumerate(irows, 2):
            if len(r) != len(icols):
                raise FedrecError(f"{path}:{line}: expected {len(icols)} fields, found {len(r)}")
            item_ids.append(r[iid])
            fields.append({c: v for c, v in zip(icols, r) if c != "item"})
    keys = set(fields[0]) if fields else set()
    for line, f in enumerate(fields, 1):
        if set(f) != keys:
            raise FedrecError(f"{path}: item {item_ids[line - 1]!r} has fields "
                              f"{sorted(f)}, expected {sorted(keys)}; give every item the same fields")
    return _build(root.name, inter_path, rows, idx, item_ids, fields, start_line=2)


def _as_text(v: object) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _column(path: Path, cols: list[str], name: str) -> int:
    if name not in cols:
        raise FedrecError(f"{path}: missing column '{name}' (found: {', '.join(cols)}); "
                          "see README 'Bring your own data' for the layout")
    return cols.index(name)


def _build(name: str, inter_path: Path, rows: list[list[str]], idx: tuple[int, int, int],
           item_ids: list[str], fields: list[dict[str, str]], start_line: int) -> Dataset:
    if not rows:
        raise FedrecError(f"{inter_path}: no interactions; the file has only a header")
    if not item_ids:
        raise FedrecError(f"{inter_path.parent}: the item file lists no items")
    seen_items: dict[str, int] = {}
    for i, iid in enumerate(item_ids):
        if iid in seen_items:
            raise FedrecError(f"{inter_path.parent}: item id {iid!r} is listed twice in the "
                              "item file; keep one row per item")
        seen_items[iid] = i
    need = max(idx) + 1
    user_index: dict[str, int] = {}
    users, items, times = [], [], []
    unknown: list[tuple[int, str]] = []
    for line, r in enumerate(rows, start_line):
        if len(r) < need:
            raise FedrecError(f"{inter_path}:{line}: expected at least {need} fields, found "
                              f"{len(r)}; check the delimiter")
        u, it, t = (r[j].strip() for j in idx)
        if not u or not it:
            raise FedrecError(f"{inter_path}:{line}: empty user or item id")
        if it not in seen_items:
            unknown.append((line, it))
            continue
        users.append(user_index.setdefault(u, len(user_index)))
        items.append(seen_items[it])
        times.append(_number(inter_path, line, "timestamp", t))
    if unknown:
        line, it = unknown[0]
        raise FedrecError(f"{inter_path}:{line}: item id {it!r} is not in the item file "
                          f"({len(unknown)} such rows); add the items or drop those rows")
    u, i, t = np.array(users, np.int64), np.array(items, np.int64), np.array(times, np.float64)
    # Stable order: user, then time, then item (ml-100k has many equal timestamps).
    order = np.lexsort((i, t, u))
    u, i, t = u[order], i[order], t[order]
    keep = np.ones(len(u), bool)  # drop repeated (user, item): implicit feedback, first wins
    pair = u * len(item_ids) + i
    _, first = np.unique(pair, return_index=True)
    keep[:] = False
    keep[first] = True
    inv_users = sorted(user_index, key=user_index.get)
    return Dataset(name, inv_users, list(item_ids), fields, u[keep], i[keep], t[keep])


def load_dataset(spec: str, cache_dir: str = "") -> Dataset:
    """`spec` is a dataset name in the cache (e.g. ml-100k) or a directory path."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        root = data_home(cache_dir) / spec
        if not root.is_dir():
            raise FedrecError(f"data.dataset: '{spec}' is neither a directory nor a fetched "
                              f"dataset in {root.parent}; run `fedrec data fetch {spec}`")
    if (root / "u.data").exists() or (root / "u.item").exists():
        return read_grouplens(root)
    atomic = sorted(root.glob("*.inter"))
    if atomic:
        return read_atomic(root, atomic[0].stem)
    if (root / "interactions.csv").exists():
        return read_generic(root)
    raise FedrecError(f"{root}: no known layout (u.data + u.item, NAME.inter + NAME.item, "
                      "or interactions.csv + items.csv/items.jsonl); see README")


# ----------------------------------------------------------------------------- fetching

def data_home(cache_dir: str = "") -> Path:
    base = cache_dir or os.environ.get("FEDREC_HOME") or "~/.cache/fedrec"
    return Path(base).expanduser()


def fetch_ml100k(cache_dir: str = "", source: str = "auto") -> Path:
    """Fetch MovieLens-100K into the cache (atomic: a temp dir renamed into place).

    Sources: the RecBole 1.2.1 wheel on PyPI (only its dataset_example/ml-100k files are
    unpacked; recbole is never installed), else the official GroupLens zip where reachable.
    """
    dest = data_home(cache_dir) / "ml-100k"
    if dest.is_dir() and any(dest.iterdir()):
        load_dataset(str(dest))  # validates; raises if a previous copy is corrupt
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for name, fn in (("recbole", _fetch_recbole), ("grouplens", _fetch_grouplens)):
        if source not in ("auto", name):
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=dest.parent))
        try:
            fn(tmp)
            load_dataset(str(tmp))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            return dest
        except Exception as exc:  # noqa: BLE001 - try the next source, report all at the end
            errors.append(f"{name}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise FedrecError("could not fetch ml-100k (" + "; ".join(errors) + "); check network "
                      "access to PyPI or unzip ml-100k.zip from GroupLens into " + str(dest))


def _fetch_grouplens(tmp: Path) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=10) as resp:
        blob = resp.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for member in ("u.data", "u.item", "u.genre", "u.user"):
            (tmp / member).write_bytes(zf.read(f"ml-100k/{member}"))


def _fetch_recbole(tmp: Path) -> None:
    import subprocess
    import sys

    wheel_dir = tmp / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           RECBOLE_WHEEL, "-d", str(wheel_dir)], capture_output=True, text=True)
    wheels = list(wheel_dir.glob("recbole-*.whl"))
    if proc.returncode or not wheels:
        raise RuntimeError(f"pip download {RECBOLE_WHEEL} failed: {proc.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        for ext in ("inter", "item", "user"):
            member = f"recbole/dataset_example/ml-100k/ml-100k.{ext}"
            (tmp / f"ml-100k.{ext}").write_bytes(zf.read(member))
    shutil.rmtree(wheel_dir)
