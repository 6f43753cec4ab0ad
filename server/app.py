"""Flower ServerApp: Flower glue only; the run itself is fedrec.serve (set up or resume
the run directory, start the strategy, stop at the privacy budget, save results)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.serve import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)
