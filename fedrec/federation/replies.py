"""Which client replies the server aggregates, and how far one update may move the model.

Flower's strategies skip error replies but raise InconsistentMessageReplies (and crash the
ServerApp) on a content reply that does not match the others, and average NaN or a wrong
shape straight into the global model. So every reply is checked first, against the
arrays the server sent this round, and a failing one is dropped and counted by reason:

  error      the client raised or its node failed (Flower's error reply)
  timeout    no reply within fed.round-timeout
  malformed  not exactly one ArrayRecord "arrays" (train) and one MetricRecord "metrics",
             non-numeric arrays, a metric that is not a number, num-examples missing or
             not positive (train) / negative (evaluate), or metric keys that differ from
             the other replies' (the most common key set wins)
  keys       array names differ from the ones sent
  shape      an array's shape differs from the one sent
  nonfinite  NaN or Inf in an array or a metric (except ε = +inf: DP-SGD run without
             noise, which has no guarantee and says so)
"""

from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedrec.privacy.accounting import EPSILON_METRIC

REASONS = ("error", "timeout", "malformed", "keys", "shape", "nonfinite")
WEIGHT = "num-examples"


def _metrics_problem(msg: Message, min_weight: float) -> str | None:
    metrics = msg.content.metric_records
    if list(metrics) != ["metrics"]:
        return "malformed"
    values = dict(metrics["metrics"])
    if any(isinstance(v, (list, bool)) or not isinstance(v, (int, float)) for v in values.values()):
        return "malformed"
    if not all(np.isfinite(v) or (k == EPSILON_METRIC and v == np.inf) for k, v in values.items()):
        return "nonfinite"
    if WEIGHT not in values or values[WEIGHT] < min_weight:
        return "malformed"
    return None


def train_problem(msg: Message, sent: dict[str, np.ndarray]) -> str | None:
    """Why this train reply must not be aggregated, or None if it may."""
    if msg.has_error():
        return "error"
    if list(msg.content.array_records) != ["arrays"]:
        return "malformed"
    problem = _metrics_problem(msg, min_weight=1e-12)  # a zero weight is no update
    if problem:
        return problem
    try:
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    except Exception:  # noqa: BLE001 - undecodable bytes are a malformed reply
        return "malformed"
    if set(arrays) != set(sent):
        return "keys"
    if any(a.shape != sent[k].shape for k, a in arrays.items()):
        return "shape"
    if any(not np.issubdtype(a.dtype, np.number) for a in arrays.values()):
        return "malformed"
    if not all(np.isfinite(a).all() for a in arrays.values()):
        return "nonfinite"
    return None


def evaluate_problem(msg: Message) -> str | None:
    """Why this evaluate reply must not be aggregated, or None if it may."""
    if msg.has_error():
        return "error"
    if msg.content.array_records:
        return "malformed"
    return _metrics_problem(msg, min_weight=0)


def filter_replies(replies: Iterable[Message], expected: int,
                   problem: Callable[[Message], str | None]) -> tuple[list[Message], dict]:
    """(replies to aggregate, failures per reason, every reason present) out of `expected`
    sent messages; missing replies count as timeouts."""
    replies = list(replies)
    failures = Counter({r: 0 for r in REASONS})
    valid = []
    for msg in replies:
        why = problem(msg)
        if why:
            failures[why] += 1
        else:
            valid.append(msg)
    if valid:  # Flower needs one metric key set: keep the most common one
        sets = Counter(frozenset(m.content["metrics"]) for m in valid)
        keep = max(sets, key=lambda s: (sets[s], -_first(valid, s)))
        failures["malformed"] += sum(frozenset(m.content["metrics"]) != keep for m in valid)
        valid = [m for m in valid if frozenset(m.content["metrics"]) == keep]
    failures["timeout"] += max(expected - len(replies), 0)
    return valid, dict(failures)


def _first(valid: list[Message], keys: frozenset) -> int:
    return next(i for i, m in enumerate(valid) if frozenset(m.content["metrics"]) == keys)


def _update(msg: Message, sent: dict[str, np.ndarray]) -> tuple[dict, dict, float]:
    """(reply arrays, update = reply - sent, its L2 norm over all arrays)."""
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    delta = {k: a.astype(np.float64) - sent[k] for k, a in arrays.items()}
    return arrays, delta, float(np.sqrt(sum(float((d * d).sum()) for d in delta.values())))


def update_norm(msg: Message, sent: dict[str, np.ndarray]) -> float:
    """L2 norm of the reply's update (reply - sent) over all arrays."""
    return _update(msg, sent)[2]


def bound_update(msg: Message, sent: dict[str, np.ndarray], max_norm: float) -> float:
    """Clip the reply's update (reply - sent) to L2 norm `max_norm` over all arrays, in
    place; returns the update's norm before clipping."""
    arrays, delta, norm = _update(msg, sent)
    if norm > max_norm:
        scale = max_norm / norm
        msg.content["arrays"] = ArrayRecord({
            k: Array(np.asarray(sent[k] + scale * delta[k], dtype=arrays[k].dtype))
            for k in arrays})
    return norm
