"""Flower ServerApp: Flower glue only; the run itself is fedrec.federation.serve (set up or
resume the run directory, start the strategy, stop at the privacy budget, save results)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.federation import flower
from fedrec.federation.serve import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # fedrec's Flower adaptations (fedrec/federation/flower.py), before the first round's
    # messages are stored: in simulation this process also hosts the engine's LinkState.
    flower.install()
    serve(grid, context)
