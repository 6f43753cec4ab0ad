"""A device's own disk: its user-local state, kept so a resumed run continues it.

A device keeps its user-local parameters and its DP-SGD accountant history in Flower's
context.state, which lives as long as the run does: a resumed run (`fedrec simulate
--resume`, or a deployment's run submitted again with fed.resume = true after its
SuperLink restarted) is a new Flower run with a fresh context. So every device also
writes that state after each round it trains, to ``<dir>/round-NNNN.safetensors``:
  simulated device  <fed.run-dir>/devices/<partition-id>/ (the run directory stands in
                    for its disk; the server never reads it)
  real device       <data-dir>/state/<run key>/ on the device itself (node_config
                    "data-dir"; the run key is a hash of the run's fed.run-dir, so
                    each run the device takes part in has its own files)
A resumed device loads the newest file from before the round it is asked about, so a
device that trained in the round the run was killed in starts that round again from the
state it had before it. The two newest files are kept: the older one is still needed if
the run is killed in the round the newer one was written in; files of later rounds can
only be an abandoned run's and are removed.

`restore` / `keep` are what both client paths (fedrec/federation/client_round.py,
fedrec/federation/secagg.py) call: the user-local parameters and the DP-SGD accountant
history ("privacy/<key>" arrays on disk), so a resumed device's ε continues instead of
restarting.
"""

import hashlib
import os
import re
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from safetensors.numpy import load_file, save_file

from fedrec.data.device import DATA_DIR
from fedrec.files import atomic_path

_NAME = re.compile(r"round-(\d{4,})\.safetensors")


def device_dir(context, cfg, user: int, simulated: bool) -> Path | None:
    """Where this device keeps its state for this run (None: the run has no fed.run-dir)."""
    if not cfg.fed.run_dir:
        return None
    if simulated:
        return Path(cfg.fed.run_dir).expanduser() / "devices" / str(user)
    key = hashlib.sha256(cfg.fed.run_dir.encode()).hexdigest()[:16]
    return Path(str(context.node_config[DATA_DIR])).expanduser() / "state" / key


def _rounds(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in os.listdir(d) if (m := _NAME.fullmatch(f)))


def save_local(d: Path, server_round: int, state: dict[str, np.ndarray]) -> None:
    """Store the state after training in `server_round`; keep the newest two."""
    path = d / f"round-{server_round:04d}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    rounds = _rounds(d)
    stale = [r for r in rounds if r < server_round][:-1] + [r for r in rounds if r > server_round]
    for old in stale:
        (d / f"round-{old:04d}.safetensors").unlink(missing_ok=True)


def load_local(d: Path, before_round: int) -> dict[str, np.ndarray] | None:
    """The newest state stored in `d` in a round < `before_round`, or None."""
    earlier = [r for r in _rounds(d) if r < before_round]
    return load_file(str(d / f"round-{earlier[-1]:04d}.safetensors")) if earlier else None


LOCAL = "user-local"  # context.state key of the user-local parameters
PRIVACY = "privacy-accountant"  # context.state key of the DP-SGD accountant history
ACCOUNTANT_ON_DISK = ("noise-multiplier", "sample-rate", "steps")  # "privacy/<key>" arrays


def restore(context, cfg, user: int, server_round: int, training: bool, simulated: bool
            ) -> tuple[dict | None, dict | None]:
    """(user-local parameters, accountant state) the device holds before `server_round`:
    its context.state, or, in a resumed run (a new context), its disk."""
    local, acc = None, context.state.get(PRIVACY)
    if LOCAL in context.state:
        local = {k: a.numpy() for k, a in context.state[LOCAL].items()}
    elif (PRIVACY not in context.state and cfg.fed.resume  # not yet kept in this run
          and (d := device_dir(context, cfg, user, simulated)) is not None):
        disk = load_local(d, server_round if training else server_round + 1) or {}
        local = {k: v for k, v in disk.items() if not k.startswith("privacy/")} or None
        if acc is None and "privacy/steps" in disk:  # ε continues rather than restarting
            acc = {"accountant": cfg.privacy.accountant,
                   **{k: disk[f"privacy/{k}"].tolist() for k in ACCOUNTANT_ON_DISK}}
    return local, acc


def keep(context, cfg, user: int, server_round: int, simulated: bool,
         new_local: dict[str, np.ndarray], accountant=None) -> None:
    """After training: the new user-local parameters and accountant (fedrec.privacy.accounting.
    Accountant or None) into context.state and onto the device's disk."""
    disk = dict(new_local)
    if accountant is not None:
        state = accountant.to_state()
        context.state[PRIVACY] = ConfigRecord(state)
        disk.update({f"privacy/{k}": np.asarray(state[k]) for k in ACCOUNTANT_ON_DISK})
    if new_local:
        context.state[LOCAL] = ArrayRecord({k: Array(v) for k, v in new_local.items()})
    if disk and (d := device_dir(context, cfg, user, simulated)) is not None:
        save_local(d, server_round, disk)
