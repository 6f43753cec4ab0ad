"""Deployment: a device's own files become its ClientData; a real TLS SuperLink with
SuperNode authentication trains two real SuperNodes; wrong credentials are refused.

The end-to-end tests (marked slow) run on 127.0.0.1 with ephemeral ports, a tiny random
BERT and two tiny device directories, and stop every process they start by pid.
"""

import csv
import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import tiny
from fedrec.config import Config
from fedrec.data.datasets import load_dataset
from fedrec.data.device import (
    CACHE_DIR,
    client_data,
    load_device_client,
    read_catalog,
    read_history,
    write_device_dir,
)
from fedrec.deployment.commands import (
    CONNECTION,
    deploy_env,
    flwr_bin,
    node_config_arg,
    stop_tree,
    superlink_args,
    supernode_args,
    write_connection,
)
from fedrec.deployment.transport import create_credentials
from fedrec.errors import FedrecError
from fedrec.federation.local_store import LOCAL
from fedrec.federation.simulate import (
    PROJECT_DIR,
    config_overrides,
    free_port,
    stop_processes,
    write_overrides,
)
from fedrec.models.build import id_tables


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny dataset + PLM; a server-side catalog-only dir; device dirs for u0 and u1."""
    root = tiny.build(tmp_path_factory.mktemp("deploy"))
    cat = read_catalog(root / "data")
    with open(root / "data" / "interactions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for user in ("u0", "u1"):
        mine = [(r["item"], float(r["timestamp"])) for r in rows if r["user"] == user]
        write_device_dir(root / f"device-{user}", cat, *map(list, zip(*mine)))
    (root / "catalog").mkdir(exist_ok=True)
    (root / "catalog" / "items.csv").write_bytes((root / "data" / "items.csv").read_bytes())
    return root


def deploy_config(root: Path, **over) -> Config:
    return tiny.tiny_config(root, {"data.dataset": str(root / "catalog"),
                                   "data.cache-dir": str(root / "server-cache"),
                                   "fed.min-nodes": 2, "fed.clients-per-round": 0, **over})


# ----------------------------------------------------------------------------- the device


def test_device_split_is_leave_one_out_with_its_own_negatives(world):
    cat = read_catalog(world / "catalog")
    seq = read_history(world / "device-u0" / "history.csv", cat)
    ds = load_dataset(str(world / "data"))
    assert seq.tolist() == ds.items[ds.users == ds.user_ids.index("u0")].tolist()  # time order
    d = client_data(seq, cat, eval_negatives=20, seed=0)
    assert (d.val, d.test) == (seq[-2], seq[-1]) and d.history.tolist() == seq[:-2].tolist()
    for negs in (d.val_negatives, d.test_negatives):
        assert len(negs) == 20 and len(set(negs)) == 20
        assert not set(negs) & set(seq.tolist())  # never an item the user touched
    again = client_data(seq, cat, eval_negatives=20, seed=0)
    assert again.test_negatives.tolist() == d.test_negatives.tolist()  # fixed seed
    short = client_data(seq[:2], cat, 20, 0)
    assert (short.val, short.test) == (-1, -1) and short.history.tolist() == seq[:2].tolist()
    assert (short.test_negatives == -1).all()


def test_catalog_marks_cold_items(tmp_path):
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"item": str(i), "title": f"t{i}", "cold": i in (3, 10)}) + "\n"
        for i in (10, 2, 3, 1, 4)))
    cat = read_catalog(tmp_path)
    assert cat.item_ids == ["1", "2", "3", "4", "10"]  # numeric id order, as fedrec.data.datasets
    assert cat.cold.tolist() == [False, False, True, False, True]
    (tmp_path / "history.csv").write_text("item,timestamp\n3,5\n1,1\n2,2\n1,9\n4,3\n")
    seq = read_history(tmp_path / "history.csv", cat)
    assert [cat.item_ids[i] for i in seq] == ["1", "2", "4", "3"]  # by time, repeat dropped
    d = client_data(seq, cat, 5, 0)
    assert cat.item_ids[d.test] == "3" and d.test_is_cold
    assert not d.warm[cat.item_ids.index("10")]


@pytest.mark.parametrize("content, message", [
    (None, "history file not found"),
    ("", "file is empty"),
    ("item,timestamp\n", "no interactions, only a header"),
    ("thing,timestamp\n1,2\n", "missing column 'item'"),
    ("item,timestamp\n1,5\n999,6\n998,7\n", "history.csv:3: item '999' is not in the catalog"),
    ("item,timestamp\n1,soon\n", "timestamp 'soon' is not a number"),
])
def test_history_errors_name_the_file(world, tmp_path, content, message):
    path = tmp_path / "history.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FedrecError, match=message) as err:
        read_history(path, read_catalog(world / "catalog"))
    assert "\n" not in str(err.value)


def test_device_reads_only_its_own_directory(world, tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("history.csv", "items.csv"):
        (dev / name).write_bytes((world / "device-u1" / name).read_bytes())
    # The run config names the server's paths; a device must not need them.
    cfg = deploy_config(world).override(**{"data.dataset": "/nonexistent/server/data",
                                           "data.cache-dir": "/nonexistent/server/cache"})
    before = sorted(p.name for p in tmp_path.iterdir())
    _, E, data = load_device_client(cfg.to_flat(), {"data-dir": str(dev)})
    assert E.shape == (tiny.N_ITEMS, tiny.HIDDEN) and data.n_items == tiny.N_ITEMS
    assert list((dev / CACHE_DIR / "embeddings").glob("*.npz"))  # the device's own cache
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(FedrecError, match="node_config has no 'data-dir'"):
        load_device_client(cfg.to_flat(), {"partition-id": 0})
    with pytest.raises(FedrecError, match="no items.jsonl or items.csv"):
        load_device_client(cfg.to_flat(), {"data-dir": str(dev), "catalog": str(tmp_path)})


def test_embedding_cache_follows_the_model_files(world, tmp_path):
    import shutil

    from fedrec.data.device import item_embeddings
    from fedrec.data.encoder import _encoder

    bert = shutil.copytree(world / "bert", tmp_path / "bert")
    cfg = deploy_config(world, **{"encoder.model-dir": str(bert)})
    cat = read_catalog(world / "catalog")
    first = item_embeddings(cfg, cat, tmp_path / "cache")
    assert (tmp_path / "cache" / "embeddings" / "model-fingerprints.json").is_file()
    assert np.array_equal(item_embeddings(cfg, cat, tmp_path / "cache"), first)
    tiny.write_bert(bert, seed=1)  # the model is replaced in place: new weights, new mtimes
    _encoder.cache_clear()  # (a device runs each message in a fresh process)
    again = item_embeddings(cfg, cat, tmp_path / "cache")
    assert again.shape == first.shape and not np.allclose(again, first)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npz"))) == 2


def test_clientapp_device_path_uploads_only_federated_parameters(world, tmp_path):
    import clients.app
    from fedrec.federation.run_store import FederatedRun

    cfg = deploy_config(world, **{"fed.run-dir": str(tmp_path / "run")})
    run = FederatedRun(cfg, log=lambda *_: None)
    assert run.population == 2 and run.server_evaluate(0, run.initial_arrays()) is None
    init = run.initial_arrays()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(world / "device-u0")},
                  state=RecordDict(), run_config=cfg.to_flat())
    msg = Message(RecordDict({"arrays": init, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = clients.app.train(msg, ctx)
    assert list(reply.content["arrays"]) == list(init)  # federated keys only, same order
    assert reply.content["metrics"]["num-examples"] > 0
    assert LOCAL not in ctx.state  # the seq model reads the user from the history
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in reply.content["arrays"].items()})
    ev = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                 dst_node_id=7, message_type="evaluate")
    metrics = clients.app.evaluate(ev, ctx).content["metrics"]
    assert metrics["num-examples"] == 1 and 0.0 <= metrics["sampled/hr@10"] <= 1.0
    mf = deploy_config(world, **{"fed.run-dir": str(tmp_path / "mf"), "model.kind": "fedmf"})
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(world / "device-u0")},
                  state=RecordDict(), run_config=mf.to_flat())
    init = FederatedRun(mf, log=lambda *_: None).initial_arrays()
    msg = Message(RecordDict({"arrays": init, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    assert list(clients.app.train(msg, ctx).content["arrays"]) == list(init)
    assert LOCAL in ctx.state  # FedMF's user vector stays on the device


def test_node_config_quoting():
    assert node_config_arg({"data-dir": "/a b/c", "model-dir": "/x'y"}) == \
        "data-dir='/a b/c' model-dir=\"/x'y\""
    with pytest.raises(FedrecError, match="both quote kinds"):
        node_config_arg({"data-dir": "/a'\"b"})


# ----------------------------------------------------------------------------- real processes


def _wait_for(what: str, check, timeout: float, logs):
    """Poll `check` until it returns something true (that value); fail with `logs()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout}s\n{logs()}")


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    _wait_for(f"port {port} open", listening, timeout, lambda: log.read_text()[-3000:])


class Deployment:
    """One SuperLink (TLS + SuperNode auth) and the processes started against it."""

    def __init__(self, root: Path, world: Path):
        self.root, self.world = root, world
        self.creds = create_credentials(root / "creds", ["127.0.0.1"], nodes=3)
        self.other = create_credentials(root / "other-ca", ["127.0.0.1"], nodes=0)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.node_ids: set[str] = set()  # registered with the SuperLink
        self.homes: list[Path] = []
        self.cli_env = self.env("cli")
        write_connection(root / "cli", self.address, self.creds.ca_cert)

    def env(self, name: str) -> dict:
        home = self.root / name
        home.mkdir(exist_ok=True)
        self.homes.append(home)
        return deploy_env(home, OMP_NUM_THREADS="1")

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(args, env=self.env(name), cwd=self.root,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([flwr_bin("flwr"), *args], env=self.cli_env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def supernode(self, name: str, key: Path | None, ca: Path | None, device: str | None,
                  **kw) -> tuple[subprocess.Popen, Path]:
        node_config = {"data-dir": str(self.world / device)} if device else {}
        return self.start(name, supernode_args(self.address, ca, key, free_port(), node_config,
                                               **kw))

    def superlink(self, register: int = 0, name: str = "superlink") -> subprocess.Popen:
        """Start (or restart: the same database) the SuperLink; register the first
        `register` node keys."""
        link, log = self.start(name, superlink_args(
            self.creds.ca_cert.parent, "127.0.0.1", self.port, self.root / "state.db"))
        _wait_port(self.port, link, log)
        for pub in self.creds.node_pubs[:register]:
            out = self.cli("supernode", "register", str(pub), CONNECTION, "--format", "json")
            assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
            self.node_ids.add(str(json.loads(out.stdout)["node-id"]))
        return link

    def submit(self, cfg: Config, run_dir: Path, name: str, *flags: str, timeout: float = 60
               ) -> subprocess.CompletedProcess:
        overrides = write_overrides(self.root / f"{name}.toml", config_overrides(cfg, run_dir))
        return self.cli("run", str(PROJECT_DIR), CONNECTION, "--run-config", str(overrides),
                        *flags, timeout=timeout)

    def stop(self) -> None:
        stop_tree([p.pid for p in self.procs])
        for p in self.procs:
            p.wait(timeout=10)
        for home in self.homes:  # anything orphaned that still carries one of our homes
            stop_processes(home, (self.port,))


@pytest.fixture(scope="module")
def deployment(world, tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("link"), world)
    try:
        d.superlink(register=2)  # node-2 stays unregistered
        for i, user in enumerate(("u0", "u1")):
            d.supernode(f"supernode-{i}", d.creds.node_keys[i], d.creds.ca_cert, f"device-{user}")
        yield d
    finally:
        d.stop()


@pytest.mark.slow
def test_two_devices_train_over_tls_with_registered_keys(deployment, world):
    d = deployment
    run_dir = d.root / "run"
    cfg = deploy_config(world, **{"fed.num-rounds": 2, "fed.eval-every": 1,
                                  "fed.run-dir": str(run_dir)})
    try:
        out = d.submit(cfg, run_dir, "deploy", "--stream", timeout=240)
        log = out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"flwr run timed out: {exc.stdout}"
    results = _results(run_dir)
    nodes = "".join((d.root / f"supernode-{i}.log").read_text()[-2000:] for i in range(2))
    assert results.get("status") == "completed", log[-4000:] + nodes
    assert (run_dir / "final.safetensors").is_file()
    rounds = results["rounds"]
    assert [r["round"] for r in rounds if "train" in r] == [1, 2]
    assert all(r["train"]["clients"] == 2 and r["train"]["failures"] == 0
               for r in rounds if "train" in r)
    assert all(r["federated"]["users"] == 2 for r in rounds if r["round"] > 0)
    assert not any("server" in r for r in rounds)  # the server holds no interactions
    for user in ("u0", "u1"):  # each device cached the catalog embeddings on its own disk
        assert list((world / f"device-{user}" / CACHE_DIR / "embeddings").glob("*.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unregistered-key", "other-ca", "insecure"])
def test_wrong_credentials_are_refused(deployment, case):
    d = deployment
    key, ca, kw = d.creds.node_keys[2], d.creds.ca_cert, {}
    expect = "Failed to activate SuperNode"
    if case == "other-ca":
        key, ca, expect = d.creds.node_keys[0], d.other.ca_cert, "CERTIFICATE_VERIFY_FAILED"
    elif case == "insecure":  # plain HTTP against the HTTPS port (a key needs TLS anyway)
        key, ca, kw = None, None, {"insecure": True}
        expect = "could not establish a connection"
    proc, log = d.supernode(f"refused-{case}", key, ca, None, max_retries=1, **kw)
    try:
        rc = proc.wait(timeout=90)
    finally:
        stop_tree([proc.pid])
    text = log.read_text()
    assert rc != 0 and expect in text, text[-3000:]
    listed = d.cli("supernode", "ls", CONNECTION, "--format", "json").stdout
    nodes = json.loads(listed[listed.find("{"):])["nodes"]
    assert {n["node-id"] for n in nodes} == d.node_ids, listed  # never admitted


def _results(run_dir: Path) -> dict:
    try:  # written to a temp name and renamed: a read sees a whole file or none
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _trained(results: dict) -> list[int]:
    return [r["round"] for r in results.get("rounds", []) if "train" in r]


RESTART_ROUNDS = 6


@pytest.mark.slow
def test_a_run_survives_a_superlink_restart(world, tmp_path_factory):
    """The server host dies mid-run: the SuperLink and its ServerApp get SIGKILL after round
    2 or later, the SuperLink restarts on its database, the SuperNodes reconnect by themselves, and the run is
    submitted again with fed.resume = true. It continues after its last completed round:
    the rounds before it are not rerun, FedAdam's step after it starts from the stored
    model and moments, and every device's ε continues from its own disk's accountant."""
    import os
    import signal
    from types import SimpleNamespace

    from safetensors.numpy import load_file

    from fedrec.federation.local_store import device_dir
    from fedrec.federation.simulate import descendants
    from fedrec.privacy.accounting import Accountant

    d = Deployment(tmp_path_factory.mktemp("restart"), world)
    run_dir = d.root / "run"
    R = RESTART_ROUNDS
    cfg = deploy_config(world, **{"fed.num-rounds": R, "fed.eval-every": R,
                                  "fed.run-dir": str(run_dir), "fed.strategy": "fedadam",
                                  "privacy.mode": "sample", "privacy.noise-multiplier": 1.0})

    def logs() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}"
                         for f in sorted(d.root.glob("*.log")))
    try:
        link = d.superlink(register=2)
        for i, user in enumerate(("u0", "u1")):
            d.supernode(f"supernode-{i}", d.creds.node_keys[i], d.creds.ca_cert, f"device-{user}")
        out = d.submit(cfg, run_dir, "first")
        assert out.returncode == 0, out.stdout + out.stderr
        _wait_for("round 2 trained", lambda: len(_trained(_results(run_dir))) >= 2, 300, logs)
        # SIGKILL the SuperLink and what it started (SuperExec, the run's ServerApp), as
        # the server host's crash or its service manager would: nothing survives.
        tree = descendants([link.pid])
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        link.wait(timeout=10)
        _wait_for("the SuperLink's processes gone", lambda: not descendants(tree), 30, logs)
        killed = _results(run_dir)
        done = max(_trained(killed))
        assert killed["status"] == "running" and 2 <= done < R, killed
        ckpts = {r: (run_dir / "checkpoints" / f"round-{r:04d}.safetensors").stat().st_mtime_ns
                 for r in range(1, done + 1)}

        d.superlink(name="superlink-restarted")  # same port and database; keys registered
        resumed = cfg.override(**{"fed.resume": True})
        out = d.submit(resumed, run_dir, "resume")
        assert out.returncode == 0, out.stdout + out.stderr
        final = _wait_for("the resumed run completed", lambda: (
            r := _results(run_dir)).get("status") == "completed" and r, 300, logs)
    finally:
        d.stop()

    rounds = {r["round"]: r for r in final["rounds"]}
    assert _trained(final) == list(range(1, R + 1)), logs()  # each round once
    assert all(rounds[r]["train"]["clients"] == 2 for r in rounds if r >= 1)
    before = {r["round"]: r["train"] for r in killed["rounds"] if "train" in r}
    assert all(rounds[r]["train"] == before[r] for r in range(1, done + 1))  # not rerun
    assert all((run_dir / "checkpoints" / f"round-{r:04d}.safetensors").stat().st_mtime_ns == t
               for r, t in ckpts.items())

    # FedAdam's step after the restart started from round `done`'s model and moments.
    def ckpt(r, part=""):
        return load_file(str(run_dir / "checkpoints" / f"round-{r:04d}{part}.safetensors"))
    x0, s0, x1, s1 = ckpt(done), ckpt(done, ".server"), ckpt(done + 1), ckpt(done + 1, ".server")
    b1, b2, eta, tau = 0.9, 0.99, cfg.fed.server_lr, cfg.fed.server_tau
    eta_norm = eta * np.sqrt(1 - b2 ** (done + 2.0)) / (1 - b1 ** (done + 2.0))
    for k in x0:
        m0, v0, m1, v1 = (s[f"{n}/{k}"] for s, n in ((s0, "m_t"), (s0, "v_t"), (s1, "m_t"), (s1, "v_t")))
        delta = (m1 - b1 * m0) / (1 - b1)  # the round's mean update, given the stored m
        np.testing.assert_allclose(v1, b2 * v0 + (1 - b2) * delta ** 2, rtol=1e-6, atol=1e-12)
        scale = cfg.fed.server_lr_ids if k.startswith(id_tables(cfg)) else 1.0
        np.testing.assert_allclose(x1[k], x0[k] + scale * eta_norm * m1 / (np.sqrt(v1) + tau),
                                   rtol=1e-5, atol=1e-6)

    # Every device's accountant covers all R rounds (its disk carried it over the restart),
    # and the server recorded, round by round, the ε those accountants give.
    flat = resumed.override(**{"fed.run-dir": config_overrides(cfg, run_dir)["fed.run-dir"]})
    per_round = []
    for user in ("u0", "u1"):
        disk = device_dir(SimpleNamespace(node_config={"data-dir": str(world / f"device-{user}")}),
                          flat, 0, simulated=False)
        last, prev = (load_file(str(disk / f"round-{r:04d}.safetensors")) for r in (R, R - 1))
        (sigma,), (q,), (steps,) = (last[f"privacy/{k}"].tolist()
                                    for k in ("noise-multiplier", "sample-rate", "steps"))
        per = steps - int(prev["privacy/steps"][0])
        assert steps == R * per > 0, (steps, per)  # R rounds, none restarted or repeated
        per_round.append([Accountant(cfg.privacy.accountant, [(sigma, q, r * per)])
                          .epsilon(cfg.privacy.delta) for r in range(1, R + 1)])
    for r, eps in zip(range(1, R + 1), zip(*per_round)):
        assert rounds[r]["train"]["epsilon-max"] == pytest.approx(max(eps), rel=1e-9)
        assert rounds[r]["train"]["epsilon-mean"] == pytest.approx(sum(eps) / 2, rel=1e-9)


# ----------------------------------------------------------------------------- the commands


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    import sys

    from rich.console import Console

    from fedrec import cli

    record = Console(width=400, record=True)
    monkeypatch.setattr(cli, "console", record)
    monkeypatch.setattr(sys, "argv", ["fedrec", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, record.export_text(), capsys.readouterr().err


def test_certs_create_prints_the_tested_commands(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "creds"
    code, out, err = _cli(monkeypatch, capsys, "certs", "create", "--out", str(out_dir),
                          "--hosts", "link.example.org,10.0.0.5", "--nodes", "2")
    assert code == 0, err
    assert (out_dir / "supernodes" / "node-1.pub").is_file()
    assert oct((out_dir / "supernodes" / "node-1").stat().st_mode & 0o777) == "0o600"
    assert "--enable-supernode-auth" in out and "[superlink.fedrec]" in out
    assert 'address = "link.example.org:8000"' in out
    assert "--node-config \"data-dir='/path/to/device'\"" in out
    code, _, err = _cli(monkeypatch, capsys, "certs", "create", "--out", str(out_dir),
                        "--hosts", "x", "--nodes", "1")
    assert code == 2 and "pass --force" in err and err.count("\n") == 1


def test_device_prepare_writes_one_users_files(world, tmp_path, monkeypatch, capsys):
    dev = tmp_path / "dev"
    code, out, err = _cli(monkeypatch, capsys, "device", "prepare", "--out", str(dev),
                          "--user", "u1", "--no-encode", "--run-config",
                          f"data.dataset='{world / 'data'}'")
    assert code == 0, err
    assert (dev / "history.csv").read_text() == (world / "device-u1" / "history.csv").read_text()
    assert read_catalog(dev).item_ids == read_catalog(world / "catalog").item_ids
    assert f"data-dir='{dev.resolve()}'" in out and not (dev / CACHE_DIR).exists()
    code, _, err = _cli(monkeypatch, capsys, "device", "prepare", "--out", str(dev), "--user",
                        "nobody", "--no-encode", "--run-config", f"data.dataset='{world / 'data'}'")
    assert code == 2 and "'nobody' is not a user" in err
