"""Result files: every number in README comes from one of these JSON files.

A result file holds the command that produced it, the config, per-seed metrics and their
mean ± std, and the machine it ran on. Writes are atomic (temp file, then rename).
"""

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedrec.files import write_text_atomic

HEADLINE = ("full/hr@10", "full/ndcg@10", "full/cold/hr@10", "new-items/hr@10", "sampled/hr@10",
            "sampled/cold/hr@10")
SELECT = "full/hr@10"  # model selection (on validation): the headline metric
CURVE_KEYS = ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10")  # per epoch/round


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{key: {"mean", "std"}} over seeds (population std, ddof=0; NaN-free keys only)."""
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], (int, float))]
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in per_seed], dtype=float)
        out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out


def machine() -> dict:
    """Where and from which code a result came (the commit is "unknown" outside git)."""
    import torch  # lazy: ~1.2 s to import, and the CLI reads results at start-up

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "commit": git_commit()}


@functools.cache
def git_commit() -> str:
    """HEAD of the checkout this package runs from, "+dirty" if its code (the packages,
    simulations/, pyproject.toml) has uncommitted changes;
    read once per process (the CLI asks at start-up, so a long run records the code it
    started with, not what the checkout holds when it ends)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "fedrec", "clients", "server", "simulations", "pyproject.toml"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def command_line() -> str:
    return " ".join(["fedrec", *sys.argv[1:]]) if sys.argv[0].endswith("fedrec") else " ".join(sys.argv)


def write_json(path: str | Path, payload: dict) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=float) + "\n")


def fmt(stat: dict[str, float] | None) -> str:
    if not stat or stat["mean"] != stat["mean"]:  # NaN: no users in that group
        return "n/a"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def write_result(path: str | Path | None, body: dict) -> None:
    """A result file: `body` (method, config, runs, summary, ...) with the command that
    produced it and the machine and commit it ran on. Nothing is written without a path."""
    if path:
        write_json(path, {"method": body.get("method"), "command": command_line(),
                          **{k: v for k, v in body.items() if k != "method"},
                          "machine": machine()})
