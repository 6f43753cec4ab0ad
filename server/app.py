"""Flower ServerApp: Flower glue only; the run itself is fedrec.federation.serve (set up or resume
the run directory, start the strategy, stop at the privacy budget, save results)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.federation import array_decode, linkstate_index
from fedrec.federation.serve import serve

# In simulation this process also hosts the engine's LinkState: index it by node
# (fedrec/federation/linkstate_index.py), before the first round's messages are stored.
linkstate_index.install()
# Decode each reply's arrays without re-parsing their .npy headers (fedrec/federation/array_decode.py).
array_decode.install()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)
