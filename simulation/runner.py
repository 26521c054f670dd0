"""Runs the coordinator and N sites on Flower's simulation engine (virtual SuperNode i = site i)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client import client_app
from fed_swinumamba.data import load_site_config
from fed_swinumamba.run_config import resolve_run_config
from fed_swinumamba.simulated.baseline import Budget, train_centralized, train_local_only
from server import server_app
from server.settings import FederationSettings


def simulation_run_config(out: Path, overrides: dict) -> dict:
    """The run config ``flwr run`` would build from pyproject, with this simulation's output folder."""
    try:
        return resolve_run_config({**overrides, "output-dir": str(out.resolve())})
    except ValueError as err:
        raise SystemExit(str(err)) from None


def run_federated_simulation(sites: list[Path], out: Path, overrides: dict, cpus_per_site: int | None = None) -> dict:
    """Run the federation in-process and return the metrics it wrote to ``out/metrics.json``.

    Each site gets ``cpus_per_site`` cores (default: the machine's cores shared out, at least one).
    """
    run_config = simulation_run_config(out, overrides)
    cpus_per_site = cpus_per_site or max(1, (os.cpu_count() or 1) // len(sites))

    def as_hospital(msg: Message, context: Context, call_next):
        """Virtual node i plays site i: give it the node config a real SuperNode would have."""
        site = sites[int(context.node_config["partition-id"])]
        node_config = {**context.node_config, "site-config": str(site.resolve())}
        torch.set_num_threads(cpus_per_site)  # sites share the cores: oversubscribed threads stall
        ctx = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=node_config,
            state=context.state,
            run_config=context.run_config,
        )
        return call_next(msg, ctx)

    server = ServerApp()

    @server.main()
    def _server(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        server_app.main(grid, context)

    client = ClientApp(mods=[as_hospital])
    client.query()(client_app.query)
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


BASELINES = {"centralized": train_centralized, "local_only": train_local_only}


def run_baseline(kind: str, sites: list[Path], out: Path, overrides: dict) -> list[dict]:
    """Train a baseline (``BASELINES``) with the federation's budget; written to ``out/metrics.json`` under ``kind``."""
    logging.getLogger("fed_swinumamba").setLevel(logging.INFO)
    s = FederationSettings.from_run_config(simulation_run_config(out, overrides))
    budget = Budget(
        s.model_config,
        tuple(s.class_names),
        s.schedule,
        s.num_rounds,
        s.local_steps,
        s.seed,
        s.pretrained_checkpoint,
        s.eval_interval,
        s.eval_cases,
        s.nsd_tolerance_mm,
    )
    history = BASELINES[kind]([load_site_config(p) for p in sites], budget)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"rounds": []}
    metrics[kind] = history
    metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    return history
