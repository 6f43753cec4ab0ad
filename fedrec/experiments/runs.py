"""Experiments over seeds: start, resume or extend federated runs, and write result files.

A federated run executes the apps named in pyproject.toml's [tool.flwr.app.components]
(the ServerApp and ClientApp), under `flwr run` (fedrec.federation.simulate) or Ray-free in this
process (fedrec.federation.inprocess). The library loads them by those references, as Flower does;
it never imports clients/ or server/ itself.
"""

import hashlib
import importlib
import json
import time
import tomllib
from pathlib import Path

from flwr.app import Context, RecordDict

from fedrec.config import PYPROJECT, Config, run_identity, stored_config
from fedrec.data.pipeline import list_spaces, prepare
from fedrec.errors import FedrecError
from fedrec.federation.inprocess import InProcessGrid
from fedrec.federation.run_store import run_dir_for
from fedrec.federation.simulate import check_ray_address, run_simulation
from fedrec.federation.strategy import clients_per_round
from fedrec.models.build import model_name
from fedrec.models.central import train_central
from fedrec.models.saved import save_model
from fedrec.results import CURVE_KEYS, summarize


def seed_results(name: str, cfg: Config, runs: list[dict]) -> dict:
    """A result file's body for the runs of one experiment over seeds: {"best", "final"}
    summaries are mean ± std over the seeds."""
    summary = {k: summarize([r[k] for r in runs]) for k in ("best", "final")}
    return {"method": name, "config": cfg.to_flat(), "seed_kind": "train.seed", "runs": runs,
            "summary": summary}


def central(cfg: Config, seeds: list[int], log=print, quiet: bool = False,
            save_dir: str | None = None) -> dict:
    """Centralized training of the configured model for each seed: a result file's body.
    save_dir: also keep each seed's best model as a run directory (fedrec.models.saved):
    save_dir itself for one seed, save_dir/seed-N for several."""
    p = prepare(cfg, progress=True)
    spaces = list_spaces(cfg, p)
    runs = []
    for seed in seeds:
        log(f"centralized {cfg.model.kind}, seed {seed}")
        t0 = time.time()
        c = cfg.override(**{"train.seed": seed})
        r = train_central(c, p.split, p.item_emb, log=(lambda *_: None) if quiet else log,
                          spaces=spaces, item_fields=p.dataset.item_fields)
        runs.append({"seed": seed, "best": r["best"], "final": r["final"],
                     "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                     "seconds": time.time() - t0, "curve": r["curve"]})
        if save_dir:
            d = Path(save_dir).expanduser() / (f"seed-{seed}" if len(seeds) > 1 else "")
            saved = save_model(d, r["config"], r["model"], p.dataset.item_ids, p.split.released)
            runs[-1]["run_dir"] = str(saved.resolve())
            log(f"model saved in {runs[-1]['run_dir']}")
    return seed_results(f"central-{model_name(cfg)}", cfg, runs)


def federated(cfg: Config | None, seeds: list[int], *, engine: str, runs_dir: str | None,
              resume: str | None = None, rounds: int | None = None, overrides: bool = False,
              ray_address: str | None = None, log=print) -> dict | None:
    """Federated runs over seeds: new (cfg), or the comma-separated run directories of
    `resume` continued or extended to `rounds` with their own configs (so no config
    `overrides`); ray_address: an existing Ray cluster to simulate on (engine flower). A
    result file's body, or None when nothing ran or completed."""
    check_engine(engine)
    if ray_address and engine != "flower":
        raise FedrecError("--ray-address runs the simulation on a Ray cluster: it needs "
                          "--engine flower")
    if ray_address:
        ray_address = check_ray_address(ray_address)  # before any data is prepared
    if rounds is not None and not resume:
        raise FedrecError("--rounds extends runs given with --resume; for a new run set "
                          "--run-config \"fed.num-rounds=N\"")
    if resume and overrides:
        raise FedrecError("--resume continues a run with its own config (run_config.json); "
                          "leave out --config and --run-config")
    if resume:
        dirs = [Path(x).expanduser().resolve() for x in resume.split(",") if x.strip()]
        cfg, jobs, done = plan_resume(dirs, rounds, log)
    else:
        base = (Path(runs_dir).expanduser() if runs_dir else run_dir_for(cfg)).resolve()
        jobs = [(cfg.override(**{"train.seed": s}), base / f"seed-{s}") for s in seeds]
        done = []
    if jobs:  # encode once, up front; refuse a sample larger than the population first
        clients_per_round(cfg, prepare(cfg, progress=True).split.n_users)
    runs = [run_entry(c.train.seed, res, d, res.get("seconds")) for c, d, res in done]
    for c, run_dir in jobs:
        log(f"federated {cfg.model.kind} ({cfg.fed.strategy}), seed {c.train.seed} -> {run_dir}")
        t0 = time.time()
        res = run_federated(c, run_dir, engine, log, ray_address)
        runs.append(run_entry(c.train.seed, res, run_dir, time.time() - t0))
    if not runs:
        return None
    runs.sort(key=lambda r: r["seed"])
    return seed_results(f"fed-{model_name(cfg)} ({cfg.fed.strategy})", cfg, runs)


ENGINES = ("flower", "inprocess")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise FedrecError(f"--engine: '{engine}' is not one of {', '.join(ENGINES)}")


def app_component(name: str):
    """The app object pyproject.toml names for `name` (serverapp, clientapp)."""
    with open(PYPROJECT, "rb") as fh:
        ref = tomllib.load(fh)["tool"]["flwr"]["app"]["components"][name]
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def run_inprocess(cfg: Config, run_dir: Path) -> dict:
    """The same ServerApp and ClientApp, Ray-free: real Messages through an in-process Grid."""
    flat = cfg.override(**{"fed.run-dir": str(run_dir)}).to_flat()
    grid = InProcessGrid(app_component("clientapp"), flat, prepare(cfg).split.n_users)
    app_component("serverapp")(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                               run_config=flat))
    return json.loads((run_dir / "results.json").read_text())


def run_federated(cfg: Config, run_dir: Path, engine: str, log=print,
                  ray_address: str | None = None) -> dict:
    """One federated run (flwr run or in-process); its results.json, evaluated."""
    check_engine(engine)
    res = (run_simulation(cfg, run_dir=run_dir, log=log, ray_address=ray_address)
           if engine == "flower" else run_inprocess(cfg, run_dir))
    if not res["summary"]:
        raise FedrecError(f"{run_dir}/results.json: no evaluated round; set fed.eval-every "
                          "<= fed.num-rounds")
    return res


def run_entry(seed: int, res: dict, run_dir: Path, seconds: float | None) -> dict:
    """One run of a result file, from its results.json: the summary, the replies the
    server dropped, and a digest of the final parameters (equal digests: bit-identical
    runs), so reports need nothing from the run directory."""
    summ = res["summary"]
    final = run_dir / "final.safetensors"
    return {"seed": seed, "best": summ["best"], "final": summ["final"],
            "best_round": summ["best_round"], "run_dir": str(run_dir), "seconds": seconds,
            "curve": round_curve(res["rounds"]),
            "dropped-replies": int(sum(r["train"].get("failures", 0) for r in res["rounds"]
                                       if "train" in r)),
            "final-sha256": hashlib.sha256(final.read_bytes()).hexdigest()
            if final.is_file() else None}


def round_curve(rounds: list[dict]) -> list[dict]:
    """Per round: seconds, train loss, and the evaluated metrics (federated = the devices'
    own test and val ranking; server = the global model on every user, simulation only)."""
    keys = [*CURVE_KEYS, *(f"val/{k}" for k in CURVE_KEYS), "full/cold/hr@10", "new-items/hr@10"]
    out = []
    for r in rounds:
        row = {"round": r["round"], "t": r.get("t")}
        if "train" in r:
            row["train-loss"] = r["train"].get("train-loss")
        for sec in ("federated", "server"):
            row.update({f"{sec}/{k}": r[sec][k] for k in keys if k in r.get(sec, {})})
        out.append(row)
    return out


def experiment(cfg: Config) -> dict:
    """A run's config without what differs between the seeds of one experiment."""
    return run_identity(cfg.to_flat(), "train.seed")


def resumed(run_dir: Path, rounds: int | None = None,
            log=print) -> tuple[Config, list, dict]:
    """(config, [(config, run_dir)], its results.json) to continue a killed run, or to
    extend it (killed or completed) to `rounds` rounds in all; no job if it has completed
    them."""
    files = {}
    for name in ("run_config.json", "results.json"):
        try:
            files[name] = json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            raise FedrecError(f"--resume: {run_dir} has no {name}; give the directory of one "
                              "run of fedrec simulate (e.g. <runs>/seed-0)") from None
        except (OSError, ValueError) as exc:
            raise FedrecError(f"--resume: cannot read {run_dir / name} ({exc})") from None
    cfg = Config.from_flat(stored_config(files["run_config.json"])).override(
        **{"fed.resume": True, "fed.run-dir": str(run_dir)})
    if rounds is not None and rounds != cfg.fed.num_rounds:
        if rounds < cfg.fed.num_rounds:
            raise FedrecError(f"--rounds: {rounds} is fewer than the {cfg.fed.num_rounds} "
                              f"rounds {run_dir} plans; runs are extended, never cut short")
        if cfg.privacy.mode != "none":
            raise FedrecError(f"--rounds: {run_dir} is a private run; its noise was set for "
                              f"{cfg.fed.num_rounds} rounds, so it cannot be extended")
        if cfg.fed.server_lr_decay != "none":
            raise FedrecError(f"--rounds: {run_dir} decays its server lr to 0 at round "
                              f"{cfg.fed.num_rounds}, so it cannot be extended; start a new run")
        cfg = cfg.override(**{"fed.num-rounds": rounds})
        return cfg, [(cfg, run_dir)], files["results.json"]
    if files["results.json"].get("status") == "completed":
        log(f"{run_dir} already completed its {cfg.fed.num_rounds} rounds; nothing to resume")
        return cfg, [], files["results.json"]
    return cfg, [(cfg, run_dir)], files["results.json"]


def plan_resume(dirs: list[Path], rounds: int | None,
                log=print) -> tuple[Config, list, list]:
    """(config, jobs [(config, run_dir)], done [(config, run_dir, results)]) for the
    killed or to-be-extended run directories of one experiment."""
    cfg, jobs, done = None, [], []
    for d in dirs:
        c, job, results = resumed(d, rounds, log)
        if cfg is not None and experiment(c) != experiment(cfg):
            raise FedrecError(f"--resume: {d} is another experiment than the first directory "
                              "(configs differ beyond train.seed); resume them separately")
        cfg = cfg or c
        jobs += job
        done += [] if job else [(c, d, results)]
    if cfg is None:
        raise FedrecError("--resume: give at least one run directory")
    return cfg.override(**{"fed.resume": False, "fed.run-dir": ""}), jobs, done
