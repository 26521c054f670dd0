"""A federated run for a benchmark, through ``python -m simulation run``: skipped when it has finished
before (so an interrupted benchmark continues where it stopped), refused when a site failed a round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fed_swinumamba.simulated import generate_phantoms, make_demo_sites, split_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_once(out: Path, sites: list[Path], overrides: dict[str, object], flags: tuple[str, ...] = ()) -> dict:
    """One federated run on ``sites``, skipped when it has finished before; its metrics and wall time.

    metrics.json is written every round, so the wall-time file, written at the end, marks a finished run;
    an unfinished one is started again from nothing."""
    wall = out / "wall_seconds.txt"
    if not wall.is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "simulation", "run", "--sites", *map(str, sites), "--out", str(out), *flags]
        cmd += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        failures = [
            f"round {r['round']} {site}: {e}"
            for r in json.loads((out / "metrics.json").read_text())["rounds"]
            for site, entry in r["sites"].items()
            for e in entry.get("errors", [])
        ]
        if failures:  # a site that failed a round (e.g. killed for memory) makes the run no measurement
            raise SystemExit(
                f"{out}: sites failed, the run is not counted (it runs again next time):\n" + "\n".join(failures)[:2000]
            )
        wall.write_text(f"{time.perf_counter() - started:.0f}\n")
    return json.loads((out / "metrics.json").read_text()) | {"wall_s": float(wall.read_text())}


def make_sites(federation: str, root: Path, cases: int, seed: int, test_fraction: float) -> list[Path]:
    """The federation's site YAMLs (written once), each keeping a test split apart."""
    if federation == "demo":
        yamls = make_demo_sites(root, num_cases=cases, seed=seed)
    else:
        data = generate_phantoms(root / "data", "ct", num_cases=cases, seed=seed)
        yamls = split_dataset(data, "ct", 4, federation, seed, root / "sites", site_prefix=f"{federation}_ct")
    for path in yamls:
        text = path.read_text()
        if "test_fraction" not in text:
            path.write_text(text + f"split:\n  val_fraction: 0.2\n  test_fraction: {test_fraction}\n  seed: {seed}\n")
    return yamls
