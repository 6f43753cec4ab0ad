"""A simulated device's own disk: its user-local state, kept so a resumed run continues it.

A device keeps its user-local parameters in Flower's context.state, which lives as long
as the simulation does; `fedrec simulate --resume` starts a new one. So every simulated
device also writes its state after each round it trains, to
``<fed.run-dir>/devices/<partition-id>/round-NNNN.safetensors`` (the run directory stands
in for the device's disk; the server never reads it). A resumed device loads the newest
file from before the round it is asked about, so a device that trained in the round the
run was killed in starts that round again from the state it had before it.

The two newest files are kept: the older one is still needed if the run is killed in the
round the newer one was written in. A real device (deployment) keeps context.state only
while its SuperNode runs; a restarted SuperNode starts with a fresh local state.

`restore` / `keep` are what both client paths (clients/app.py, fedrec/secagg.py) call:
the user-local parameters and the DP-SGD accountant history ("privacy/<key>" arrays on
disk), so a resumed device's ε continues instead of restarting.
"""

import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrec.files import atomic_path

_NAME = re.compile(r"round-(\d{4,})\.safetensors")


def _dir(run_dir: str, device: int) -> Path:
    return Path(run_dir).expanduser() / "devices" / str(device)


def _rounds(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in os.listdir(d) if (m := _NAME.fullmatch(f)))


def save_local(run_dir: str, device: int, server_round: int, state: dict[str, np.ndarray]
               ) -> None:
    """Store `device`'s state after training in `server_round`; drop all but the newest two."""
    d = _dir(run_dir, device)
    path = d / f"round-{server_round:04d}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    for old in [r for r in _rounds(d) if r < server_round][:-1]:
        (d / f"round-{old:04d}.safetensors").unlink(missing_ok=True)


def load_local(run_dir: str, device: int, before_round: int) -> dict[str, np.ndarray] | None:
    """The newest state `device` stored in a round < `before_round`, or None."""
    d = _dir(run_dir, device)
    earlier = [r for r in _rounds(d) if r < before_round]
    return load_file(str(d / f"round-{earlier[-1]:04d}.safetensors")) if earlier else None


LOCAL = "user-local"  # context.state key of the user-local parameters
PRIVACY = "privacy-accountant"  # context.state key of the DP-SGD accountant history
ACCOUNTANT_ON_DISK = ("noise-multiplier", "sample-rate", "steps")  # "privacy/<key>" arrays


def restore(context, cfg, user: int, server_round: int, training: bool, simulated: bool
            ) -> tuple[dict | None, dict | None]:
    """(user-local parameters, accountant state) the device holds before `server_round`:
    its context.state, or, for a simulated device of a resumed run (a new context), its
    disk."""
    local, acc = None, context.state.get(PRIVACY)
    if LOCAL in context.state:
        local = {k: a.numpy() for k, a in context.state[LOCAL].items()}
    elif simulated and cfg.fed.resume and cfg.fed.run_dir:  # a restarted simulation
        disk = load_local(cfg.fed.run_dir, user, server_round if training else server_round + 1)
        disk = disk or {}
        local = {k: v for k, v in disk.items() if not k.startswith("privacy/")} or None
        if acc is None and "privacy/steps" in disk:  # ε continues rather than restarting
            acc = {"accountant": cfg.privacy.accountant,
                   **{k: disk[f"privacy/{k}"].tolist() for k in ACCOUNTANT_ON_DISK}}
    return local, acc


def keep(context, cfg, user: int, server_round: int, simulated: bool,
         new_local: dict[str, np.ndarray], accountant=None) -> None:
    """After training: the new user-local parameters and accountant (fedrec.privacy.
    Accountant or None) into context.state and, on a simulated device, its disk."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    disk = dict(new_local)
    if accountant is not None:
        context.state[PRIVACY] = ConfigRecord(accountant.to_state())
        disk.update({f"privacy/{k}": np.asarray(v) for k, v in accountant.to_state().items()
                     if k in ACCOUNTANT_ON_DISK})
    if new_local:
        context.state[LOCAL] = ArrayRecord({k: Array(v) for k, v in new_local.items()})
    if disk and simulated and cfg.fed.run_dir:
        save_local(cfg.fed.run_dir, user, server_round, disk)
