"""Dataset readers, fetching, and the item-text template.

Three on-disk layouts are read into one `Dataset` (internal ids 0..n-1, time-ordered
interactions, one text per item):

- GroupLens (the official MovieLens zip): ``u.data`` (user, item, rating, timestamp; tab)
  and ``u.item`` (pipe-separated, latin-1; title with "(year)", genre flags).
- RecBole atomic: ``<name>.inter`` and ``<name>.item``, tab-separated, ``field:type`` header.
- Generic (bring your own catalog): ``interactions.csv`` with columns user,item,timestamp
  and ``items.csv`` or ``items.jsonl`` with column ``item`` plus the text fields that
  ``data.item-template`` names (e.g. title, year, genres).

Internal ids follow the sorted original ids (numerically when they are digits), not file
order, so two layouts holding the same data give the same Dataset, fingerprint and split.
Every problem a user can fix raises `FedrecError` naming the file, line or field.

Size: three readers (generic, ml-100k, RecBole atomic files) sharing one error-reporting
and canonical-ordering core; each reader alone is short.
"""

import csv
import hashlib
import io
import json
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.config import load_defaults
from fedrec.errors import FedrecError
from fedrec.files import data_home

GROUPLENS_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
                    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
LAYOUT_HINT = "see README 'Bring your own data' for the expected files"
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
    source: str = ""              # the item file, named in template errors

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_texts(self, template: str) -> list[str]:
        return render_texts(self.item_fields, template, self.source)

    def fingerprint(self) -> str:
        """Hash of the interactions and ids (not the texts): the split cache key."""
        h = hashlib.sha256()
        for arr in (self.users, self.items, self.times):
            h.update(np.ascontiguousarray(arr).tobytes())
        for ids in (self.user_ids, self.item_ids):
            h.update("\x1f".join(ids).encode("utf-8", "surrogatepass") + b"\x1e")
        return h.hexdigest()[:16]


def render_texts(item_fields: list[dict[str, str]], template: str, source: str = "") -> list[str]:
    """Fill the item template ("{title} ({year}). Genres: {genres}") for every item."""
    where = f"data.item-template (item file {source})" if source else "data.item-template"
    available = sorted(item_fields[0]) if item_fields else []
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        missing = sorted(names - set(available))
        if missing and template == _default_template():
            return _fallback_texts(item_fields, where, missing[0])
        if missing:
            raise FedrecError(f"{where}: field {missing[0]!r} is not in the item file; "
                              f"use one of: {_show(', '.join(available)) or '(none)'}")
        return [" ".join(template.format(**f).split()) for f in item_fields]
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        raise FedrecError(f"{where}: {template!r} is not a valid template ({exc}); write "
                          "fields as {name}, e.g. '{title} ({year})'") from None


def _default_template() -> str:
    return load_defaults()["data.item-template"]


_NOTED: set[str] = set()


def _fallback_texts(item_fields: list[dict[str, str]], where: str, missing: str) -> list[str]:
    """Item texts from every text field of the item file, in file order ("Heat. genres:
    Action"): for a catalog the default template does not fit. Said once per file."""
    names = [f for f in item_fields[0] if f != "cold"]
    if where not in _NOTED:
        _NOTED.add(where)
        sys.stderr.write(f"{where}: no field {missing!r} for the default template; using the "
                         f"item file's fields ({', '.join(names)}) as item text instead (set "
                         "data.item-template to choose)\n")

    def text(f: dict[str, str]) -> str:
        first, *rest = [(n, " ".join(str(f.get(n) or "").split())) for n in names]
        return ". ".join([first[1], *(f"{n}: {v}" for n, v in rest if v)]).strip()
    return [text(f) for f in item_fields]


_TERMS = re.compile(r"\s*[,|;]\s*")
_NOT_TERMS = {"title", "year", "cold"}


def item_terms(item: dict[str, str]) -> list[tuple[str, str]]:
    """(field, term) of an item's list-like catalog fields (genres, tags: comma, | or ;
    separated; not title or year), in the item's order."""
    return [(field, t) for field, value in item.items() if field not in _NOT_TERMS and value
            for t in _TERMS.split(value) if t]


# ----------------------------------------------------------------------------- readers

def _open_text(path: Path, encoding: str = "utf-8", hint: str = LAYOUT_HINT) -> str:
    if not path.is_file():
        raise FedrecError(f"{path}: file not found; {hint}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FedrecError(f"{path}: cannot read ({exc.strerror}); check its permissions") from None
    if not raw.strip():
        raise FedrecError(f"{path}: file is empty; re-create it ({hint})")
    try:  # utf-8-sig: spreadsheets prepend a byte-order mark that would corrupt the header
        return raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        raise FedrecError(f"{path}: not valid {encoding} (byte {exc.start}); "
                          f"re-save the file as {encoding}") from None


def _rows(path: Path, delimiter: str, encoding: str = "utf-8", hint: str = LAYOUT_HINT
          ) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their line numbers; at least one row or FedrecError."""
    text = _open_text(path, encoding, hint)
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    out = []
    try:
        for r in reader:
            if any(c.strip() for c in r):
                out.append((reader.line_num, r))
    except csv.Error as exc:
        raise FedrecError(f"{path}:{reader.line_num + 1}: cannot parse ({exc}); "
                          "fix the quoting on that line") from None
    if not out:
        raise FedrecError(f"{path}: no rows, only delimiters; re-create it ({hint})")
    return out


def _number(path: Path, line: int, field: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        out = float("nan")
    if not np.isfinite(out):
        raise FedrecError(f"{path}:{line}: field '{field}' is not a finite number "
                          f"('{_show(value)}'); use Unix seconds")
    return out


def _header(path: Path, rows: list, names: tuple[str, ...], sep: str
            ) -> tuple[list, tuple, list[str]]:
    """(body rows, index of each named column, all columns); types after ':' ignored."""
    (_, head), *body = rows
    cols = [h.split(":")[0].strip() for h in head]
    for name in names:
        if name not in cols:
            raise FedrecError(f"{path}: missing column '{name}' (header: "
                              f"{_show(sep.join(cols))}); columns must be separated by "
                              f"{sep!r}; {LAYOUT_HINT}")
    return body, tuple(cols.index(n) for n in names), cols


def read_grouplens(root: Path) -> Dataset:
    item_path = root / "u.item"
    hint = "run `fedrec data fetch ml-100k` or unzip ml-100k.zip from GroupLens there"
    genres = GROUPLENS_GENRES
    if (root / "u.genre").is_file():
        genres = [r[0] for _, r in _rows(root / "u.genre", "|", "latin-1", hint)]
    ids, fields = [], []
    for line, r in _rows(item_path, "|", "latin-1", hint):
        if len(r) < 5 + len(genres):
            raise FedrecError(f"{item_path}:{line}: expected {5 + len(genres)} '|'-separated "
                              f"fields, found {len(r)}; check the delimiter")
        title, year = _split_title_year(r[1])
        flags = r[5:5 + len(genres)]
        fields.append({"title": title, "year": year,
                       "genres": ", ".join(g for g, f in zip(genres, flags) if f.strip() == "1")})
        ids.append((line, r[0]))
    inter_path = root / "u.data"
    return _build(root.resolve().name, inter_path, _rows(inter_path, "\t", hint=hint),
                  (0, 1, 3), item_path, ids, fields)


def _split_title_year(title: str) -> tuple[str, str]:
    m = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    return (m.group(1), m.group(2)) if m else (title.strip(), "")


def read_atomic(root: Path, name: str) -> Dataset:
    inter_path, item_path = root / f"{name}.inter", root / f"{name}.item"
    rows, idx, _ = _header(inter_path, _rows(inter_path, "\t"),
                           ("user_id", "item_id", "timestamp"), "\t")
    irows, (iid,), icols = _header(item_path, _rows(item_path, "\t"), ("item_id",), "\t")
    rename = {"movie_title": "title", "release_year": "year", "class": "genres"}
    ids, fields = [], []
    for line, r in irows:
        if len(r) != len(icols):
            raise FedrecError(f"{item_path}:{line}: expected {len(icols)} tab-separated "
                              f"fields, found {len(r)}")
        ids.append((line, r[iid]))
        f = {rename.get(c, c): v for c, v in zip(icols, r) if c != "item_id"}
        if "genres" in f:  # RecBole token_seq: space-separated tokens
            f["genres"] = ", ".join(f["genres"].split())
        fields.append(f)
    return _build(name, inter_path, rows, idx, item_path, ids, fields)


def read_generic(root: Path) -> Dataset:
    inter_path = root / "interactions.csv"
    rows, idx, _ = _header(inter_path, _rows(inter_path, ","), ("user", "item", "timestamp"), ",")
    item_path = root / ("items.jsonl" if (root / "items.jsonl").is_file() else "items.csv")
    ids, fields = read_item_file(item_path)
    return _build(root.resolve().name, inter_path, rows, idx, item_path, ids, fields)


def read_item_file(item_path: Path) -> tuple[list[tuple[int, str]], list[dict[str, str]]]:
    """A generic-layout catalog (items.csv or items.jsonl) -> ([(line, item id)], fields).

    Every item must have the same fields; list values in JSONL are joined with ", ".
    """
    ids, fields = [], []
    if item_path.suffix == ".jsonl":
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends.
        for line, raw in enumerate(_open_text(item_path).split("\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise FedrecError(f"{item_path}:{line}: not valid JSON ({exc}); "
                                  "write one JSON object per line") from None
            if not isinstance(obj, dict) or "item" not in obj:
                raise FedrecError(f"{item_path}:{line}: each line needs an object with key "
                                  "'item', e.g. {\"item\": \"42\", \"title\": \"...\"}")
            ids.append((line, _as_text(obj.pop("item")).strip()))
            fields.append({k: _as_text(v) for k, v in obj.items()})
    else:
        irows, (iid,), icols = _header(item_path, _rows(item_path, ","), ("item",), ",")
        for line, r in irows:
            if len(r) != len(icols):
                raise FedrecError(f"{item_path}:{line}: expected {len(icols)} fields, found "
                                  f"{len(r)}; quote fields that contain commas")
            ids.append((line, r[iid].strip()))
            fields.append({c: v for c, v in zip(icols, r) if c != "item"})
    for (line, iid), f in zip(ids, fields):
        if set(f) != set(fields[0]):
            raise FedrecError(f"{item_path}:{line}: item '{_show(iid)}' has fields "
                              f"{sorted(f)}, expected {sorted(fields[0])}; "
                              "give every item the same fields")
    return ids, fields


def _show(text: str, limit: int = 60) -> str:
    """File content quoted in a message: one line, bounded length."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_text(v: object) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _id_order(ids) -> list[str]:
    """Sorted ids, digit strings numerically (without int(): ids may be any length)."""
    def key(s: str):
        t = s.lstrip("0")
        return (0, len(t), t, s) if s.isascii() and s.isdigit() else (1, 0, s, s)
    return sorted(ids, key=key)


def _build(name: str, inter_path: Path, rows: list[tuple[int, list[str]]],
           idx: tuple[int, int, int], item_path: Path, ids: list[tuple[int, str]],
           fields: list[dict[str, str]]) -> Dataset:
    if not rows:
        raise FedrecError(f"{inter_path}: no interactions, the file has only a header; "
                          "add one row per (user, item, timestamp)")
    if not ids:
        raise FedrecError(f"{item_path}: lists no items, only a header; add one row per item")
    by_id: dict[str, int] = {}
    for k, (line, raw) in enumerate(ids):
        iid = raw.strip()
        if not iid:
            raise FedrecError(f"{item_path}:{line}: empty item id")
        if iid in by_id:
            raise FedrecError(f"{item_path}:{line}: item id '{_show(iid)}' is listed twice; "
                              "keep one row per item")
        by_id[iid] = k
    item_ids = _id_order(by_id)
    fields = [fields[by_id[i]] for i in item_ids]
    item_index = {i: k for k, i in enumerate(item_ids)}
    need = max(idx) + 1
    raw_users, items, times, unknown = [], [], [], []
    for line, r in rows:
        if len(r) < need:
            raise FedrecError(f"{inter_path}:{line}: expected at least {need} fields, found "
                              f"{len(r)}; check the delimiter")
        u, it, t = (r[j].strip() for j in idx)
        if not u or not it:
            raise FedrecError(f"{inter_path}:{line}: empty user or item id")
        if it not in item_index:
            unknown.append((line, it))
            continue
        raw_users.append(u)
        items.append(item_index[it])
        times.append(_number(inter_path, line, "timestamp", t))
    if unknown:
        line, it = unknown[0]
        raise FedrecError(f"{inter_path}:{line}: item id '{_show(it)}' is not in "
                          f"{item_path.name} ({len(unknown)} such rows); add the items or "
                          "drop those rows")
    user_ids = _id_order(set(raw_users))
    user_index = {x: k for k, x in enumerate(user_ids)}
    u = np.array([user_index[x] for x in raw_users], np.int64)
    i, t = np.array(items, np.int64), np.array(times, np.float64)
    # Stable order: user, then time, then item (ml-100k has many equal timestamps).
    order = np.lexsort((i, t, u))
    u, i, t = u[order], i[order], t[order]
    # Implicit feedback: a repeated (user, item) is one interaction; the earliest is kept.
    _, first = np.unique(u * len(item_ids) + i, return_index=True)
    keep = np.sort(first)
    return Dataset(name, user_ids, item_ids, fields, u[keep], i[keep], t[keep], str(item_path))


def load_dataset(spec: str, cache_dir: str = "") -> Dataset:
    """`spec` is a dataset name in the cache (e.g. ml-100k) or a directory path."""
    if not spec.strip():
        raise FedrecError("data.dataset: empty; give a fetched dataset name (ml-100k) or a "
                          "directory path")
    root = Path(spec).expanduser()
    if not root.is_dir():
        root = data_home(cache_dir) / spec
        if not root.is_dir():
            raise FedrecError(f"data.dataset: {spec!r} is neither a directory nor a fetched "
                              f"dataset in {root.parent}; run `fedrec data fetch {spec}`")
    if (root / "u.data").exists() or (root / "u.item").exists():
        return read_grouplens(root)
    atomic = sorted(root.glob("*.inter"))
    if atomic:
        return read_atomic(root, atomic[0].stem)
    if (root / "interactions.csv").exists():
        return read_generic(root)
    raise FedrecError(f"{root}: no known layout (u.data + u.item, NAME.inter + NAME.item, "
                      f"or interactions.csv + items.csv/items.jsonl); {LAYOUT_HINT}")
