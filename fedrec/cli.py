"""The `fedrec` command. Every user-fixable error is one line on stderr and exit code 2."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedrec.config import (
    Config,
    load_config,
    parse_overrides,
    run_identity,
    stored_config,
    uses_text,
)
from fedrec.errors import FedrecError
from fedrec.results import (
    CURVE_KEYS,
    HEADLINE,
    command_line,
    fmt,
    machine,
    run_dir_for,
    summarize,
    write_json,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated recommendation with a frozen PLM.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect datasets.")
baseline_app = typer.Typer(no_args_is_help=True, help="Non-learned reference points.")
app.add_typer(data_app, name="data")
app.add_typer(baseline_app, name="baseline")
certs_app = typer.Typer(no_args_is_help=True, help="TLS and SuperNode-auth credentials.")
device_app = typer.Typer(no_args_is_help=True, help="Set up a device (SuperNode) directory.")
app.add_typer(certs_app, name="certs")
app.add_typer(device_app, name="device")
console = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", help="TOML file of config overrides")
RunConfigOpt = typer.Option("", "--run-config", help="overrides, e.g. 'train.lr=0.01 model.dim=32'")
SeedsOpt = typer.Option("0,1,2", "--seeds", help="comma-separated training seeds")
JsonOpt = typer.Option(None, "--json", help="write metrics, config and command to this JSON file")


def _config(config: str | None, run_config: str) -> Config:
    return load_config(parse_overrides(run_config), config)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FedrecError(f"--seeds: '{text}' is not a comma-separated list of integers") from None
    if not seeds:
        raise FedrecError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


def _model_name(cfg: Config) -> str:
    """seq (text items), seq+id (text + ID items), seq-id (SASRec over IDs); text, text+id,
    text-nopool (user vector = the user-local embedding only); fedmf."""
    m = cfg.model
    if m.kind == "seq":
        return "seq" + ("" if m.item_text else "-id") + ("+id" if m.item_text and m.id_embeddings else "")
    if m.kind != "text":
        return m.kind
    return "text" + ("-nopool" if m.pooling == "none" else "") + ("+id" if m.id_embeddings else "")


def _summarize_seeds(name: str, unit: str, cfg: Config, runs: list[dict],
                     json_path: str | None) -> None:
    """Print the mean ± std over seeds at the best-validation epoch/round; write the file."""
    summary = {k: summarize([r[k] for r in runs]) for k in ("best", "final")}
    _table(f"{name} (test at best-validation {unit})", {name: summary["best"]})
    if json_path:
        write_json(json_path, {"method": name, "command": command_line(), "config": cfg.to_flat(),
                               "seed_kind": "train.seed", "runs": runs, "summary": summary,
                               "machine": machine()})


def _table(title: str, rows: dict[str, dict]) -> None:
    t = Table(title=title)
    t.add_column("method")
    for k in HEADLINE:
        t.add_column(k, justify="right")
    for name, summary in rows.items():
        t.add_row(name, *(fmt(summary.get(k)) for k in HEADLINE))
    console.print(t)


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument("ml-100k"),
               cache_dir: str = typer.Option("", help="default $FEDREC_HOME or ~/.cache/fedrec"),
               source: str = typer.Option("auto", help="auto | recbole | grouplens")):
    """Fetch a dataset into the user cache (never into the repository)."""
    from fedrec.fetch import fetch_ml100k

    if name != "ml-100k":
        raise FedrecError(f"data fetch: unknown dataset '{name}'; available: ml-100k "
                          "(for your own data, point data.dataset at a directory)")
    console.print(f"ml-100k ready in {fetch_ml100k(cache_dir, source)}")


@data_app.command("stats")
def data_stats(config: str | None = ConfigOpt, run_config: str = RunConfigOpt):
    """Users, items, interactions and the protocol split of the configured dataset."""
    from fedrec.pipeline import prepare

    cfg = _config(config, run_config)
    p = prepare(cfg, with_text=False)
    s, ds = p.split, p.dataset
    lengths = np.diff(s.train_ptr)
    t = Table(title=f"dataset {ds.name}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k, v in [("users", ds.n_users), ("items", ds.n_items), ("interactions", len(ds.users)),
                 ("density", f"{len(ds.users) / (ds.n_users * ds.n_items):.4f}"),
                 ("train interactions", len(s.train_items)),
                 ("history length min/median/max",
                  f"{lengths.min()}/{int(np.median(lengths))}/{lengths.max()}"),
                 ("evaluated users", len(s.eval_users("test"))),
                 ("cold items", int(s.cold.sum())),
                 ("users with a cold test item", int(s.cold[s.test[s.eval_users('test')]].sum())),
                 ("example item text", ds.item_texts(cfg.data.item_template)[0])]:
        t.add_row(k, str(v))
    console.print(t)


@baseline_app.command("popularity")
def baseline_popularity(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                        split_seeds: str = typer.Option("0", "--split-seeds",
                                                        help="protocol split seeds (popularity is deterministic given a split)"),
                        json_path: str | None = JsonOpt):
    """Rank items by training popularity (cold items score zero)."""
    from fedrec.pipeline import prepare
    from fedrec.protocol import evaluate

    cfg = _config(config, run_config)
    runs = []
    for seed in _seeds(split_seeds):
        c = cfg.override(**{"data.split-seed": seed})
        p = prepare(c)
        pop = p.split.item_popularity().astype(np.float64)
        runs.append({"seed": seed, "test": evaluate(lambda u, _, q=pop: np.tile(q, (len(u), 1)),
                                                    p.split, item_vectors=p.item_emb)})
    summary = summarize([r["test"] for r in runs])
    _table("popularity (test)", {"popularity": summary})
    if json_path:
        name = "popularity" + ("" if cfg.data.cold_fraction else " (no cold items)")
        write_json(json_path, {"method": name, "command": command_line(),
                               "config": cfg.to_flat(), "seed_kind": "data.split-seed",
                               "runs": runs, "summary": {"best": summary, "final": summary},
                               "machine": machine()})


@baseline_app.command("text-similarity")
def baseline_text_similarity(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                             json_path: str | None = JsonOpt):
    """The untrained content model: cosine of each item's frozen PLM embedding with the mean
    embedding of the input's last model.max-len items (no training, cold items included)."""
    from fedrec.pipeline import prepare
    from fedrec.protocol import evaluate

    cfg = _config(config, run_config)
    p = prepare(cfg, progress=True)
    E, L = p.item_emb.astype(np.float64), cfg.model.max_len
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)

    def score(users, inputs):
        return np.stack([E[h[-L:]].mean(0) for h in inputs]) @ E.T
    summary = summarize([evaluate(score, p.split, item_vectors=p.item_emb)])
    _table("text similarity (test)", {"text-similarity": summary})
    if json_path:
        write_json(json_path, {"method": "text-similarity", "command": command_line(),
                               "config": cfg.to_flat(), "seed_kind": "none (deterministic)",
                               "runs": [{"seed": 0, "test": summary}],
                               "summary": {"best": summary, "final": summary},
                               "machine": machine()})


@app.command("train-central")
def train_central_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                      seeds: str = SeedsOpt, json_path: str | None = JsonOpt,
                      quiet: bool = typer.Option(False, help="no per-epoch lines")):
    """Centralized training of the same model on all users' data (the accuracy ceiling)."""
    from fedrec.pipeline import prepare
    from fedrec.train import train_central

    cfg = _config(config, run_config)
    p = prepare(cfg, progress=True, with_text=uses_text(cfg))
    runs = []
    for seed in _seeds(seeds):
        c = cfg.override(**{"train.seed": seed})
        console.print(f"[bold]centralized {cfg.model.kind}, seed {seed}[/bold]")
        t0 = time.time()
        r = train_central(c, p.split, p.item_emb, log=(lambda *_: None) if quiet else console.print)
        runs.append({"seed": seed, "best": r["best"], "final": r["final"],
                     "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                     "seconds": time.time() - t0, "curve": r["curve"]})
    _summarize_seeds(f"central-{_model_name(cfg)}", "epoch", cfg, runs, json_path)


def _run_inprocess(cfg: Config, run_dir, log) -> dict:
    """The same ServerApp and ClientApp, Ray-free: real Messages through an in-process Grid."""
    from flwr.app import Context, RecordDict

    import clients.app
    import server.app
    from fedrec.inprocess import InProcessGrid
    from fedrec.pipeline import prepare

    flat = cfg.override(**{"fed.run-dir": str(run_dir)}).to_flat()
    grid = InProcessGrid(clients.app.app, flat, prepare(cfg, with_text=False).split.n_users)
    server.app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=flat))
    return json.loads((run_dir / "results.json").read_text())


@app.command("simulate")
def simulate_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                 seeds: str = SeedsOpt, json_path: str | None = JsonOpt,
                 runs_dir: str | None = typer.Option(None, "--runs-dir",
                                                        help="parent of the per-seed run directories"),
                 engine: str = typer.Option("flower", help="flower (flwr run, one virtual SuperNode "
                                            "per user) | inprocess (Ray-free, same apps)"),
                 resume: str | None = typer.Option(None, "--resume", help="continue these killed "
                                                      "run directories (comma-separated, e.g. "
                                                      "<runs>/seed-0) from their last completed round, "
                                                      "with their own config; completed ones are "
                                                      "summarized with the others"),
                 rounds: int | None = typer.Option(None, "--rounds", help="with --resume: run to "
                                                   "this many rounds in all, extending killed or "
                                                   "completed non-private runs")):
    """Federated simulation of the whole user population on this machine."""
    from pathlib import Path

    from fedrec.pipeline import prepare

    if engine not in ("flower", "inprocess"):
        raise FedrecError(f"--engine: '{engine}' is not one of flower, inprocess")
    if rounds is not None and not resume:
        raise FedrecError("--rounds extends runs given with --resume; for a new run set "
                          "--run-config \"fed.num-rounds=N\"")
    if resume:
        if config or run_config:
            raise FedrecError("--resume continues a run with its own config (run_config.json); "
                              "leave out --config and --run-config")
        cfg, jobs, done = None, [], []
        for d in [Path(x).expanduser().resolve() for x in resume.split(",") if x.strip()]:
            c, job, results = _resumed(d, rounds)
            if cfg is not None and _experiment(c) != _experiment(cfg):
                raise FedrecError(f"--resume: {d} is another experiment than the first directory "
                                  "(configs differ beyond train.seed); resume them separately")
            cfg = cfg or c
            jobs += job
            done += [] if job else [(c, d, results)]
        if cfg is None:
            raise FedrecError("--resume: give at least one run directory")
        cfg = cfg.override(**{"fed.resume": False, "fed.run-dir": ""})
    else:
        done = []
        cfg = _config(config, run_config)
        base = (Path(runs_dir).expanduser() if runs_dir else run_dir_for(cfg)).resolve()
        jobs = [(cfg.override(**{"train.seed": seed}), base / f"seed-{seed}")
                for seed in _seeds(seeds)]
    if jobs:  # encode once, up front; refuse a sample larger than the population first
        from server.strategy import clients_per_round

        clients_per_round(cfg, prepare(cfg, progress=True,
                                       with_text=uses_text(cfg)).split.n_users)
    runs = []
    for c, run_dir, res in done:  # completed earlier: summarized as they are
        runs.append(_run_entry(c.train.seed, res, run_dir, res.get("seconds")))
    for c, run_dir in jobs:
        seed = c.train.seed
        console.print(f"[bold]federated {cfg.model.kind} ({cfg.fed.strategy}), seed {seed}[/bold]"
                      f" -> {run_dir}")
        t0 = time.time()
        res = _run_federated(c, run_dir, engine)
        runs.append(_run_entry(seed, res, run_dir, time.time() - t0))
    if not runs:
        return
    runs.sort(key=lambda r: r["seed"])
    _summarize_seeds(f"fed-{_model_name(cfg)} ({cfg.fed.strategy})", "round", cfg, runs,
                     json_path)


@app.command("privacy-sweep")
def privacy_sweep_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                      seeds: str = SeedsOpt,
                      epsilons: str = typer.Option("inf,8,4,2,1", help="target ε grid; inf = no DP"),
                      units: str = typer.Option("interaction,user", help="units of privacy: "
                                                "interaction (DP-SGD) and/or user (DP-FedAvg)"),
                      engine: str = typer.Option("inprocess", help="inprocess | flower"),
                      runs_dir: str | None = typer.Option(None, "--runs-dir", help="parent of the "
                                                           "runs (one per unit, ε and seed)"),
                      json_path: str | None = JsonOpt,
                      plot_path: str | None = typer.Option(None, "--plot", help="write the "
                                                            "privacy-utility plot (PNG) here"),
                      interaction_config: str = typer.Option(
                          "", "--interaction-run-config", help="more overrides for the "
                          "interaction cells only (e.g. privacy.max-grad-norm=1.0)"),
                      user_config: str = typer.Option(
                          "", "--user-run-config", help="more overrides for the user cells "
                          "only (e.g. privacy.max-grad-norm=0.03: C bounds a whole update)")):
    """Accuracy against ε for each unit of privacy (fedrec/sweep.py). A cell whose run
    directory already holds a finished run of the same config is reused, not run again."""
    import math

    from fedrec import sweep
    from fedrec.pipeline import prepare

    cfg = _config(config, run_config)
    per_unit = {"interaction": parse_overrides(interaction_config),
                "user": parse_overrides(user_config)}
    try:
        eps_grid = sweep.parse_epsilons(epsilons)
    except ValueError as exc:
        raise FedrecError(str(exc)) from None
    unit_list = [u.strip() for u in units.split(",") if u.strip()]
    bad = [u for u in unit_list if u not in sweep.MODES]
    if bad or not unit_list:
        raise FedrecError(f"--units: '{units}' must name interaction and/or user")
    if engine not in ("flower", "inprocess"):
        raise FedrecError(f"--engine: '{engine}' is not one of flower, inprocess")
    seed_list = _seeds(seeds)
    population = prepare(cfg, progress=True, with_text=uses_text(cfg)).split.n_users
    base = (Path(runs_dir).expanduser() if runs_dir else run_dir_for(cfg)).resolve()
    rows = []
    for unit, eps in sweep.cells(unit_list, eps_grid):
        c = sweep.plan(cfg.override(**per_unit.get(unit, {})), unit, eps, population)
        results = []
        for seed in seed_list:
            run_dir = base / f"{unit}-eps{eps:g}" / f"seed-{seed}"
            cs = c.override(**{"train.seed": seed})
            done = sweep.finished(run_dir, cs)
            console.print(f"[bold]privacy sweep: unit {unit}, ε {eps:g}, seed {seed}[/bold] -> "
                          f"{run_dir}{' (finished earlier: reused)' if done else ''}")
            results.append(done or _run_federated(cs, run_dir, engine))
        rows.append(sweep.row(c, unit, eps, results))
    t = Table(title="privacy sweep (test at best-validation round)")
    for col in ("unit", "ε", "ε spent", "δ", "σ", "C", "rounds", "HR@10", "NDCG@10"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["unit"], "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}",
                  "-" if r["epsilon-spent-max"] is None else f"{r['epsilon-spent-max']:.2f}",
                  "-" if r["delta"] is None else f"{r['delta']:g}",
                  "-" if r["sigma"] is None else f"{r['sigma']:.3f}",
                  "-" if r["max-grad-norm"] is None else f"{r['max-grad-norm']:g}",
                  str(r["rounds"]), fmt(r["sampled/hr@10"]), fmt(r["sampled/ndcg@10"]))
    console.print(t)
    if json_path:
        write_json(json_path, {"method": "privacy-sweep", "command": command_line(),
                               "config": cfg.to_flat(), "seed_kind": "train.seed", "rows": rows,
                               "machine": machine()})
    if plot_path:
        sweep.plot(rows, plot_path)


def _run_federated(cfg: Config, run_dir: Path, engine: str) -> dict:
    """One federated run (flwr run or in-process); its results.json, evaluated."""
    from fedrec.simulate import run_simulation

    if engine == "flower":
        res = run_simulation(cfg, run_dir=run_dir, log=console.print)
    else:
        res = _run_inprocess(cfg, run_dir, console.print)
    if not res["summary"]:
        raise FedrecError(f"{run_dir}/results.json: no evaluated round; set fed.eval-every "
                          "<= fed.num-rounds")
    return res


def _run_entry(seed: int, res: dict, run_dir: Path, seconds: float | None) -> dict:
    """One run of a result file, from its results.json: the summary, the replies the
    server dropped, and a digest of the final parameters (equal digests: bit-identical
    runs), so reports need nothing from the run directory."""
    import hashlib

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
    keys = [*CURVE_KEYS, *(f"val/{k}" for k in CURVE_KEYS), "cold/hr@10"]
    out = []
    for r in rounds:
        row = {"round": r["round"], "t": r.get("t")}
        if "train" in r:
            row["train-loss"] = r["train"].get("train-loss")
        for sec in ("federated", "server"):
            row.update({f"{sec}/{k}": r[sec][k] for k in keys if k in r.get(sec, {})})
        out.append(row)
    return out


def _experiment(cfg: Config) -> dict:
    """A run's config without what differs between the seeds of one experiment."""
    return run_identity(cfg.to_flat(), "train.seed")


def _resumed(run_dir: Path, rounds: int | None = None) -> tuple[Config, list, dict]:
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
        cfg = cfg.override(**{"fed.num-rounds": rounds})
        return cfg, [(cfg, run_dir)], files["results.json"]
    if files["results.json"].get("status") == "completed":
        console.print(f"{run_dir} already completed its {cfg.fed.num_rounds} rounds; "
                      "nothing to resume")
        return cfg, [], files["results.json"]
    return cfg, [(cfg, run_dir)], files["results.json"]


@certs_app.command("create")
def certs_create(out: str = typer.Option(..., "--out", help="directory for the credentials "
                                         "(outside the repository; never commit it)"),
                 hosts: str = typer.Option(..., "--hosts", help="comma-separated names/IPs the "
                                           "SuperNodes use to reach the SuperLink"),
                 nodes: int = typer.Option(..., "--nodes", help="SuperNode key pairs to create"),
                 days: int = typer.Option(365, "--days", help="certificate validity"),
                 force: bool = typer.Option(False, "--force", help="replace existing credentials")):
    """CA, SuperLink certificate (SANs: --hosts plus 127.0.0.1, localhost), SuperNode keys."""
    import shlex

    from fedrec.deploy import (
        CONNECTION,
        SUPERLINK_PORT,
        connection_toml,
        superlink_args,
        supernode_args,
    )
    from fedrec.transport import check_node_key, check_server_credentials, create_credentials

    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise FedrecError("--hosts: give at least one name or IP, e.g. --hosts 10.0.0.5")
    creds = create_credentials(Path(out), names, nodes, days=days, force=force)
    check_server_credentials(creds.ca_cert, creds.server_cert, creds.server_key, names)
    for key in creds.node_keys:
        check_node_key(key)
    t = Table(title=f"credentials in {creds.ca_cert.parent}")
    t.add_column("file")
    t.add_column("goes to")
    t.add_row("ca.crt", "every SuperNode (--root-certificates) and the flwr CLI connection")
    t.add_row("server.crt, server.key", "the SuperLink only (key: mode 0600)")
    t.add_row("ca.key", "nowhere: keep offline, it signs server certificates")
    for i, (key, pub) in enumerate(zip(creds.node_keys, creds.node_pubs)):
        t.add_row(f"supernodes/{key.name}, {pub.name}",
                  f"device {i} (private key) / `flwr supernode register` (.pub)")
    console.print(t)

    def show(args):  # one copy-pasteable line; --node-config keeps its inner quotes
        return " ".join(f'"{a}"' if "'" in a and not set('"$`\\') & set(a) else shlex.quote(a)
                        for a in [Path(args[0]).name, *args[1:]])

    def say(text):
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    addr = f"{names[0]}:{SUPERLINK_PORT}"
    pub0 = shlex.quote(str(creds.node_pubs[0])) if nodes else "KEY.pub"
    say("next:\n1. on the SuperLink machine:\n   " + show(superlink_args(
        creds.ca_cert.parent, port=SUPERLINK_PORT, database=Path("state.db"))))
    say(f"2. add to $FLWR_HOME/config.toml of the flwr CLI:\n"
        f"{connection_toml(addr, creds.ca_cert)}   then, per device:  "
        f"flwr supernode register {pub0} {CONNECTION}")
    say("3. on each device (its own key and data directory):\n   " + show(supernode_args(
        addr, Path("ca.crt"), Path("node-0" if not nodes else creds.node_keys[0].name), 9094,
        {"data-dir": "/path/to/device"})))
    say(f"4. flwr run . {CONNECTION} --run-config simulations/deploy/deploy.toml --stream")


@device_app.command("prepare")
def device_prepare(out: str = typer.Option(..., "--out", help="device directory to write"),
                   user: str = typer.Option(..., "--user", help="user id in data.dataset"),
                   config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                   encode: bool = typer.Option(True, help="also cache the catalog embeddings")):
    """A device directory for one user of a dataset: history.csv, items.csv, cache/."""
    from fedrec.data import load_dataset
    from fedrec.device import CACHE_DIR, Catalog, item_embeddings, write_device_dir

    cfg = _config(config, run_config)
    ds = load_dataset(cfg.data.dataset, cfg.data.cache_dir)
    if user not in ds.user_ids:
        raise FedrecError(f"--user: '{user}' is not a user of {ds.name} (ids such as "
                          f"{', '.join(ds.user_ids[:3])})")
    mask = ds.users == ds.user_ids.index(user)
    cat = Catalog(ds.item_ids, ds.item_fields, np.zeros(ds.n_items, bool), ds.source)
    dev = write_device_dir(Path(out), cat, [ds.item_ids[i] for i in ds.items[mask]],
                           ds.times[mask].tolist())
    if encode:
        item_embeddings(cfg, cat, dev / CACHE_DIR, progress=True)
    console.print(f"device {dev}: {int(mask.sum())} interactions, {ds.n_items} catalog items; "
                  f"start its SuperNode with --node-config \"data-dir='{dev.resolve()}'\"",
                  highlight=False)


@app.command("recommend")
def recommend_cmd(history: str = typer.Option(..., "--history", help="the user's history "
                                              "file (item,timestamp)"),
                  model: str = typer.Option(..., "--model", help="run directory with "
                                            "final.safetensors and run_config.json"),
                  k: int = typer.Option(10, "-k", "--top-k", help="how many items"),
                  catalog: str | None = typer.Option(None, "--catalog", help="catalog file "
                                                        "or directory (default: beside the "
                                                        "history, else the run's dataset)"),
                  model_dir: str = typer.Option("", "--model-dir", help="PLM directory "
                                                "(default: the run's encoder.model-dir)"),
                  cache_dir: str | None = typer.Option(None, "--cache-dir", help="embedding "
                                                          "cache (default: <history dir>/cache)"),
                  diversity: float = typer.Option(0.0, "--diversity", help="MMR re-ranking "
                                                  "weight in [0, 1] over the PLM embeddings "
                                                  "(0 = by score)")):
    """On-device top-K for one user's local history, with the history items behind each."""
    from fedrec.recommend import recommend

    recs = recommend(history, model, k, catalog, model_dir, cache_dir, diversity)
    t = Table(title=f"top {len(recs)} for {history}")
    for col, just in (("rank", "right"), ("item", "right"), ("text", "left"),
                      ("score", "right"), ("because of (history)", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in recs:
        shared = f" (shares {', '.join(r.shared)})" if r.shared else ""
        t.add_row(str(r.rank), r.item, r.text, f"{r.score:.3f}",
                  "; ".join(f"{text} [{iid}]" for iid, text, _ in r.because) + shared)
    console.print(t)


def _trained_seqrec(run_dir: str):
    from fedrec.recommend import load_for_dataset
    from fedrec.seqrec import SeqRec

    cfg, model, p = load_for_dataset(run_dir)
    if not isinstance(model, SeqRec):
        raise FedrecError(f"--model: '{run_dir}' trained model.kind '{cfg.model.kind}'; this "
                          "command evaluates the seq model (model.kind=seq)")
    return cfg, model, p


@app.command("explain-eval")
def explain_eval_cmd(model: str = typer.Option(..., "--model", help="run directories of "
                                               "trained seq models, comma-separated (seeds)"),
                     users: int = typer.Option(0, "--users", help="first N test users (0 = all)"),
                     draws: int = typer.Option(10, "--random-draws", help="random deletions "
                                               "per recommended item"),
                     json_path: str | None = JsonOpt):
    """Faithfulness of `recommend`'s reasons on test users: rank drop of each top-10 item
    when its reasons are deleted from the input vs random input items (fedrec.explain)."""
    import torch

    from fedrec.explain import deletion_test

    torch.set_num_threads(1)
    runs = []
    for run_dir in model.split(","):
        cfg, net, p = _trained_seqrec(run_dir)
        ids = p.split.eval_users("test")[:users or None]
        res = deletion_test(net, torch.from_numpy(p.item_emb),
                            [p.split.eval_history(u, "test") for u in ids], n_random=draws,
                            seed=cfg.train.seed)
        runs.append({"model": run_dir, "seed": cfg.train.seed, **res})
    summary = summarize([r["summary"] for r in runs])
    for key, v in summary.items():
        console.print(f"{key:32s} {v['mean']:.4f} ± {v['std']:.4f}")
    if json_path:
        write_json(json_path, {"method": "explain-eval (leave-one-out reasons)",
                               "command": command_line(), "config": cfg.to_flat(),
                               "runs": runs, "summary": summary, "machine": machine()})


@app.command("diversity-curve")
def diversity_curve_cmd(model: str = typer.Option(..., "--model", help="run directories of "
                                                  "trained models, comma-separated (seeds)"),
                        lambdas: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5,0.6,0.8",
                                                    "--lambdas", help="MMR weights in [0, 1]"),
                        json_path: str | None = JsonOpt):
    """Full HR@10 against intra-list diversity of MMR re-ranked top-10 lists on test users."""
    from fedrec.diversity import lambda_curve, random_list_ild
    from fedrec.recommend import load_for_dataset
    from fedrec.train import scorer

    try:
        grid = [float(x) for x in lambdas.split(",")]
    except ValueError:
        raise FedrecError(f"--lambdas: '{lambdas}' is not a comma-separated list of numbers") from None
    if not all(0.0 <= x <= 1.0 for x in grid):
        raise FedrecError(f"--lambdas: every weight must be in [0, 1], got {lambdas}")
    import torch

    runs = []
    for run_dir in model.split(","):
        cfg, net, p = load_for_dataset(run_dir)
        rows = lambda_curve(scorer(net, torch.from_numpy(p.item_emb)), p.split, p.item_emb, grid)
        runs.append({"model": run_dir, "seed": cfg.train.seed, "curve": rows})
    keys = [k for k in runs[0]["curve"][0] if k != "lambda"]
    summary = [{"lambda": lam, **summarize([{k: r["curve"][i][k] for k in keys} for r in runs])}
               for i, lam in enumerate(grid)]
    t = Table(title="MMR re-ranking on test users (mean over runs)")
    for col in ("lambda", *keys):
        t.add_column(col, justify="right")
    for row in summary:
        t.add_row(f"{row['lambda']:g}", *(f"{row[k]['mean']:.4f}" for k in keys))
    console.print(t)
    if json_path:
        write_json(json_path, {"method": "diversity-curve (MMR)", "command": command_line(),
                               "config": cfg.to_flat(), "runs": runs, "summary": summary,
                               "random-list-ild@10": random_list_ild(p.item_emb),
                               "machine": machine()})


@app.command("audit")
def audit_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
              params: str | None = typer.Option(None, "--params", help="global federated "
                                                 "parameters the round starts from (a run's "
                                                 "final.safetensors); default a fresh model"),
              users: int = typer.Option(200, "--users", help="target users (random, seed "
                                        "train.seed)"),
              epsilons: str = typer.Option("inf,8", "--epsilons", help="inf = no DP; a number "
                                           "= sample-level DP-SGD with that target ε"),
              json_path: str | None = JsonOpt):
    """Membership inference from one device update (fedrec/audit.py): the AUC of telling a
    user's training items from other catalog items, per attack statistic and ε."""
    import math

    from fedrec import audit
    from fedrec.pipeline import prepare
    from fedrec.privacy import describe

    cfg = _config(config, run_config)
    if users < 1:
        raise FedrecError(f"--users must be >= 1, got {users}")
    if params is not None and not Path(params).expanduser().is_file():
        raise FedrecError(f"--params: '{params}' is not a file; give a run's final.safetensors")
    settings = audit.privacy_settings(cfg, epsilons)
    p = prepare(cfg, progress=True, with_text=uses_text(cfg))
    arrays = audit.global_params(cfg, p.item_emb.shape[1], p.split.n_items,
                                 params and str(Path(params).expanduser()))
    chosen = audit.targets(p.split, users, cfg.train.seed)
    rows = []
    for eps, c in settings:
        console.print(f"[bold]audit: ε {eps:g} ({describe(c)['unit']}), {len(chosen)} users[/bold]")
        r = audit.audit(c, p.item_emb, p.split, arrays, chosen, log=console.print)
        if math.isinf(eps):  # no DP: no ε (JSON has no infinity)
            r["epsilon_spent"] = None
        rows.append({"epsilon": None if math.isinf(eps) else eps, "privacy": describe(c), **r})
    t = Table(title=f"membership inference from one update (AUC, mean over {len(chosen)} users)")
    for col in ("ε", "unit", "ε spent", "σ", *audit.STATS, "best"):
        t.add_column(col, justify="right")
    for r in rows:
        spent = r["epsilon_spent"]
        t.add_row("∞" if r["epsilon"] is None else f"{r['epsilon']:g}", r["privacy"]["unit"],
                  "-" if spent is None else f"{spent['max']:.2f}",
                  f"{r['noise_multiplier_mean']:.3f}", *(f"{r['auc'][s]:.3f}" for s in audit.STATS),
                  f"{r['best']['auc']:.3f} ({r['best']['statistic']})")
    console.print(t)
    if json_path:
        write_json(json_path, {"method": "audit", "command": command_line(),
                               "config": cfg.to_flat(), "params": params or
                               f"fresh model (train.seed {cfg.train.seed})", "rows": rows,
                               "machine": machine()})


def main() -> None:
    from fedrec.results import git_commit

    git_commit()  # the code this run starts with, recorded in every result file it writes
    try:
        app(standalone_mode=False)
    except FedrecError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
