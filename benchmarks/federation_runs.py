"""A federated run for a benchmark, through ``python -m simulation run``: skipped when it has finished
before (so an interrupted benchmark continues where it stopped), refused when a site failed a round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
