"""The server side of one federated run (what the ServerApp calls): set up or resume the
run directory, start the strategy, stop at the privacy budget, save the results."""

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

from fedrec.config import Config
from fedrec.federation import secagg
from fedrec.federation.run_store import FederatedRun
from fedrec.federation.strategy import BudgetExhausted, Recording


def serve(grid: Grid, context: Context) -> None:
    cfg = Config.from_flat(context.run_config)
    run = FederatedRun(cfg)
    if cfg.secagg.enabled:  # SecAgg+ runs on Flower's legacy path (secagg.py)
        return secagg.serve(grid, context, cfg, run)
    done, arrays, server_state = run.resume() if cfg.fed.resume else (0, run.initial_arrays(), {})
    strategy = Recording(cfg, run, population=run.population, done_rounds=done,
                         server_state=server_state)
    try:
        result = strategy.start(grid=grid, initial_arrays=arrays,
                                num_rounds=cfg.fed.num_rounds - done,
                                timeout=cfg.fed.round_timeout, train_config=ConfigRecord(),
                                evaluate_fn=run.evaluate_fn(done))
    except BudgetExhausted as stop:  # user-level DP: the next round would exceed ε
        run.log(str(stop))
        run.finish(stop.arrays, stopped=str(stop))
        return
    # no aggregated round (all kept the previous model, or none left): the last global one
    run.finish(result.arrays if len(result.arrays) else arrays)
