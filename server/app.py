"""Flower ServerApp: parse the config, set up the run, start the strategy, save results."""

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import Config

from server.run import FederatedRun
from server.strategy import make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = Config.from_flat(context.run_config)
    run = FederatedRun(cfg)
    strategy = make_strategy(cfg, run, population=run.population)
    result = strategy.start(grid=grid, initial_arrays=run.initial_arrays(),
                            num_rounds=cfg.fed.num_rounds, train_config=ConfigRecord(),
                            evaluate_fn=run.server_evaluate)
    run.finish(result.arrays)
