"""On-device re-ranking for diversity, and its accuracy/diversity curve.

Re-ranking over the top `pool` items by score, with the PLM cosine as the similarity:
maximal marginal relevance (Carbonell & Goldstein, 1998; `mmr`) or the greedy MAP of a
determinantal point process (Chen, Zhang & Zhou, NeurIPS 2018; `dpp`). lam = 0 is the
plain ranking for both.
"""

import numpy as np
import torch

from fedrec.data.evaluate import ListStats, Space, item_novelty, scored_chunks, top_k
from fedrec.data.pipeline import list_spaces
from fedrec.errors import FedrecError
from fedrec.models.saved import load_for_dataset
from fedrec.models.train import scorer
from fedrec.results import summarize

POOL = 100


def mmr(scores: np.ndarray, space: Space | None, k: int, lam: float, pool: int = POOL,
        redundancy: str = "mean") -> np.ndarray:
    """[U, k] items re-ranked by maximal marginal relevance; space: the item similarity
    (fedrec.data.evaluate.Space: PLM cosine or genre Jaccard; unused, and may be None, at
    lam = 0).

    Greedy over each user's top `pool` items: pick argmax (1 - lam) * p_i - lam * red_i,
    where p = softmax(scores) over the row's candidates (the model's next-item
    distribution, so the relevance given up is the expected hit rate given up: a user
    the model is unsure about gets more variety) and red_i the similarity of i to the
    items already picked: their mean ("mean", the greedy step of maximising intra-list
    diversity) or their maximum ("max", Carbonell & Goldstein's original). lam = 0 is the
    plain ranking; useful values are small (README: about 0.05-0.1)."""
    if redundancy not in ("mean", "max"):
        raise ValueError(f"redundancy must be 'mean' or 'max', got {redundancy!r}")
    cand = _candidates(scores, k, lam, pool)
    if lam == 0.0:
        return cand[:, :k]
    rel = np.where(*_pool_probs(scores, cand), -np.inf)  # -inf: never listed
    rows = np.arange(len(cand))
    vecs = space.features[cand]                        # [U, P, D]
    red = np.zeros(cand.shape)   # redundancy with the items picked so far (0 before any)
    total = np.zeros(cand.shape)
    picked = []
    for t in range(min(k, cand.shape[1])):
        gain = (1 - lam) * rel - lam * red
        if picked:
            gain[rows[:, None], np.stack(picked, 1)] = -np.inf
        j = gain.argmax(1)
        picked.append(j)
        sim = space.sim(vecs, vecs[rows, j])
        total += sim
        red = total / (t + 1) if redundancy == "mean" else (sim if t == 0 else np.maximum(red, sim))
    return np.take_along_axis(cand, np.stack(picked, 1), 1)


def _candidates(scores: np.ndarray, k: int, lam: float, pool: int) -> np.ndarray:
    """A re-ranker's [U, max(k, pool)] candidates, best first (lam checked: in [0, 1])."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"diversity lambda must be in [0, 1], got {lam}")
    return top_k(scores, max(k, min(pool, scores.shape[1])))


def _pool_probs(scores: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(listable [U, P], p [U, P]): the softmax over each row's candidates (-inf scores
    excluded) at its top-`pool` items cand."""
    s = np.asarray(scores, np.float64)
    top = np.take_along_axis(s, cand[:, :1], 1)
    mass = np.exp(np.where(np.isfinite(s), s - top, -np.inf)).sum(1, keepdims=True)
    sc = np.take_along_axis(s, cand, 1)
    ok = np.isfinite(sc)
    return ok, np.where(ok, np.exp(np.where(ok, sc, top) - top) / mass, 0.0)


def dpp(scores: np.ndarray, space: Space | None, k: int, lam: float,
        pool: int = POOL) -> np.ndarray:
    """[U, k] items re-ranked by the greedy MAP of a determinantal point process over each
    user's top `pool` items (Chen, Zhang & Zhou, NeurIPS 2018, with its incremental
    Cholesky): kernel L = diag(q) S diag(q), S the similarity Gram matrix of the candidates
    in `space` (PLM cosines, or genre Jaccard: a positive semi-definite kernel too),
    q_i = p_i ** a with a = (1 - lam) / (2 lam) and p the softmax as in `mmr`, so each step
    maximises 2a * sum log p + log det S over the list. lam = 0 is the plain ranking; larger
    lam weights the volume the list's vectors span (diversity) more. Candidates the kernel
    cannot add volume with (numerically dependent) are listed by score after the others."""
    cand = _candidates(scores, k, lam, pool)
    if lam == 0.0:
        return cand[:, :k]
    ok, p = _pool_probs(scores, cand)
    a = (1 - lam) / (2 * lam)
    logq = np.where(ok, a * np.log(np.maximum(p, 1e-300)), -np.inf)
    q = np.exp(logq - logq.max(1, keepdims=True))        # scaled per row: same argmax
    rows, n = np.arange(len(cand)), min(k, cand.shape[1])
    vecs = space.features[cand].astype(np.float64)       # [U, P, D]
    gain = q ** 2                                        # d_i^2: L_ii minus what is explained
    basis = np.zeros((len(cand), n, cand.shape[1]))      # Cholesky rows of the picked items
    taken = ~ok
    picked = []
    for t in range(n):
        g = np.where(taken, -np.inf, np.maximum(gain, 0.0))
        j = g.argmax(1)  # ties at 0 (no volume left): the best-scored remaining item
        picked.append(j)
        taken[rows, j] = True
        col = q[rows, j][:, None] * space.sim(vecs, vecs[rows, j]) * q  # L[j, :]
        e = (col - np.einsum("ut,utp->up", basis[rows, :t, j], basis[:, :t])) / np.sqrt(
            np.maximum(gain[rows, j], 1e-300))[:, None]
        basis[:, t] = np.where((gain[rows, j] > 1e-12)[:, None], e, 0.0)
        gain = gain - basis[:, t] ** 2
    return np.take_along_axis(cand, np.stack(picked, 1), 1)


RERANKERS = {"mmr": mmr, "dpp": dpp}


def lambda_curve(score, split, spaces: dict[str, Space], lambdas: list[float], k: int = 10,
                 stage: str = "test", chunk: int = 256, method: str = "mmr",
                 similarity: str = "plm") -> list[dict]:
    """Full-ranking HR@k / NDCG@k and list diversity (in every space of `spaces`) of top-k
    lists re-ranked by `method` (RERANKERS) with spaces[similarity] as its similarity, one
    row per lambda (same users, inputs and candidates as fedrec.data.evaluate's full
    ranking; lambda 0 reproduces its full HR@k up to ties)."""
    rerank, space = RERANKERS[method], spaces[similarity]
    target = split.target(stage)
    nov = item_novelty(split.item_popularity(), split.n_users)
    stats = {lam: ListStats(split.n_items, nov, spaces, k) for lam in lambdas}
    hits = {lam: [] for lam in lambdas}
    gains = {lam: [] for lam in lambdas}
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    for ub, _, s in scored_chunks(score, split, stage, chunk):
        for lam in lambdas:
            lists = rerank(s, space, k, lam)
            stats[lam].add(lists)
            at = lists == target[ub][:, None]
            hits[lam].append(at.any(1))
            gains[lam].append((at * discount[:lists.shape[1]]).sum(1))
    return [{"lambda": lam, f"full/hr@{k}": float(np.concatenate(hits[lam]).mean()),
             f"full/ndcg@{k}": float(np.concatenate(gains[lam]).mean()), **stats[lam].summary()}
            for lam in lambdas]


def random_list_ild(space: Space, n_pairs: int = 200_000, seed: int = 0) -> float:
    """Expected ILD of a list drawn uniformly from the catalog: 1 - the mean similarity of
    distinct item pairs (all of them, or n_pairs random ones in a large catalog): the scale's reference point
    (raw PLM vectors are anisotropic)."""
    n = len(space.features)
    if n * (n - 1) <= n_pairs:  # a small catalog: every distinct pair, exactly
        a, b = np.nonzero(~np.eye(n, dtype=bool))
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, n, n_pairs), rng.integers(0, n - 1, n_pairs)
        b = b + (b >= a)  # distinct pairs
    return float(1.0 - space.sim(space.features[a][:, None], space.features[b]).mean())


def curve_runs(run_dirs: list[str], lambdas: str, method: str = "mmr",
               similarity: str = "plm") -> dict:
    """`fedrec diversity-curve`: lambda_curve of `method` on the test users of each run
    (seeds), mean ± std per lambda: a result file's body."""
    if method not in RERANKERS:
        raise FedrecError(f"--method: '{method}' is not one of {', '.join(RERANKERS)}")
    try:
        grid = [float(x) for x in lambdas.split(",")]
    except ValueError:
        raise FedrecError(f"--lambdas: '{lambdas}' is not a comma-separated list of numbers") from None
    if not all(0.0 <= x <= 1.0 for x in grid):
        raise FedrecError(f"--lambdas: every weight must be in [0, 1], got {lambdas}")
    runs = []
    for run_dir in run_dirs:
        cfg, net, p = load_for_dataset(run_dir)
        spaces = list_spaces(cfg, p)
        if similarity not in spaces:
            raise FedrecError(f"--similarity: '{similarity}' is not one of {', '.join(spaces)}"
                              " (genres needs a catalog with a genre or tag field)")
        rows = lambda_curve(scorer(net, torch.from_numpy(p.item_emb)), p.split, spaces, grid,
                            method=method, similarity=similarity)
        runs.append({"model": run_dir, "seed": cfg.train.seed, "curve": rows})
    keys = [k for k in runs[0]["curve"][0] if k != "lambda"]
    summary = [{"lambda": lam, **summarize([{k: r["curve"][i][k] for k in keys} for r in runs])}
               for i, lam in enumerate(grid)]
    return {"method": f"diversity-curve ({method.upper()}, {similarity} similarity)",
            "similarity": similarity, "config": cfg.to_flat(), "runs": runs, "summary": summary,
            "random-list-ild@10": {name: random_list_ild(space) for name, space in spaces.items()}}
