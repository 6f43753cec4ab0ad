"""Misbehaving devices on demand, for simulations: failed rounds and poisoned updates.

`fed.failure-rate` makes each sampled client fail its round with that probability, the
draw fixed by (train.seed, round, client) so a rerun fails the same clients; the failure
takes the form `fed.failure-kind` names (or one of them at random with "mixed"):

  raise   the handler raises before training (Flower turns it into an error reply)
  nan     the upload holds a NaN and an Inf
  shape   one uploaded array lost its last row
  keys    one uploaded array is renamed

`fed.poison-rate` picks a fixed set of clients per train.seed (attackers stay attackers)
that upload `sent + POISON_SCALE * (trained - sent)`: their honest update, sign-flipped
and a thousand times larger. The server's defences (fedrec/federation/replies.py, fed.strategy) are
what these exist to exercise; a real device never sets them.
"""

import numpy as np

FAILURE_KINDS = ("raise", "nan", "shape", "keys")
POISON_SCALE = -1e3
_FAIL, _POISON = 1, 2  # stream tags: failures and poisoning draw independently


class InjectedFailure(RuntimeError):
    """A failure fed.failure-rate asked for."""


def _uniform(*key: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(list(key))).random(2)


def planned_fault(seed: int, client: int, server_round: int, failure_rate: float,
                  failure_kind: str, poison_rate: float) -> str | None:
    """What client `client` does wrong in `server_round`: "poison", a failure kind, or None."""
    if poison_rate > 0 and _uniform(seed, client, _POISON)[0] < poison_rate:
        return "poison"
    if failure_rate > 0:
        u = _uniform(seed, server_round, client, _FAIL)
        if u[0] < failure_rate:
            if failure_kind == "mixed":
                return FAILURE_KINDS[int(u[1] * len(FAILURE_KINDS))]
            return failure_kind
    return None


def corrupt(kind: str, sent: dict[str, np.ndarray], params: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """The upload a `kind` client sends instead of `params` (trained from `sent`); a
    "raise" client raises InjectedFailure before it trains and never gets here."""
    out = {k: v.copy() for k, v in params.items()}
    first = next(k for k, v in out.items() if v.ndim >= 1 and v.shape[0] > 1)
    if kind == "nan":
        out[first].flat[0] = np.nan
        out[next(reversed(out))].flat[-1] = np.inf
    elif kind == "shape":
        out[first] = out[first][:-1]
    elif kind == "keys":
        out = {(k + ".renamed" if k == first else k): v for k, v in out.items()}
    elif kind == "poison":
        out = {k: (sent[k] + POISON_SCALE * (v - sent[k])).astype(v.dtype)
               for k, v in out.items()}
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return out
