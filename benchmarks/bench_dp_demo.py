"""Dice of the demo federation with DP-SGD (epsilon per site) beside the same run without DP.

Runs ``python -m simulation demo`` twice with the same phantoms, network and rounds: without DP with
the sites' default batches of 8 slices and ``--local-steps``; with DP, Poisson batches of
``--cases-per-batch`` cases and the DP-only settings of ``--dp-set`` (e.g. fewer, larger steps and layers
left untrained, a larger DP learning rate: ``dp-local-steps``, ``dp-frozen``, ``dp-slices-per-case``,
``dp-lr-scale``). Prints a Markdown table of each site's final mean foreground Dice and the DP/non-DP
ratio (target >= 0.9). Every DP run is a study of its own (``bench-dp-<time>``): the sites' privacy ledgers
outlive runs, and a rerun of one study would find its budget spent.

    python benchmarks/bench_dp_demo.py --cases 4000 --local-steps 20 --epsilon 8 --cases-per-batch 256 \
        --dp-set dp-local-steps=10 --dp-set dp-slices-per-case=1 --dp-set dp-frozen=stage4,up_blocks.0.,skips.3. \
        --dp-set dp-lr-scale=4 --set eval-interval=6 --set cross-site-eval=false --out runs/bench_dp4000_lr4
    # only the final Dice is compared
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_demo(out: Path, cases: int, local_steps: int, epsilon: float | None, cases_per_batch: int, overrides: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "simulation", "demo", "--out", str(out), "--cases", str(cases), "--set", f"local-steps={local_steps}"]
    cmd += [arg for kv in overrides for arg in ("--set", kv)]
    if epsilon is not None:
        cmd += ["--dp-epsilon", str(epsilon), "--set", f"dp-cases-per-batch={cases_per_batch}", "--set", f"study=bench-dp-{time.time_ns()}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--cases-per-batch", type=int, default=16, help="expected cases per DP batch")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dp"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="run-config override for both runs")
    parser.add_argument("--dp-set", dest="dp_overrides", action="append", default=[], metavar="KEY=VALUE", help="run-config override for the DP run only")
    args = parser.parse_args()
    plain, plain_s = run_demo(args.out / "no_dp", args.cases, args.local_steps, None, args.cases_per_batch, args.overrides)
    private, private_s = run_demo(args.out / "dp", args.cases, args.local_steps, args.epsilon, args.cases_per_batch, args.overrides + args.dp_overrides)
    last_plain, last_private = plain["rounds"][-1]["sites"], private["rounds"][-1]["sites"]
    rounds = len(plain["rounds"])
    load = f"{os.getloadavg()[0]:.2f}"
    print(f"Demo phantoms, {args.cases} cases per site, {rounds} rounds x {args.local_steps} local steps, DP batches of "
          f"{args.cases_per_batch} expected cases, DP-only settings {args.dp_overrides or 'none'}; "
          f"run time {plain_s:.0f} s without DP, {private_s:.0f} s with DP; load average {load} at the end.\n")
    print("| site | Dice without DP | Dice with DP | ratio | epsilon spent | delta | noise multiplier | DP steps |")
    print("|---|---|---|---|---|---|---|---|")
    for site in sorted(last_plain):
        a, b = last_plain[site]["dice_mean"], last_private[site]["dice_mean"]
        p = last_private[site]["privacy"]
        print(f"| {site} | {a:.3f} | {b:.3f} | {b / a:.2f} | {last_private[site]['epsilon']:.3f} | {p['delta']:.0e} | {p['noise_multiplier']:.3f} | {p['steps']:.0f} |")


if __name__ == "__main__":
    main()
