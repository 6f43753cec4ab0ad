"""Reasons that name shared knowledge: the knowledge-graph facts a recommended item shares
with the history items that explain it ("same director as Fargo [100]"), and a test of
whether they are faithful.

A shared fact is an entity both items name (a director, an actor, a writer, ...). Facts
naming an entity that more than COMMON_SHARE of the linked catalog names (a language, a
country, a rating) explain nothing and are left out; the rest are ordered rarest first.

Faithfulness (`fact_deletion_test`, in `fedrec explain-eval` for a model with graph
features): delete the named facts from the recommended item's graph vector (its other
features unchanged) and measure how far the item falls in the full ranking, against
deleting as many random facts of the same item; as the history reasons' test does.
"""

from collections import Counter

import numpy as np
import torch

from fedrec.data.graph import Graph, fact_vector
from fedrec.models.protocol import Recommender, batch_inputs

COMMON_SHARE = 0.05
MAX_FACTS = 2
_NOUNS = {"directed_by": "director", "written_by": "writer", "produced_by": "producer",
          "production_companies": "production company", "cinematography": "cinematographer",
          "award_nomination": "award nomination", "award_won": "award", "subjects": "subject",
          "films_in_this_genre": "genre", "content_rating": "rating"}


def relation_noun(rel: str) -> str:
    """'film.film.directed_by' -> 'director'; an inverse relation ('film.director.film')
    is named by its middle part."""
    parts = rel.split(".")
    last = parts[-1] if parts[-1] not in ("film", "films") or len(parts) < 2 else parts[-2]
    return _NOUNS.get(last, last.replace("_", " "))


class FactIndex:
    """The graph's facts per catalog row, and how common each entity is."""

    def __init__(self, graph: Graph, item_ids: list[str]):
        self.facts = [graph.facts.get(i, []) for i in item_ids]
        counts = Counter(e for f in self.facts for e in {e for _, e in f})
        linked = max(1, sum(1 for f in self.facts if f))
        self.rare = {e for e, c in counts.items() if c <= COMMON_SHARE * linked}
        self.count = counts

    def shared(self, i: int, j: int) -> list[tuple[str, str]]:
        """(relation, entity) facts of item i whose entity item j also names, rare ones
        only, rarest first."""
        theirs = {e for _, e in self.facts[j]}
        out = [(r, e) for r, e in self.facts[i] if e in theirs and e in self.rare]
        return sorted(out, key=lambda f: self.count[f[1]])

    def phrases(self, i: int, reasons: list[int], labels: list[str], ids: list[str]
                ) -> list[str]:
        """Up to MAX_FACTS phrases for item i and its reason items (catalog rows)."""
        out = []
        for j in reasons:
            by_noun: dict[str, list[str]] = {}
            for r, e in self.shared(i, j):
                by_noun.setdefault(relation_noun(r), []).append(e)
            for noun, ents in by_noun.items():
                who = f"{labels[j]} [{ids[j]}]"
                out.append(f"same {noun} as {who} ({ents[0]})" if len(ents) == 1
                           else f"{len(ents)} shared {noun}s with {who}")
        return out[:MAX_FACTS]

    def named(self, i: int, reasons: list[int]) -> list[tuple[str, str]]:
        """The facts of item i the phrases name (deduplicated)."""
        seen = []
        for j in reasons:
            seen += [f for f in self.shared(i, j) if f not in seen]
        return seen


def fact_index(graph: Graph, item_ids: list[str]) -> FactIndex:
    """FactIndex of (graph, catalog), built once per process (~40 ms for ml-100k: more
    than a third of a recommendation's budget)."""
    key = (id(graph), tuple(item_ids))
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = (graph, FactIndex(graph, item_ids))  # the graph kept alive: id stays its
    return _INDEXES[key][1]


_INDEXES: dict[tuple, tuple[Graph, FactIndex]] = {}


@torch.no_grad()
def fact_deletion_test(model: Recommender, E: torch.Tensor, index: FactIndex, cols: slice,
                       cases: list[tuple[np.ndarray, int, list[int]]], n_random: int = 10,
                       seed: int = 0) -> dict:
    """cases: (input sequence, recommended row i, its reason rows). For each case whose
    reasons share facts with i: the rank fall of i after deleting the named facts from
    its graph vector (columns `cols` of E) vs deleting as many random facts of i."""
    rng = np.random.default_rng(seed)
    h, b = model.item_table(E)
    dim = cols.stop - cols.start
    falls, rand, sizes, last = [], [], [], None
    for seq, i, reasons in cases:
        named, facts = index.named(i, reasons), index.facts[i]
        if not named:
            continue
        sizes.append(len(named))
        if len(facts) <= len(named):
            continue
        if seq is not last:  # one user's cases share their input (and its scores)
            last, u = seq, model.states(h, batch_inputs([seq], model.max_len), None)[0, -1]
            s = h @ u + b
            s[torch.from_numpy(seq)] = -torch.inf
        before = int((s > s[i]).sum())
        variants = [[f for f in facts if f not in named]]
        for _ in range(n_random):
            drop = set(rng.choice(len(facts), len(named), replace=False).tolist())
            variants.append([f for k, f in enumerate(facts) if k not in drop])
        rows = E[i].repeat(len(variants), 1)
        rows[:, cols] = torch.from_numpy(np.stack([fact_vector(v, dim) for v in variants]))
        hv, bv = model.item_table(rows, torch.full((len(variants),), i))
        after = ((s[None] > (hv @ u + bv)[:, None]).sum(1) - 1 * (s[i] > hv @ u + bv)).numpy()
        fall = after - before
        falls.append(float(fall[0]))
        rand.append(fall[1:].astype(float))
    if not falls:
        return {"pairs": 0}
    f, r = np.array(falls), np.stack(rand)
    return {"pairs": len(f), "random-draws": n_random,
            "share-facts-beat-random": float(np.mean(f > r.mean(1))),
            "win-rate-per-draw": float(np.mean((f[:, None] > r) + 0.5 * (f[:, None] == r))),
            "rank-drop-facts-mean": float(f.mean()), "rank-drop-facts-median": float(np.median(f)),
            "rank-drop-random-mean": float(r.mean()),
            "rank-drop-random-median": float(np.median(r)),
            "facts-per-item-mean": float(np.mean(sizes))}


def graph_columns(model) -> slice | None:
    """The columns of E that hold the graph vector, for a model that reads one."""
    start = getattr(model, "text_dim", 0)
    for name, width in getattr(model, "extras", ()):
        if name == "graph":
            return slice(start, start + width)
        start += width
    return None
