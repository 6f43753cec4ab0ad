"""Checkpoint and resume, in-process: a run killed in round k+1 and resumed ends with
exactly N rounds, none repeated, and the same parameters and metrics as a run that was
never interrupted (the in-process engine is deterministic given the seeds)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import clients.app
from fedrec.data.pipeline import prepare
from fedrec.errors import FedrecError
from fedrec.federation.run_store import FederatedRun
from tiny import Dying, Killed, run_inprocess, tiny_config

N = 4  # rounds
TIMING = {"update-seconds", "update-seconds-mean"}  # train metrics that time, not train


pytestmark = pytest.mark.usefixtures("isolated")


def config(tiny_root, run_dir, **overrides):
    return tiny_config(tiny_root, {"fed.num-rounds": N, "fed.run-dir": str(run_dir),
                                   **overrides})


def interrupted(tiny_root, run_dir, at, **overrides):
    """A run of N rounds killed at `at`; returns its config."""
    cfg = config(tiny_root, run_dir, **overrides)
    grid = Dying(clients.app.app, cfg.to_flat(), prepare(cfg).split.n_users, at=at)
    with pytest.raises(Killed):
        run_inprocess(cfg, grid)
    return cfg


def comparable(results: dict) -> list[dict]:
    """Per-round records without wall-clock fields."""
    return [{sec: ({k: v for k, v in row[sec].items() if k not in TIMING}
                   if isinstance(row[sec], dict) else row[sec])
             for sec in row if sec != "t"} for row in results["rounds"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_root, tmp_path_factory):
    """(run dir, results) of a never-interrupted run, once per strategy."""
    done = {}

    def run(strategy):
        if strategy not in done:
            run_dir = tmp_path_factory.mktemp("whole") / "run"
            _, results = run_inprocess(config(tiny_root, run_dir, **{"fed.strategy": strategy}))
            done[strategy] = run_dir, results
        return done[strategy]
    return run


@pytest.mark.parametrize("strategy,at", [
    ("fedavg", ("train", 3)),      # killed mid-training: round 3 has no checkpoint yet
    ("fedavg", ("evaluate", 3)),   # killed after round 3's checkpoint, before its results
    ("fedadam", ("train", 3)),     # server optimizer state restored too
])
def test_a_resumed_run_equals_the_uninterrupted_one(tiny_root, tmp_path, uninterrupted,
                                                    strategy, at):
    whole_dir, whole = uninterrupted(strategy)
    run_dir = tmp_path / "run"
    cfg = interrupted(tiny_root, run_dir, at, **{"fed.strategy": strategy})
    killed = json.loads((run_dir / "results.json").read_text())
    assert killed["status"] == "running"
    assert [r["round"] for r in killed["rounds"]] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "round-0003.safetensors").is_file() == (at[0] == "evaluate")

    _, results = run_inprocess(cfg.override(**{"fed.resume": True}))
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == list(range(N + 1))  # none lost or repeated
    assert comparable(results) == comparable(whole)
    assert results["summary"] == whole["summary"]
    final, want = (load_file(str(d / "final.safetensors")) for d in (run_dir, whole_dir))
    assert final.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(final[k], want[k])
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == [str(r) for r in range(N + 1)]


@pytest.mark.parametrize("keep", [True, False])
def test_a_resumed_run_needs_the_devices_own_state(tiny_root, tmp_path, keep):
    """Why the devices keep their user-local state on disk (FedMF's user vectors): with it
    a resumed run ends exactly where the uninterrupted one does; without it the rounds
    after the resume start from fresh user vectors, and the model ends elsewhere."""
    import shutil

    mf = {"model.kind": "fedmf"}
    run_inprocess(config(tiny_root, tmp_path / "whole", **mf))
    run_dir = tmp_path / "run"
    cfg = interrupted(tiny_root, run_dir, ("train", 3), **mf)
    if not keep:
        shutil.rmtree(run_dir / "devices")
    _, results = run_inprocess(cfg.override(**{"fed.resume": True}))
    assert [r["round"] for r in results["rounds"]] == list(range(1, N + 1))
    final, want = (load_file(str(d / "final.safetensors")) for d in (run_dir, tmp_path / "whole"))
    assert all(np.array_equal(final[k], want[k]) for k in want) == keep


def test_a_resumed_sample_dp_run_keeps_the_servers_epsilon_table(tiny_root, tmp_path):
    """With 4 of 13 devices a round, "epsilon-mean" covers every device that has trained so
    far: the server's table (fedrec/federation/server_state.py) is restored with the checkpoint, and
    the devices' own accountants from their disks, so the resumed run records the ε of
    the uninterrupted one. Without the table, round 3 would average its 4 devices only."""
    dp = {"privacy.mode": "sample", "privacy.noise-multiplier": 1.0,
          "fed.clients-per-round": 4, "fed.strategy": "fedadam"}
    _, whole = run_inprocess(config(tiny_root, tmp_path / "whole", **dp))
    cfg = interrupted(tiny_root, tmp_path / "run", ("train", 3), **dp)
    state = load_file(str(tmp_path / "run" / "checkpoints" / "round-0002.server.safetensors"))
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t", "epsilon"}
    assert len([k for k in state if k.startswith("epsilon/")]) > 4  # devices of 2 rounds
    _, results = run_inprocess(cfg.override(**{"fed.resume": True}))

    def eps(res):
        return [v for r in res["rounds"] if "train" in r
                for v in (r["round"], r["train"]["epsilon-max"], r["train"]["epsilon-mean"])]
    assert eps(results) == pytest.approx(eps(whole), rel=1e-12)
    assert eps(whole)[8] > eps(whole)[2]  # round 3's mean: more devices, more rounds behind


def test_killed_after_its_last_round_a_run_only_finishes(tiny_root, tmp_path, uninterrupted):
    import shutil

    whole_dir, whole = uninterrupted("fedadam")
    run_dir = tmp_path / "run"
    shutil.copytree(whole_dir, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "running"}))
    (run_dir / "final.safetensors").unlink()
    cfg = config(tiny_root, run_dir, **{"fed.resume": True})
    _, again = run_inprocess(cfg)
    assert again["status"] == "completed" and comparable(again) == comparable(whole)
    final = load_file(str(run_dir / "final.safetensors"))
    last = load_file(str(run_dir / "checkpoints" / f"round-{N:04d}.safetensors"))
    assert all(np.array_equal(final[k], last[k]) for k in last)


def test_resume_refuses_another_config_or_no_run(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = interrupted(tiny_root, run_dir, ("train", 2))
    other = cfg.override(**{"fed.resume": True, "train.lr": 0.5})
    with pytest.raises(FedrecError, match=r"different config \(train.lr\)"):
        FederatedRun(other, log=lambda *_: None).resume()
    empty = cfg.override(**{"fed.resume": True, "fed.run-dir": str(tmp_path / "empty")})
    with pytest.raises(FedrecError, match="no results.json"):
        FederatedRun(empty, log=lambda *_: None).resume()


def test_a_fresh_run_forgets_an_earlier_runs_device_state(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = interrupted(tiny_root, run_dir, ("train", 2), **{"model.kind": "fedmf"})
    assert any((run_dir / "devices").iterdir())
    FederatedRun(cfg, log=lambda *_: None)  # fed.resume false: a new run in the same place
    assert not (run_dir / "devices").exists()


def test_fedrec_simulate_resume(tiny_root, tmp_path, uninterrupted, run_cli):
    whole_dir, whole = uninterrupted("fedadam")
    run_dir = tmp_path / "seed-0"
    interrupted(tiny_root, run_dir, ("evaluate", 2))

    code, _, err = run_cli("simulate", "--resume", str(run_dir),
                           "--run-config", "train.lr=0.1")
    assert code == 2 and "leave out --config and --run-config" in err
    code, _, err = run_cli("simulate", "--resume", str(tmp_path / "nowhere"))
    assert code == 2 and "has no run_config.json" in err

    code, out, err = run_cli("simulate", "--resume", str(run_dir),
                             "--engine", "inprocess", with_stdout=True)
    assert code == 0, err
    assert "resuming" in out and "after round 1 of 4" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and comparable(results) == comparable(whole)
    assert results["config"]["fed.resume"] is True
    final, want = (load_file(str(d / "final.safetensors")) for d in (run_dir, whole_dir))
    assert all(np.array_equal(final[k], want[k]) for k in want)

    code, out, _ = run_cli("simulate", "--resume", str(run_dir),
                           "--engine", "inprocess", with_stdout=True)
    assert code == 0 and "nothing to resume" in out


def test_fedrec_simulate_resume_summarizes_completed_and_continued_runs(
        tiny_root, tmp_path, uninterrupted, run_cli):
    """--resume DIR,DIR: the killed run continues, the completed one is summarized as it
    is, and one result file covers both (the seeds of one experiment)."""
    whole_dir, whole = uninterrupted("fedadam")
    run_dir = tmp_path / "seed-0"
    interrupted(tiny_root, run_dir, ("train", 3))
    out = tmp_path / "all.json"
    code, _, err = run_cli("simulate", "--resume", f"{whole_dir},{run_dir}",
                           "--engine", "inprocess", "--json", str(out))
    assert code == 0, err
    res = json.loads(out.read_text())
    assert sorted(r["run_dir"] for r in res["runs"]) == sorted([str(whole_dir), str(run_dir)])
    assert all(r["best"] == whole["summary"]["best"] for r in res["runs"])  # same seed, same run
    assert res["config"]["fed.resume"] is False and "--resume" in res["command"]

    other = tmp_path / "other"
    interrupted(tiny_root, other, ("train", 2), **{"train.lr": 0.2})
    code, _, err = run_cli("simulate", "--resume", f"{whole_dir},{other}")
    assert code == 2 and "is another experiment than the first directory" in err


def test_an_extended_run_equals_a_longer_one(tiny_root, tmp_path, run_cli):
    """`--resume DIR --rounds M`: a completed N-round run continued to M rounds ends with
    the parameters and records of a fresh M-round run (nothing but DP noise depends on
    the planned rounds); private runs and fewer rounds are refused."""
    import shutil

    longer = tmp_path / "longer"
    _, want = run_inprocess(config(tiny_root, longer, **{"fed.num-rounds": N + 2}))
    run_dir = tmp_path / "seed-0"
    run_inprocess(config(tiny_root, run_dir))
    private = tmp_path / "private"
    shutil.copytree(run_dir, private)
    flat = json.loads((private / "run_config.json").read_text())
    (private / "run_config.json").write_text(json.dumps({**flat, "privacy.mode": "user"}))

    code, _, err = run_cli("simulate", "--resume", str(private), "--rounds", str(N + 2))
    assert code == 2 and "private run" in err and "cannot be extended" in err
    decaying = tmp_path / "decaying"  # its server lr reaches 0 at the planned last round
    shutil.copytree(run_dir, decaying)
    (decaying / "run_config.json").write_text(json.dumps({**flat, "fed.server-lr-decay": "cosine"}))
    code, _, err = run_cli("simulate", "--resume", str(decaying), "--rounds", str(N + 2))
    assert code == 2 and "decays its server lr" in err and "cannot be extended" in err
    code, _, err = run_cli("simulate", "--resume", str(run_dir), "--rounds", str(N - 1))
    assert code == 2 and "never cut short" in err
    code, _, err = run_cli("simulate", "--rounds", str(N + 2))
    assert code == 2 and "--resume" in err

    code, out, err = run_cli("simulate", "--resume", str(run_dir), "--rounds", str(N + 2),
                             "--engine", "inprocess", with_stdout=True)
    assert code == 0, err
    assert f"after round {N} of {N + 2}" in out
    got = json.loads((run_dir / "results.json").read_text())
    assert got["status"] == "completed" and got["config"]["fed.num-rounds"] == N + 2
    assert comparable(got) == comparable(want) and got["summary"] == want["summary"]
    final, ref = (load_file(str(d / "final.safetensors")) for d in (run_dir, longer))
    assert all(np.array_equal(final[k], ref[k]) for k in ref)


def test_a_run_stored_before_a_key_existed_still_resumes(tiny_root, tmp_path, uninterrupted,
                                                         run_cli):
    """Run directories written before a config key was added (fedrec.config.ADDED_KEYS)
    are completed with the value that reproduces them: still resumable and summarized."""
    import shutil

    from fedrec.config import ADDED_KEYS

    whole_dir, whole = uninterrupted("fedadam")
    run_dir = tmp_path / "seed-0"
    shutil.copytree(whole_dir, run_dir)
    old = {k: v for k, v in whole["config"].items() if k not in ADDED_KEYS}
    old["fed.server-tau"] = whole["config"]["fed.server-tau"]  # this run did set it
    (run_dir / "run_config.json").write_text(json.dumps(old))
    (run_dir / "results.json").write_text(json.dumps({**whole, "config": old,
                                                      "status": "running"}))
    (run_dir / "final.safetensors").unlink()
    code, _out, err = run_cli("simulate", "--resume", str(run_dir), "--engine", "inprocess",
                             with_stdout=True)
    assert code == 0, err
    again = json.loads((run_dir / "results.json").read_text())
    assert again["status"] == "completed" and comparable(again) == comparable(whole)
    assert again["config"]["privacy.clipping"] == "fixed"
