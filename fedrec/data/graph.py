"""A public knowledge graph of the catalog: facts per item, and a frozen vector per item.

Two on-disk layouts are read (bring your own graph in either):

- RecBole atomic: ``<name>.kg`` (``head_id:token relation_id:token tail_id:token``,
  tab-separated triples between entities) and ``<name>.link`` (``item_id:token
  entity_id:token``: which entity each catalog item is). ml-100k's come from the hopwise
  wheel (`fedrec data fetch ml-100k`): 91,631 Freebase triples, 1,598 of 1,682 items linked.
- Generic: ``graph.csv`` with columns ``item,relation,entity`` (one fact per line, the
  item named by its catalog id).

An item's facts are (relation, entity) pairs: the triples whose head is the item's entity,
plus those whose tail is (an inverse triple whose entity the item does not already name).
The frozen vector is feature hashing of the facts: each fact has a fixed pseudo-random
Gaussian direction drawn from a hash of its text, and an item's vector is the normalised
sum of its facts' directions (zero for an unlinked item). It depends on the item's own
facts alone, never on the rest of the catalog or on any user, so an item added later gets
the same kind of vector and the device computes exactly what the server would. A trainable
linear adapter on it is a learned embedding of the facts, compressed (fedrec.models.seqrec).
"""

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.data.encoder import EmbeddingCache
from fedrec.errors import FedrecError
from fedrec.files import write_text_atomic

GRAPH_CSV = "graph.csv"


@dataclass(frozen=True)
class Graph:
    facts: dict[str, list[tuple[str, str]]]  # catalog item id -> [(relation, entity)]
    source: str  # the file(s) read, named in messages
    triples: int = 0  # lines read

    def stats(self, item_ids: list[str]) -> dict:
        """Linked catalog items, facts and relations (`fedrec data stats`)."""
        linked = [self.facts[i] for i in item_ids if self.facts.get(i)]
        rels = {r for f in linked for r, _ in f}
        return {"source": self.source, "triples": self.triples, "linked-items": len(linked),
                "items": len(item_ids), "facts": sum(map(len, linked)),
                "facts-per-linked-item-median": float(np.median([len(f) for f in linked]))
                if linked else 0.0, "relations": len(rels)}


def find_graph(path: str | Path) -> Path | None:
    """The graph files at path (a graph.csv, a .kg file, or a directory holding one)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / GRAPH_CSV).is_file():
            return p / GRAPH_CSV
        kgs = sorted(p.glob("*.kg"))
        return kgs[0] if kgs else None
    return None


def read_graph(path: str | Path, item_ids: list[str], min_items: int = 1) -> Graph:
    """The graph at path (find_graph) for a catalog of item_ids, with only the facts at
    least min_items of them name (shared_only). Errors name file and line; an item id the
    catalog lacks is an error (a typo would silently drop its facts). Read once per
    process per (files, catalog, min_items): recommending again re-reads nothing."""
    f = find_graph(path)
    if f is None:
        raise FedrecError(f"data.graph: no {GRAPH_CSV} or <name>.kg at '{path}'; point it at "
                          "a graph file or the directory holding one, or set it to \"\"")
    files = [f, f.with_suffix(".link")] if f.suffix == ".kg" else [f]
    key = (tuple((str(x.resolve()), x.stat().st_size, x.stat().st_mtime_ns) for x in files
                 if x.is_file()), hashlib.sha256("\x1f".join(item_ids).encode()).hexdigest(),
           min_items)
    if key not in _GRAPHS:
        known = set(item_ids)
        try:
            g = _read_atomic(f, files[1], known) if f.suffix == ".kg" else _read_csv(f, known)
        except UnicodeDecodeError as exc:
            raise FedrecError(f"{f}: not UTF-8 text (byte {exc.start}); save it as UTF-8") \
                from None
        except csv.Error as exc:
            raise FedrecError(f"{f}: unreadable as CSV ({exc}); fix the file") from None
        _GRAPHS.clear()  # one graph per process is the use; never grow without bound
        _GRAPHS[key] = shared_only(g, item_ids, min_items)
    return _GRAPHS[key]


_GRAPHS: dict[tuple, Graph] = {}


def _bad(f: Path, line: int, what: str) -> FedrecError:
    return FedrecError(f"{f}:{line}: {what}")


def _read_csv(f: Path, known: set[str]) -> Graph:
    facts: dict[str, dict[tuple[str, str], None]] = {}
    with open(f, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        if header[:3] != ["item", "relation", "entity"]:
            raise _bad(f, 1, f"header is {','.join(header) or 'empty'}; expected "
                       "item,relation,entity")
        n = 0
        for n, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 3 or not all(x.strip() for x in row):
                raise _bad(f, n, f"expected 3 non-empty fields item,relation,entity, got "
                           f"{len(row)}: {','.join(row)[:60]}")
            item, rel, ent = (x.strip() for x in row)
            if item not in known:
                raise _bad(f, n, f"item '{item}' is not in the catalog; fix the id or drop "
                           "the line")
            _add(facts, item, rel, ent)
    return Graph({i: list(fs) for i, fs in facts.items()}, str(f), max(0, n - 1))


def _read_atomic(kg: Path, link: Path, known: set[str]) -> Graph:
    if not link.is_file():
        raise FedrecError(f"{link}: missing; a .kg graph needs its .link file "
                          "(item_id:token entity_id:token) beside it")
    entity_items: dict[str, list[str]] = {}
    for n, cols in _atomic_rows(link, 2, ("item_id", "entity_id")):
        if cols[0] not in known:
            raise _bad(link, n, f"item '{cols[0]}' is not in the catalog; fix the id or "
                       "drop the line")
        entity_items.setdefault(cols[1], []).append(cols[0])
    facts: dict[str, dict[tuple[str, str], None]] = {}
    inverse = []
    n_triples = 0
    for _, (h, r, t) in _atomic_rows(kg, 3, ("head_id", "relation_id", "tail_id")):
        n_triples += 1
        for item in entity_items.get(h, ()):
            _add(facts, item, r, t)
        inverse += [(item, r, h) for item in entity_items.get(t, ())]
    named = {item: {e for _, e in fs} for item, fs in facts.items()}
    for item, r, h in inverse:  # only where the item does not already name the entity
        if h not in named.setdefault(item, set()):
            _add(facts, item, r, h)
            named[item].add(h)
    return Graph({i: list(fs) for i, fs in facts.items()}, f"{kg} + {link.name}", n_triples)


def _atomic_rows(f: Path, width: int, names: tuple[str, ...]):
    with open(f, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if [h.split(":")[0] for h in header] != list(names):
            raise _bad(f, 1, f"header is {' '.join(header)}; expected "
                       + " ".join(f"{x}:token" for x in names))
        for n, line in enumerate(fh, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != width or not all(cols):
                raise _bad(f, n, f"expected {width} tab-separated fields, got "
                           f"{len(cols)}: {line[:60]}")
            yield n, cols


def _add(facts: dict, item: str, rel: str, ent: str) -> None:
    facts.setdefault(item, {})[(rel, ent)] = None  # an ordered set: repeats count once


def write_graph_csv(graph: Graph, item_ids: list[str], path: Path) -> None:
    """The facts of item_ids as a generic graph.csv (a device directory's copy)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["item", "relation", "entity"])
    w.writerows([i, r, e] for i in item_ids for r, e in graph.facts.get(i, []))
    write_text_atomic(Path(path), buf.getvalue())


def shared_only(graph: Graph, item_ids: list[str], min_items: int) -> Graph:
    """The graph with only the facts whose entity at least min_items of the catalog's
    items name (1: every fact). An item's own facts (an actor in no other movie) carry
    nothing another item could share; the price is a vector that depends on the catalog."""
    if min_items <= 1:
        return graph
    counts: dict[str, int] = {}
    for i in item_ids:
        for e in {e for _, e in graph.facts.get(i, [])}:
            counts[e] = counts.get(e, 0) + 1
    return Graph({i: [(r, e) for r, e in fs if counts.get(e, 0) >= min_items]
                  for i, fs in graph.facts.items()}, graph.source, graph.triples)


def fact_vector(facts: list[tuple[str, str]], dim: int) -> np.ndarray:
    """float32 [dim]: the normalised sum of the facts' hashed Gaussian directions."""
    v = np.zeros(dim, np.float64)
    for rel, ent in facts:
        v += _direction(rel, ent, dim)
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


def graph_table(graph: Graph, item_ids: list[str], dim: int,
                cache_root: Path | None = None) -> np.ndarray:
    """float32 [len(item_ids), dim]: each item's fact_vector (zero rows: unlinked items).
    With cache_root, vectors are kept on disk keyed by (dim, the item's facts), as text
    embeddings are: a fresh process on a device computes only what is new (~1 s for
    ml-100k's whole catalog otherwise)."""
    if not item_ids:
        return np.zeros((0, dim), np.float32)
    keys = [hashlib.sha256("\x1e".join(f"{r}\x1f{e}" for r, e in sorted(
        graph.facts.get(i, []))).encode()).hexdigest() for i in item_ids]
    cache = EmbeddingCache(Path(cache_root) / "graph", f"hashed-{dim}") if cache_root else None
    table = cache.load() if cache else {}
    missing = {k: i for k, i in zip(keys, item_ids) if k not in table}
    for k, i in missing.items():
        table[k] = fact_vector(graph.facts.get(i, []), dim)
    if cache and missing:
        cache.save(table)
    return np.stack([table[k] for k in keys]).astype(np.float32)


_DIRECTIONS: dict[tuple[str, str, int], np.ndarray] = {}


def _direction(rel: str, ent: str, dim: int) -> np.ndarray:
    key = (rel, ent, dim)
    if key not in _DIRECTIONS:
        seed = int.from_bytes(hashlib.sha256(f"{rel}\x1f{ent}".encode()).digest()[:8], "little")
        _DIRECTIONS[key] = np.random.default_rng(seed).standard_normal(dim) / np.sqrt(dim)
    return _DIRECTIONS[key]
