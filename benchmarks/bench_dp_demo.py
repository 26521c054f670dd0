"""Dice of the demo federation with DP-SGD (epsilon per site) beside the same run without DP.

Runs ``python -m simulation demo`` twice with the same phantoms, rounds, steps and slices per step
(DP: 4 Poisson-sampled cases x 2 slices; non-DP: batches of 8 slices), and prints a Markdown table of
each site's final mean foreground Dice and the DP/non-DP ratio (target >= 0.9).

    python benchmarks/bench_dp_demo.py --cases 64 --local-steps 20 --epsilon 8 --out runs/bench_dp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_demo(out: Path, cases: int, local_steps: int, epsilon: float | None) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "simulation", "demo", "--out", str(out), "--cases", str(cases), "--set", f"local-steps={local_steps}"]
    if epsilon is not None:
        cmd += ["--dp-epsilon", str(epsilon)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dp"))
    args = parser.parse_args()
    plain, plain_s = run_demo(args.out / "no_dp", args.cases, args.local_steps, None)
    private, private_s = run_demo(args.out / "dp", args.cases, args.local_steps, args.epsilon)
    last_plain, last_private = plain["rounds"][-1]["sites"], private["rounds"][-1]["sites"]
    rounds = len(plain["rounds"])
    print(f"Demo phantoms, {args.cases} cases per site, {rounds} rounds x {args.local_steps} local steps; "
          f"run time {plain_s:.0f} s without DP, {private_s:.0f} s with DP.\n")
    print("| site | Dice without DP | Dice with DP | ratio | epsilon spent | delta | noise multiplier |")
    print("|---|---|---|---|---|---|---|")
    for site in sorted(last_plain):
        a, b = last_plain[site]["dice_mean"], last_private[site]["dice_mean"]
        p = last_private[site]["privacy"]
        print(f"| {site} | {a:.3f} | {b:.3f} | {b / a:.2f} | {last_private[site]['epsilon']:.3f} | {p['delta']:.0e} | {p['noise_multiplier']:.3f} |")


if __name__ == "__main__":
    main()
