"""The `fedrec` command: options in, one library call, a table out; a user-fixable error
is one line on stderr, exit code 2. Each command imports its own stack when it runs
(`# lazy`): torch, Flower and the rest take seconds to import, and `fedrec --help` or
`fedrec data fetch` need none of them."""

import sys

import click
import typer
from rich.console import Console
from rich.table import Table

from fedrec.config import Config, load_config, parse_overrides, parse_seeds
from fedrec.errors import FedrecError
from fedrec.results import HEADLINE, fmt, git_commit, write_result

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated recommendation with a frozen PLM.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect datasets.")
baseline_app = typer.Typer(no_args_is_help=True, help="Non-learned reference points.")
certs_app = typer.Typer(no_args_is_help=True, help="TLS and SuperNode-auth credentials.")
device_app = typer.Typer(no_args_is_help=True, help="Set up a device (SuperNode) directory.")
for sub, name in ((data_app, "data"), (baseline_app, "baseline"), (certs_app, "certs"),
                  (device_app, "device")):
    app.add_typer(sub, name=name)
console, err = Console(), Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", help="TOML file of config overrides")
RunConfigOpt = typer.Option("", "--run-config", help="overrides, e.g. 'train.lr=0.01 model.dim=32'")
SeedsOpt = typer.Option("0,1,2", "--seeds", help="comma-separated training seeds")
JsonOpt = typer.Option(None, "--json", help="write metrics, config and command to this JSON file")
EngineOpt = typer.Option("flower", help="flower (flwr run) | inprocess (Ray-free, same apps)")
RunsOpt = typer.Option(None, "--runs-dir", help="parent of the per-seed run directories")
ModelsOpt = typer.Option(..., "--model", help="run directories, comma-separated (seeds)")


def _config(config: str | None, run_config: str) -> Config:
    return load_config(parse_overrides(run_config), config)


def _show(title: str, columns: list[str], rows: list[list]) -> None:
    """A table; columns of numbers (mean ± std included) are right-aligned."""
    t = Table(title=title)
    number = lambda v: str(v).split(" ")[0].lstrip("-+").replace(".", "", 1).isdigit() or str(v) in ("∞", "n/a", "-")
    for i, col in enumerate(columns):
        right = i > 0 and all(number(r[i]) for r in rows)
        t.add_column(col, justify="right" if right else "left", overflow="fold")
    for r in rows:
        t.add_row(*map(str, r))
    console.print(t)


def _report(body: dict | None, json_path: str | None, unit: str = "") -> None:
    """The headline table of a result body (test at the reported epoch or round), and its file."""
    if body:
        at = "the last" if unit == "round" and body["config"].get("fed.select") == "last" else "best-validation"
        _show(f"{body['method']} (test{f' at {at} {unit}' if unit else ''})", ["method", *HEADLINE], [[body["method"], *map(fmt, map(body["summary"]["best"].get, HEADLINE))]])
        write_result(json_path, body)


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument("ml-100k"),
               cache_dir: str = typer.Option("", help="default $FEDREC_HOME or ~/.cache/fedrec"),
               source: str = typer.Option("auto", help="auto | recbole | grouplens")):
    """Fetch a dataset into the user cache (never into the repository)."""
    from fedrec.data.fetch import fetch  # lazy
    console.print(f"{name} ready in {fetch(name, cache_dir, source)}")


@data_app.command("stats")
def data_stats(config: str | None = ConfigOpt, run_config: str = RunConfigOpt):
    """Users, items, interactions and the protocol split of the configured dataset."""
    from fedrec.models.baselines import dataset_stats  # lazy
    _show("dataset", ["quantity", "value"], dataset_stats(_config(config, run_config)))


@baseline_app.command("popularity")
def baseline_popularity(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                        split_seeds: str = typer.Option("0", "--split-seeds", help="protocol split seeds"),
                        epsilon: float | None = typer.Option(None, "--epsilon", help="DP at this ε, unit --unit (docs/privacy.md)"),
                        delta: float = typer.Option(1e-4, "--delta", help="δ of --epsilon"), device_text: bool = typer.Option(False, "--device-text", help="--epsilon: the private recommender (the release + the device's PLM text profile)"),
                        draws: int = typer.Option(5, "--draws", help="noise draws of --epsilon"), unit: str = typer.Option("user", "--unit", help="--epsilon's unit: user | block"), json_path: str | None = JsonOpt):
    """Rank items by training popularity (cold items score zero); --epsilon: by DP counts."""
    from fedrec.models.baselines import popularity  # lazy
    from fedrec.privacy.dp_popularity import dp_popularity  # lazy
    cfg, seeds = _config(config, run_config), parse_seeds(split_seeds)
    _report(popularity(cfg, seeds) if epsilon is None else dp_popularity(cfg, epsilon, delta, draws=draws, split_seeds=seeds, device_text=device_text, unit=unit), json_path)


@baseline_app.command("text-similarity")
def baseline_text_similarity(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                             json_path: str | None = JsonOpt):
    """The untrained content model: PLM cosine to the mean of the input's last items."""
    from fedrec.models.baselines import text_similarity  # lazy
    _report(text_similarity(_config(config, run_config)), json_path)


@app.command("train-central")
def train_central_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                      seeds: str = SeedsOpt, json_path: str | None = JsonOpt,
                      quiet: bool = typer.Option(False, help="no per-epoch lines"),
                      save_dir: str | None = typer.Option(None, help="keep the best model as a "
                                                          "run directory (DIR/seed-N for several seeds)")):
    """Centralized training of the same model on all users' data (the accuracy ceiling)."""
    from fedrec.experiments.runs import central  # lazy
    body = central(_config(config, run_config), parse_seeds(seeds), log=console.print,
                   quiet=quiet, save_dir=save_dir)
    _report(body, json_path, "epoch")


@app.command("simulate")
def simulate_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                 seeds: str = SeedsOpt, json_path: str | None = JsonOpt,
                 runs_dir: str | None = RunsOpt, engine: str = EngineOpt,
                 resume: str | None = typer.Option(None, help="continue these killed run directories (comma-separated) with their own config"),
                 rounds: int | None = typer.Option(None, help="with --resume: extend to this many rounds in all (non-private runs)"),
                 ray_address: str | None = typer.Option(None, help="HOST:PORT of a Ray cluster's "
                                                        "head to simulate on (docs/federated.md)")):
    """Federated simulation of the whole user population (one machine or a Ray cluster)."""
    from fedrec.experiments.runs import federated  # lazy
    body = federated(None if resume else _config(config, run_config), parse_seeds(seeds),
                     engine=engine, runs_dir=runs_dir, resume=resume, rounds=rounds,
                     overrides=bool(config or run_config), ray_address=ray_address,
                     log=console.print)
    _report(body, json_path, "round")


@app.command("privacy-sweep")
def privacy_sweep_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                      seeds: str = SeedsOpt,
                      epsilons: str = typer.Option("inf,8,4,2,1", help="target ε grid; inf = no DP"),
                      units: str = typer.Option("block,user", help="block and/or user"),
                      engine: str = typer.Option("inprocess", help="inprocess | flower"),
                      runs_dir: str | None = RunsOpt, json_path: str | None = JsonOpt,
                      plot_path: str | None = typer.Option(None, "--plot", help="privacy-utility PNG"),
                      block_config: str = typer.Option("", "--block-run-config",
                                                       help="overrides of the block cells"),
                      user_config: str = typer.Option("", "--user-run-config",
                                                      help="overrides of the user cells")):
    """Accuracy against ε for each unit of privacy (finished cells are reused)."""
    from fedrec.experiments import sweep  # lazy
    body = sweep.run(_config(config, run_config), seeds=parse_seeds(seeds), epsilons=epsilons,
                     units=units, engine=engine, runs_dir=runs_dir, log=console.print,
                     per_unit={"block": block_config, "user": user_config})
    _show("privacy sweep (test at the round fed.select picks)", *sweep.table(body["rows"]))
    write_result(json_path, body)
    if plot_path:
        sweep.plot(body["rows"], plot_path)


@certs_app.command("create")
def certs_create(out: str = typer.Option(..., help="credentials directory (never commit it)"),
                 hosts: str = typer.Option(..., help="names/IPs of the SuperLink, comma-separated"),
                 nodes: int = typer.Option(..., help="SuperNode key pairs to create"),
                 days: int = typer.Option(365, help="certificate validity"),
                 force: bool = typer.Option(False, help="replace existing credentials")):
    """CA, SuperLink certificate (SANs: --hosts plus 127.0.0.1, localhost), SuperNode keys."""
    from fedrec.deployment.commands import create_deployment_credentials  # lazy
    files, steps = create_deployment_credentials(out, hosts, nodes, days, force)
    _show(f"credentials in {out}", ["file", "goes to"], files)
    console.print(steps, markup=False, highlight=False, soft_wrap=True)


@device_app.command("prepare")
def device_prepare(out: str = typer.Option(..., help="device directory to write"),
                   user: str = typer.Option(..., help="user id in data.dataset"),
                   config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
                   encode: bool = typer.Option(True, help="also cache the catalog embeddings")):
    """A device directory for one user of a dataset: history.csv, items.csv, cache/."""
    from fedrec.data.device import prepare_user_device  # lazy
    console.print(prepare_user_device(_config(config, run_config), out, user, encode), highlight=False)


@app.command("recommend")
def recommend_cmd(history: str = typer.Option(..., help="the user's history file (item,timestamp)"),
                  model: str = typer.Option(..., help="a run directory (simulate, train-central --save-dir)"),
                  k: int = typer.Option(10, "-k", "--top-k", help="how many items"),
                  catalog: str | None = typer.Option(None, help="default: beside the history"),
                  model_dir: str = typer.Option("", help="PLM (default: the run's)"),
                  cache_dir: str | None = typer.Option(None, help="default: <history dir>/cache"),
                  diversity: float = typer.Option(0.0, help="MMR weight in [0, 1] (0 = by score)")):
    """On-device top-K for one user's local history, with the history items behind each."""
    from fedrec.ranking.recommend import recommend  # lazy
    recs = recommend(history, model, k, catalog, model_dir, cache_dir, diversity)
    _show(f"top {len(recs)} for {history}", ["rank", "item", "text", "score", "because of (history)"],
          [[r.rank, r.item, r.text, f"{r.score:.3f}", r.reasons_text] for r in recs])


@app.command("explain-eval")
def explain_eval_cmd(model: str = ModelsOpt,
                     users: int = typer.Option(0, help="first N test users (0 = all)"),
                     draws: int = typer.Option(10, "--random-draws", help="per recommended item"),
                     json_path: str | None = JsonOpt):
    """Faithfulness of `recommend`'s reasons: deleting them vs random input items."""
    from fedrec.ranking.explain import evaluate_runs  # lazy
    body = evaluate_runs(model.split(","), users, draws)
    _show("deletion test (mean ± std over runs)", ["quantity", "value"],
          [[k, f"{v['mean']:.4f} ± {v['std']:.4f}"] for k, v in body["summary"].items()])
    write_result(json_path, body)


@app.command("diversity-curve")
def diversity_curve_cmd(model: str = ModelsOpt, json_path: str | None = JsonOpt,
                        lambdas: str = typer.Option("0,0.02,0.04,0.06,0.08,0.1,0.12,0.15",
                                                    "--lambdas", help="diversity weights in [0, 1]"),
                        method: str = typer.Option("mmr", help="mmr | dpp (re-ranker)"),
                        similarity: str = typer.Option("plm", help="plm | plm-centred | genres")):
    """Full HR@10 against intra-list diversity of re-ranked top-10 lists on test users."""
    from fedrec.ranking.diversity import curve_runs  # lazy
    body = curve_runs(model.split(","), lambdas, method, similarity)
    keys = [k for k in body["summary"][0] if k != "lambda"]
    _show(f"{method.upper()} re-ranking (mean over runs)", ["lambda", *keys], [[f"{r['lambda']:g}", *(
        f"{r[k]['mean']:.4f}" for k in keys)] for r in body["summary"]])
    write_result(json_path, body)


@app.command("audit")
def audit_cmd(config: str | None = ConfigOpt, run_config: str = RunConfigOpt,
              model: str | None = typer.Option(None, help="a run directory, with its config "
                                                "(default: a fresh model of --config), or the "
                                                "file of a release (baseline popularity --json)"),
              users: int = typer.Option(200, help="random target users"),
              epsilons: str = typer.Option("inf,8", help="inf = no DP, else DP-SGD's target ε"),
              json_path: str | None = JsonOpt):
    """Membership inference from one device update: AUC per attack statistic and ε."""
    from fedrec.experiments import audit  # lazy
    from fedrec.models.saved import load_run  # lazy
    if model and model.endswith(".json"):  # a one-release recommender's file: its release
        body = audit.release_file(model, users)
    else:
        cfg = load_run(model)[0].override(**parse_overrides(run_config)) if model else _config(config, run_config)
        body = audit.run(cfg, model=model, users=users, epsilons=epsilons, log=console.print)
    _show(f"membership inference from {body['threat']} (AUC, mean over {body['rows'][0]['users']} users)",
          *audit.table(body["rows"]))
    write_result(json_path, body)


def main() -> None:
    git_commit()  # the code this run starts with, recorded in every result file it writes
    try:
        app(standalone_mode=False)
    except FedrecError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.ClickException as exc:  # usage errors: their own code and message
        exc.show()
        sys.exit(exc.exit_code)
