"""`fedrec simulate --ray-address`: the simulation on a real two-node Ray cluster on this
host (a head and one worker node, each its own `ray start` process with one CPU, stopped
by pid), whose ClientApp actors run on both nodes; a wrong address is one error line.

Ray resolves a loopback head address to the host's own interface on purpose (its
processes bind there as well as on 127.0.0.1); the test names only 127.0.0.1 and its own
temporary directory, so no other Ray instance on the machine sees this cluster."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_simulate import flwr_processes, write_tiny_dataset

from fedrec.config import Config, load_defaults
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.federation.simulate import check_ray_address, descendants, run_simulation

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _actors(pid: int) -> set[int]:
    """Pids of Flower's ClientApp actors among one `ray start` process's descendants."""
    out = set()
    for p in descendants([pid]):
        try:
            if "ClientAppActor" in " ".join(psutil.Process(p).cmdline()):
                out.add(p)
        except psutil.Error:
            continue
    return out


def _cpu(pids: set[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            t = psutil.Process(p).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _stop(procs: list[subprocess.Popen]) -> None:
    """Each node's `ray start` and everything it started, by pid."""
    pids = descendants([p.pid for p in procs])
    for pid in pids:
        try:
            psutil.Process(pid).terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=15)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path):
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live here
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block",
              "--disable-usage-stats"]
    logs = [open(tmp_path / f"{n}.log", "w") for n in ("head", "worker")]  # noqa: SIM115
    nodes = [subprocess.Popen([RAY, "start", "--head", "--port", str(port),
                               "--include-dashboard", "false", "--temp-dir", temp, *common],
                              stdout=logs[0], stderr=subprocess.STDOUT, env=env)]
    try:
        deadline = time.monotonic() + 120
        while not (Path(temp) / "ray_current_cluster").is_file():
            assert time.monotonic() < deadline and nodes[0].poll() is None, \
                (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        nodes.append(subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", *common],
                                      stdout=logs[1], stderr=subprocess.STDOUT, env=env))
        time.sleep(10)  # the worker registers with the head
        assert nodes[1].poll() is None, (tmp_path / "worker.log").read_text()[-2000:]

        data = write_tiny_dataset(tmp_path / "data", n_users=12)
        cfg = Config.from_flat(load_defaults()).override(**{
            "data.dataset": str(data), "data.cache-dir": str(tmp_path / "cache"),
            "data.eval-negatives": 20, "model.kind": "fedmf", "model.dim": 64,
            "fed.num-rounds": 5, "fed.clients-per-round": 0, "fed.eval-every": 1,
            "fed.server-lr-warmup": 0, "train.batch-size": 8,
            "train.local-epochs": 40})  # enough work per message to measure on each node
        prepare(cfg)
        run_dir = tmp_path / "run"
        cpu: dict[int, list[float]] = {}  # round -> CPU seconds of each node's actors then
        done = threading.Event()

        def watch() -> None:  # the ServerApp rewrites results.json after every round
            while not done.is_set():
                try:
                    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
                except (OSError, ValueError, KeyError):
                    rounds = []
                for r in rounds:
                    cpu.setdefault(r["round"], [_cpu(_actors(node.pid)) for node in nodes])
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            results = run_simulation(cfg, None, run_dir, num_supernodes=12, log=lambda _: None,
                                     timeout=400, ray_address=f"127.0.0.1:{port}")
        finally:
            done.set()
            watcher.join()
        assert results["status"] == "completed"
        assert all(r["train"]["clients"] == 12 for r in results["rounds"] if "train" in r)
        # after round 1 (actors started, libraries imported) the actors of each node kept
        # working: rounds 2-5 ran ClientApp messages on the head and on the worker
        assert {1, 5} <= set(cpu), cpu
        assert all(cpu[5][i] - cpu[1][i] > 0.2 for i in (0, 1)), cpu
        # The run's own processes are gone: Ray tears its actors down asynchronously after the
        # run, which on a loaded machine took a few seconds (seen once: two pids at the check).
        deadline = time.monotonic() + 30
        while flwr_processes(run_dir / ".flwr") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert flwr_processes(run_dir / ".flwr") == []
        assert all(n.poll() is None for n in nodes)  # the cluster outlives one run
    finally:
        _stop(nodes)
        for f in logs:
            f.close()
    assert not [p for p in descendants([n.pid for n in nodes]) if psutil.pid_exists(p)]


def test_a_wrong_ray_address_is_one_clear_error_line(run_cli):
    port = _free_port()  # nothing listens there
    with pytest.raises(FedrecError, match=rf"no Ray head answers at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    for bad in ("127.0.0.1", "host:port", ":6379", "h:70000"):
        with pytest.raises(FedrecError, match="is not HOST:PORT"):
            check_ray_address(bad)
    code, _, err = run_cli("simulate", "--ray-address", f"127.0.0.1:{port}", "--seeds", "0")
    assert code == 2 and "--ray-address: no Ray head answers" in err and err.count("\n") == 1
    code, _, err = run_cli("simulate", "--ray-address", "127.0.0.1:1", "--engine", "inprocess")
    assert code == 2 and "needs --engine flower" in err
