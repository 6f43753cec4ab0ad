"""fedrec.federation.simulate: the overrides file round-trips; a real `flwr run` completes and leaves
no Flower process behind."""

import csv
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedrec.config import Config, load_config, load_defaults
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.federation import simulate
from fedrec.federation.simulate import (
    config_overrides,
    find_processes,
    run_simulation,
    write_overrides,
)

DEFAULTS = load_defaults()


def write_tiny_dataset(root: Path, n_users=6, per_user=10, n_items=40) -> Path:
    """Generic layout: interactions.csv (user,item,timestamp) + items.csv."""
    root.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    with open(root / "items.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item", "title", "year", "genres"])
        for i in range(1, n_items + 1):
            w.writerow([i, f"Movie {i}", 1980 + i % 30, ", ".join(genres[i % 5:i % 5 + 2])])
    with open(root / "interactions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u in range(n_users):
            for k in range(per_user):
                w.writerow([f"u{u}", 1 + (u * 7 + k * 3) % n_items, 1000 * u + k])
    return root


def flwr_processes(flwr_home: Path) -> list[int]:
    """Independent /proc scan: pids whose cmdline or environment names flwr_home."""
    mark, pids = str(flwr_home).encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            blob = (Path(f"/proc/{entry}/cmdline").read_bytes()
                    + Path(f"/proc/{entry}/environ").read_bytes())
        except OSError:
            continue
        if mark in blob:
            pids.append(int(entry))
    return pids


def test_overrides_file_round_trips(tmp_path, monkeypatch):
    data_dir = write_tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths must come out absolute
    cfg = Config.from_flat(DEFAULTS).override(**{
        "data.dataset": "data", "data.cache-dir": "cache", "train.lr": 0.5,
        "train.weight-decay": 1e-05, "model.kind": "fedmf",
        "fed.num-rounds": 3, "fed.server-lr-warmup": 0,
        "data.item-template": 'Tab\there "q" \\ é ✓ {title}\x7f'})
    ov = config_overrides(cfg, Path("run"))
    assert ov["data.dataset"] == str(data_dir.resolve())
    assert ov["data.cache-dir"] == str((tmp_path / "cache").resolve())
    assert ov["fed.run-dir"] == str((tmp_path / "run").resolve())
    assert "train.batch-size" not in ov  # unchanged defaults are left out
    path = write_overrides(tmp_path / "run" / "overrides.toml", ov)
    with open(path, "rb") as fh:
        parsed = tomllib.load(fh)
    assert parsed == ov  # flat: the quoted dotted keys stay single keys
    assert all(type(parsed[k]) is type(v) for k, v in ov.items())
    assert load_config(toml_file=str(path)) == cfg.override(**{
        k: ov[k] for k in ("data.dataset", "data.cache-dir", "fed.run-dir")})
    # floats stay floats, also when integral
    write_overrides(path, {"train.lr": 1.0, "data.cold-fraction": 0.0, "x": 2e-300})
    with open(path, "rb") as fh:
        assert tomllib.load(fh) == {"train.lr": 1.0, "data.cold-fraction": 0.0, "x": 2e-300}
    write_overrides(path, {"v": math.inf})
    with open(path, "rb") as fh:
        assert tomllib.load(fh) == {"v": math.inf}


@pytest.mark.parametrize("path", sorted((Path(simulate.PROJECT_DIR) / "simulations" / "configs")
                                         .glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    from flwr.common.config import parse_config_args

    flat = parse_config_args([str(path)])  # what `flwr run --run-config FILE` sends
    assert flat and set(flat) <= set(DEFAULTS)
    cfg = load_config(toml_file=str(path))
    assert all(cfg.to_flat()[k] == v for k, v in flat.items())


def test_default_cache_dir_is_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    ov = config_overrides(Config.from_flat(DEFAULTS), tmp_path / "r")
    assert ov == {"data.cache-dir": str((tmp_path / "home").resolve()),
                  "fed.run-dir": str((tmp_path / "r").resolve())}


def test_wrong_number_of_supernodes_is_refused(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    cfg = Config.from_flat(DEFAULTS).override(**{"data.dataset": str(data_dir),
                                                 "data.cache-dir": str(tmp_path / "c")})
    with pytest.raises(FedrecError, match="one virtual SuperNode per user; this dataset has 6"):
        run_simulation(cfg, None, tmp_path / "run", num_supernodes=5)


def test_stop_processes_finds_the_run_by_home_and_port(tmp_path):
    home, port = tmp_path / ".flwr", 5883
    sleeper = [sys.executable, "-c", "import time, sys; time.sleep(60)"]
    by_env = subprocess.Popen(sleeper, env={**os.environ, "FLWR_HOME": str(home)})
    by_port = subprocess.Popen([*sleeper, "--port", str(port)])
    by_home = subprocess.Popen([*sleeper, f"{home}/local-superlink/superlink.log"])
    # a parent matched by its address, with a child that carries no mark at all
    spawn = ("import subprocess, sys; "
             "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])")
    parent = subprocess.Popen([*sleeper[:2], spawn, f"127.0.0.1:{port}"])
    decoys = [subprocess.Popen([*sleeper, f"127.0.0.1:{port}9", f"{home}2/x", "--port",
                                f"{port}9"]),
              subprocess.Popen(sleeper, env={**os.environ, "FLWR_HOME": f"{home}2"})]
    try:
        time.sleep(0.5)  # let the parent start its child
        found = find_processes(home, (port,))
        assert {by_env.pid, by_port.pid, by_home.pid, parent.pid} <= set(found)
        assert len(found) == 5  # + the unmarked grandchild
        assert not {d.pid for d in decoys} & set(found)
        assert os.getpid() not in found
        assert sorted(simulate.stop_processes(home, (port,), grace=5)) == found
        for p in (by_env, by_port, by_home, parent):
            assert p.wait(timeout=5) is not None
        assert find_processes(home, (port,)) == []
        assert all(d.poll() is None for d in decoys)
    finally:
        for p in (by_env, by_port, by_home, parent, *decoys):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_flwr_run_smoke(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    cfg = Config.from_flat(DEFAULTS).override(**{
        "data.dataset": str(data_dir), "data.cache-dir": str(tmp_path / "cache"),
        "data.eval-negatives": 20, "model.kind": "fedmf", "model.dim": 8,
        "fed.num-rounds": 2, "fed.clients-per-round": 3, "fed.eval-every": 1, "fed.server-lr-warmup": 0,
        "train.batch-size": 32,
        # balanced sampling picks the SuperLink's own 64-bit node ids (the in-process grid's
        # are small): every message must reach a node
        "fed.sampling": "balanced"})
    prepare(cfg)
    run_dir = tmp_path / "run"
    lines: list[str] = []
    results = run_simulation(cfg, None, run_dir, num_supernodes=6, cpus_per_client=1,
                             log=lines.append, timeout=300)

    assert results["status"] == "completed"
    assert results == simulate._read_results(run_dir / "results.json")
    rounds = {r["round"]: r for r in results["rounds"]}
    for rnd in (1, 2):
        assert rounds[rnd]["train"]["clients"] == 3
        assert rounds[rnd]["train"]["failures"] == 0
        fed = rounds[rnd]["federated"]
        for key in ("sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "val/sampled/hr@10"):
            assert 0.0 <= fed[key] <= 1.0
        assert fed["users"] == 6
    assert results["summary"]["final_round"] == 2
    assert (run_dir / "final.safetensors").is_file()
    assert (run_dir / "checkpoints" / "round-0002.safetensors").is_file()
    assert (run_dir / "metrics.csv").is_file()
    with open(run_dir / "overrides.toml", "rb") as fh:
        assert tomllib.load(fh)["fed.run-dir"] == str(run_dir.resolve())
    # the filtered stream shows the server's round lines; the log has everything
    assert any(line.startswith("round    2") for line in lines), lines
    assert "Successfully started run" in (run_dir / "flwr.log").read_text()
    # the local SuperLink and all its children are gone
    assert flwr_processes(run_dir / ".flwr") == []
