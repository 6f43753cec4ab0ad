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
from fedrec.data import load_dataset
from fedrec.deploy import (
    CONNECTION,
    deploy_env,
    flwr_bin,
    node_config_arg,
    stop_tree,
    superlink_args,
    supernode_args,
    write_connection,
)
from fedrec.device import (
    CACHE_DIR,
    client_data,
    load_device_client,
    read_catalog,
    read_history,
    write_device_dir,
)
from fedrec.errors import FedrecError
from fedrec.local_store import LOCAL
from fedrec.simulate import (
    PROJECT_DIR,
    config_overrides,
    free_port,
    stop_processes,
    write_overrides,
)
from fedrec.transport import create_credentials


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
    assert cat.item_ids == ["1", "2", "3", "4", "10"]  # numeric id order, as fedrec.data
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

    from fedrec.device import item_embeddings
    from fedrec.encoder import _encoder

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
    from fedrec.run_store import FederatedRun

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
    assert LOCAL in ctx.state  # the user-local residual stays on the device
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in reply.content["arrays"].items()})
    ev = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                 dst_node_id=7, message_type="evaluate")
    metrics = clients.app.evaluate(ev, ctx).content["metrics"]
    assert metrics["num-examples"] == 1 and 0.0 <= metrics["sampled/hr@10"] <= 1.0


def test_node_config_quoting():
    assert node_config_arg({"data-dir": "/a b/c", "model-dir": "/x'y"}) == \
        "data-dir='/a b/c' model-dir=\"/x'y\""
    with pytest.raises(FedrecError, match="both quote kinds"):
        node_config_arg({"data-dir": "/a'\"b"})


# ----------------------------------------------------------------------------- real processes


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"port {port} not open after {timeout}s:\n{log.read_text()[-3000:]}")


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
        link, log = d.start("superlink", superlink_args(d.creds.ca_cert.parent, "127.0.0.1",
                                                        d.port, d.root / "state.db"))
        _wait_port(d.port, link, log)
        for pub in d.creds.node_pubs[:2]:  # node-2 stays unregistered
            out = d.cli("supernode", "register", str(pub), CONNECTION, "--format", "json")
            assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
            d.node_ids.add(str(json.loads(out.stdout)["node-id"]))
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
    overrides = write_overrides(d.root / "deploy.toml", config_overrides(cfg, run_dir))
    try:
        out = d.cli("run", str(PROJECT_DIR), CONNECTION, "--run-config", str(overrides),
                    "--stream", timeout=240)
        log = out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"flwr run timed out: {exc.stdout}"
    results = json.loads((run_dir / "results.json").read_text()) if (
        run_dir / "results.json").is_file() else {}
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
