"""Run a federated simulation through Flower's own CLI: `flwr run --stream`.

The ServerApp and ClientApp run exactly as they would for a user typing `flwr run .`:
Flower builds the app bundle (FAB) from the repo, a local SuperLink starts it, and the
Simulation Engine (Ray) runs one virtual SuperNode per user. This module only adds what
the CLI leaves to the caller:

- the config: every key that differs from pyproject's defaults goes to
  ``<run_dir>/overrides.toml`` (flat, quoted dotted keys) and is passed with
  ``--run-config``; paths are made absolute, because the apps run from a copy of the
  bundle under ``$FLWR_HOME/apps`` with the SuperLink's working directory;
- isolation: ``FLWR_HOME=<run_dir>/.flwr`` and free loopback ports for the local
  SuperLink, so two runs (or a developer's own SuperLink on 39091) never share one;
- clean-up: the local SuperLink is started detached and outlives ``flwr run``, with no
  pid file; afterwards (also on errors and Ctrl-C) every process carrying this run's
  FLWR_HOME or ports (SuperLink, flower-superexec, flwr-simulation, Ray) is stopped;
- the outcome: ``flwr run`` exits 0 even when the run failed, so success is read from
  ``results.json`` ("status": "completed"), else from ``flwr ls --run-id``.

Size: the `flwr run` wrapper and the process management it needs (ports, FLWR_HOME,
stopping by pid) in one place, so every path that starts Flower stops it the same way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

import fedrec
from fedrec.config import Config, load_defaults
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.federation.run_store import run_dir_for
from fedrec.files import data_home, write_text_atomic

PROJECT_DIR = Path(fedrec.__file__).resolve().parents[1]  # holds pyproject.toml
OVERRIDES_FILE = "overrides.toml"
LOG_FILE = "flwr.log"

# Lines of `flwr run --stream` shown when the stream is filtered: the server's round
# lines, client failures, warnings and errors (minus known noise).
_KEEP = re.compile(r"^round\s+\d+|run directory:|Successfully started run|WARNING|ERROR|"
                   r"Traceback|\w(Error|Exception)\b|[1-9]\d* failures|failed", re.ASCII)
_NOISE = ("default simulated SuperNodes changed", "FutureWarning", "warnings.warn(")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- config

def config_overrides(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Every key of `cfg` that differs from pyproject's defaults, with absolute paths and
    ``fed.run-dir`` = the absolute `run_dir` (the apps do not run in the caller's cwd)."""
    flat = cfg.to_flat()
    d = flat["data.dataset"]
    if Path(d).expanduser().is_dir():  # a directory, not a fetched dataset name
        flat["data.dataset"] = str(Path(d).expanduser().resolve())
    # Pin the cache too: "" means $FEDREC_HOME or ~ of whichever process reads it.
    flat["data.cache-dir"] = str(data_home(flat["data.cache-dir"]).resolve())
    if flat["encoder.model-dir"]:
        flat["encoder.model-dir"] = str(Path(flat["encoder.model-dir"]).expanduser().resolve())
    if flat["model.prior"]:
        flat["model.prior"] = str(Path(flat["model.prior"]).expanduser().resolve())
    flat["fed.run-dir"] = str(Path(run_dir).expanduser().resolve())
    defaults = load_defaults()
    return {k: v for k, v in flat.items()
            if not (k in defaults and type(defaults[k]) is type(v) and defaults[k] == v)}


def write_overrides(path: Path, overrides: Mapping[str, Any]) -> Path:
    """A flat TOML file: one `"dotted.key" = value` line per override (Flower's
    `--run-config FILE` flattens it back to the same dotted keys)."""
    for k, v in overrides.items():
        if type(v) not in (bool, int, float, str):
            raise FedrecError(f"config value {k} = {v!r}: only bool, int, float and str are allowed")
        if isinstance(v, str) and any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            raise FedrecError(f"config string {k} = {v!r} holds an invalid character")
    return write_text_atomic(path, "# fedrec run-config overrides (keys differing from "
                             "pyproject defaults)\n" + tomli_w.dumps(dict(overrides)))


# ----------------------------------------------------------------------------- processes

def free_port(exclude: set[int] = frozenset()) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise FedrecError("no free TCP port on 127.0.0.1")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def descendants(pids: list[int]) -> list[int]:
    """`pids` (the live ones) and every live descendant of them."""
    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found |= {pid, *(c.pid for c in proc.children(recursive=True))}
        except psutil.Error:
            continue
    return sorted(found)


def find_processes(flwr_home: Path, ports: tuple[int, ...] = ()) -> list[int]:
    """Pids of processes of one run: FLWR_HOME in their cmdline or environment, a chosen
    port in their cmdline, and all their descendants. Never this process or its
    ancestors."""
    home = str(flwr_home)
    # Delimited marks: port 5883 must not match 58839, nor a home /x/.flwr /x/.flwr2.
    cmd_marks = [home + "/", home + "\0"] + [
        m for p in ports for m in (f"127.0.0.1:{p}\0", f"--port\0{p}\0")]
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        info = proc.info
        if info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        cmd = "\0".join(info["cmdline"] or []) + "\0"
        if (info["environ"] or {}).get("FLWR_HOME") == home or any(m in cmd for m in cmd_marks):
            found.append(proc.pid)
    me = psutil.Process()
    protected = {me.pid, *(p.pid for p in me.parents())}
    return sorted(set(descendants(found)) - protected)


def stop_processes(flwr_home: Path, ports: tuple[int, ...] = (), grace: float = 10.0,
                   log: Callable[[str], None] | None = None) -> list[int]:
    """TERM every process of the run, wait up to `grace` s, then KILL the rest; repeat a
    few times since a dying parent may still spawn or orphan children. Returns pids."""
    stopped: list[int] = []
    for _ in range(3):
        pids = find_processes(flwr_home, ports)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        rest = [p for p in pids if _alive(p)]
        for pid in rest:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if rest and log:
            log(f"killed {len(rest)} Flower process(es) that ignored SIGTERM")
        stopped += pids
        time.sleep(0.2)
    return stopped


# ----------------------------------------------------------------------------- running

def flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else `uv sync` per run
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        # the CLI starts `flower-superlink` by name: this venv's, not another one
        "PATH": os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep)
                                            if p and p != bin_dir]]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _flwr_ls(flwr: str, run_id: str, env: dict, cwd: Path) -> tuple[str, str]:
    """(status, details) of a run from the SuperLink, or ("", why) if unavailable."""
    try:
        out = subprocess.run([flwr, "ls", "--run-id", run_id, "--format", "json"], env=env,
                             cwd=cwd, capture_output=True, text=True, timeout=60,
                             check=False).stdout
        start = out.find("{")
        runs = json.loads(out[start:])["runs"] if start >= 0 else []
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        return "", f"flwr ls failed: {exc}"
    if not runs:
        return "", "flwr ls returned no run"
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _read_results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_ray_address(address: str) -> str:
    """`HOST:PORT` of a running Ray cluster's head (its GCS port), or one FedrecError line."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedrecError(f"--ray-address: '{address}' is not HOST:PORT (the head node's GCS "
                          "port, e.g. 10.0.0.5:6379, as `ray start --head --port 6379` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise FedrecError(f"--ray-address: no Ray head answers at {host}:{port} ({why}); start "
                          f"one with `ray start --head --port {port}` (docs/federated.md, "
                          "'Beyond one machine')") from None
    return f"{host}:{port}"


def run_simulation(cfg: Config, overrides: Mapping[str, Any] | None = None,
                   run_dir: str | Path | None = None, num_supernodes: int | None = None,
                   cpus_per_client: int = 1, log: Callable[[str], None] = print, *,
                   verbose: bool = False, timeout: float | None = None,
                   ray_address: str | None = None) -> dict:
    """Run `cfg` as a Flower simulation with `flwr run` and return its results.json.

    overrides: extra dotted keys applied on top of `cfg` (optional; `cfg` is enough).
    run_dir: the run directory (default: fed.run-dir, else <cache>/runs/<time>-<kind>).
    num_supernodes: virtual SuperNodes; must equal the number of users (default).
    verbose: pass every line of Flower's stream to `log` (default: round lines, warnings
    and errors). The whole stream always goes to <run_dir>/flwr.log.
    timeout: seconds before the run is stopped and reported as failed (default: none).
    ray_address: HOST:PORT of an existing Ray cluster to run the virtual SuperNodes on
    (Flower's Ray backend joins it through RAY_ADDRESS); default: a local one per run.
    With cfg.fed.resume, `run_dir` is a killed run to continue (fedrec/federation/run_store.py).
    Call fedrec.data.pipeline.prepare(cfg) first so the catalog embeddings are cached.
    Raises FedrecError with one line (and the log path) if the run did not complete.
    """
    if overrides:
        cfg = cfg.override(**dict(overrides))
    if run_dir is None:
        run_dir = run_dir_for(cfg)
    run_dir = Path(run_dir).expanduser().resolve()
    n_users = prepare(cfg).split.n_users  # data.users may take a subset
    if num_supernodes is None:
        num_supernodes = n_users
    if num_supernodes != n_users:  # fewer: the server waits forever; more: clients fail
        raise FedrecError(f"num-supernodes={num_supernodes}: a simulation runs one virtual "
                          f"SuperNode per user; this dataset has {n_users} users")
    if cpus_per_client < 1:
        raise FedrecError(f"cpus per client must be >= 1; got {cpus_per_client}")
    flwr = str(Path(sys.executable).parent / "flwr")
    if not os.access(flwr, os.X_OK):
        raise FedrecError(f"{flwr} not found; install fedrec's dependencies (make install)")

    run_dir.mkdir(parents=True, exist_ok=True)
    results_path, log_path = run_dir / "results.json", run_dir / LOG_FILE
    # Never read an earlier run's outcome as this one's. A resumed run keeps its results
    # (status "running" until its server finishes) and appends to its log.
    if results_path.exists() and not cfg.fed.resume:
        results_path.unlink()
    cfg_file = write_overrides(run_dir / OVERRIDES_FILE, config_overrides(cfg, run_dir))
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    http_port = free_port()
    control_port = free_port({http_port})
    ports = (http_port, control_port)
    env = flwr_env(flwr_home, http_port, control_port)
    env.pop("RAY_ADDRESS", None)  # never a cluster the caller did not name
    if ray_address:
        env["RAY_ADDRESS"] = check_ray_address(ray_address)
    cmd = [flwr, "run", str(PROJECT_DIR), "--stream", "--run-config", str(cfg_file),
           "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]

    run_id, last, t0 = "", "", time.monotonic()
    timed_out = threading.Event()
    old_term = _raise_on_sigterm()
    try:
        with open(log_path, "a" if cfg.fed.resume else "w", encoding="utf-8") as flog:
            flog.write("$ " + " ".join(cmd) + "\n")
            flog.flush()
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
            timer = None
            if timeout:
                def expire():
                    timed_out.set()
                    proc.kill()
                timer = threading.Timer(timeout, expire)
                timer.daemon = True
                timer.start()
            try:
                for raw in proc.stdout:
                    line = _ANSI.sub("", raw.rstrip("\n"))
                    flog.write(line + "\n")
                    flog.flush()
                    if line.strip():
                        last = line.strip()
                    m = _RUN_ID.search(line)
                    if m:
                        run_id = m.group(1)
                    if verbose or _keep(line):
                        log(_strip_prefix(line))
                proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = _read_results(results_path)
        status = results.get("status", "") if isinstance(results, dict) else ""
        if status == "completed" and not timed_out.is_set():
            log(f"simulation completed in {time.monotonic() - t0:.0f}s: {run_dir}")
            return results
        if timed_out.is_set():
            why = f"stopped after the {timeout:g}s timeout"
        elif run_id:
            flwr_status, details = _flwr_ls(flwr, run_id, env, run_dir)
            why = f"run {run_id} ended {flwr_status or 'with unknown status'}"
            if details:
                why += f": {_one_line(details)}"
        else:
            why = f"flwr run did not start a run (exit code {proc.returncode}: {_one_line(last)})"
        if results is None:
            why += "; no results.json was written"
        elif status != "completed":
            why += f"; results.json says status {status!r}"
        raise FedrecError(f"simulation failed: {why}; see {log_path}")
    finally:
        try:
            stop_processes(flwr_home, ports, log=log)
        finally:
            _restore_sigterm(old_term)


def _keep(line: str) -> bool:
    return bool(_KEEP.search(line)) and not any(n in line for n in _NOISE)


def _strip_prefix(line: str) -> str:
    """Drop Flower's log-level prefix ('INFO :      ') from a kept line."""
    return re.sub(r"^(INFO|DEBUG)\s*:\s*", "", line)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _raise_on_sigterm():
    """While a run is in flight, SIGTERM unwinds like Ctrl-C so the SuperLink is stopped."""
    if threading.current_thread() is not threading.main_thread():
        return None
    old = signal.getsignal(signal.SIGTERM)
    if old not in (signal.SIG_DFL, None):
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, handler)
    return old


def _restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)
