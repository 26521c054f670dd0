"""Runs the coordinator and N sites on Flower's simulation engine (virtual SuperNode i = site i)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client import client_app
from server import server_app
from server.settings import DEFAULTS


def simulation_run_config(sites: list[Path], out: Path, overrides: dict) -> dict:
    """The run config ``flwr run`` would build from pyproject, plus this simulation's sites and output."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown run config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides, "output-dir": str(out.resolve()), "site-configs": ",".join(str(p.resolve()) for p in sites)}


def run_federated_simulation(sites: list[Path], out: Path, overrides: dict, cpus_per_site: float = 1.0) -> dict:
    """Run the federation in-process and return the metrics it wrote to ``out/metrics.json``."""
    run_config = simulation_run_config(sites, out, overrides)

    def with_run_config(msg: Message, context: Context, call_next):
        context.run_config.update(run_config)  # the simulation engine's Python API passes no run config
        return call_next(msg, context)

    server = ServerApp()

    @server.main()
    def _server(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        server_app.main(grid, context)

    client = ClientApp(mods=[with_run_config])
    client.train()(client_app.train)
    client.evaluate()(client_app.evaluate)

    out.mkdir(parents=True, exist_ok=True)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}},
    )
    return json.loads((out / "metrics.json").read_text())
