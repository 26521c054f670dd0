"""`flwr run .` from the project root runs the built-in three-hospital demo on a local SuperLink.

Flower starts that SuperLink in the background and leaves it running; the test gives it its own
FLWR_HOME and ports, and stops it (and its executor) by PID afterwards.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fed_swinumamba.deployment import free_port

ROOT = Path(__file__).resolve().parents[1]


def _pids_started_with(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the background SuperLink through /proc")
def test_flwr_run_dot_runs_the_three_site_demo(tmp_path):
    home = tmp_path / "flwr-home"
    link_port, control_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(link_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),  # where the virtual nodes generate the demo: a site's own folder
    }
    out, demo = tmp_path / "out", tmp_path / "xdg-data" / "fed_swinumamba" / "demo"
    run_config = f"num-server-rounds=2 local-steps=2 lr=0.002 finetune-steps=2 output-dir='{out}'"
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--federation-config", "num-supernodes=3", "--run-config", run_config, "--stream"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        # The SuperLink (its log and database live in FLWR_HOME) and the executor it started.
        for pid in _pids_started_with(str(home)) + _pids_started_with(f"--runtime-api-address 127.0.0.1:{link_port}"):
            os.kill(pid, signal.SIGTERM)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for rnd in metrics["rounds"]:
        assert {name: s["modality"] for name, s in rnd["sites"].items()} == {
            "demo_ct": "ct",
            "demo_mri": "mri",
            "demo_us": "us",
        }
        assert all(set(s["dice"]) == {"organ", "lesion"} for s in rnd["sites"].values())
    # Each virtual node played the demo site of its partition, generated once in the user's data folder.
    assert sorted(p.name for p in (demo / "sites").rglob("*.yaml")) == ["demo_ct.yaml", "demo_mri.yaml", "demo_us.yaml"]
    assert "global Dice per site" in log  # the round's table reaches the user's terminal
