"""Flower ServerApp of the coordinator: reads the run config and runs the federation."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_swinumamba.logs import enable_console_logging

from .federation import Federation
from .settings import FederationSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    enable_console_logging()
    Federation(grid, FederationSettings.from_run_config(context.run_config)).run()
