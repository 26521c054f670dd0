"""Flower ServerApp of the coordinator: reads the run config and runs the federation."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import Federation
from .settings import FederationSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fed_swinumamba").setLevel(logging.INFO)
    Federation(grid, FederationSettings.from_run_config(context.run_config)).run()
