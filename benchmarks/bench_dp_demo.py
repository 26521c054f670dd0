"""Dice of the demo federation with DP-SGD (epsilon per site) beside the same run without DP.

The phantoms are written once (``--data-seed``: the DP settings below were chosen on the seed-0 phantoms,
so a result reported on another seed is on cases the settings never saw). Then, on those same sites and
with the demo's run config, one run without DP (the sites' default batches of 8 slices, ``--local-steps``)
and ``--draws`` DP runs per epsilon of ``--epsilons``: Poisson batches of ``--cases-per-batch`` cases and the
DP-only settings of ``--dp-set`` (e.g. fewer, larger steps, layers left untrained, a larger DP learning
rate: ``dp-local-steps``, ``dp-frozen``, ``dp-slices-per-case``, ``dp-lr-scale``). The DP runs share the run
seed (initial weights, non-DP randomness) and differ only in their noise and sampling, which come from the
OS's entropy: the draws' spread is the noise's. Every DP run is a study of its own (a site's privacy ledger
outlives runs, and a rerun of one study would find its budget spent).

Each run writes ``OUT/<run>/metrics.json``; a run whose file exists is not run again, so an interrupted
benchmark continues where it stopped. Prints a Markdown table of each site's final mean foreground Dice
(mean and range over the draws) and its ratio to the non-DP Dice (target >= 0.9).

    python benchmarks/bench_dp_demo.py --cases 4000 --data-seed 100 --epsilons 4,8 --draws 3 \
        --local-steps 20 --cases-per-batch 256 --dp-set dp-local-steps=10 --dp-set dp-slices-per-case=1 \
        --dp-set dp-frozen=stage4,up_blocks.0.,skips.3. --dp-set dp-lr-scale=4 \
        --set eval-interval=6 --set cross-site-eval=false --out runs/bench_dp_seed100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from federation_runs import ROOT, run_once

DEMO_RUN_CONFIG = tomllib.loads((ROOT / "simulation" / "demo.toml").read_text())


def _pairs(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--epsilons", default="8", help="comma-separated epsilon per site")
    parser.add_argument("--draws", type=int, default=1, help="DP runs per epsilon (independent noise)")
    parser.add_argument("--cases-per-batch", type=int, default=16, help="expected cases per DP batch")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dp"))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override for every run",
    )
    parser.add_argument(
        "--dp-set",
        dest="dp_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override for the DP runs only",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    if not (out / "sites").is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "simulation",
                "demo-sites",
                "--out",
                str(out),
                "--cases",
                str(args.cases),
                "--seed",
                str(args.data_seed),
            ],
            check=True,
            cwd=ROOT,
        )
    sites = sorted((out / "sites").glob("*/*.yaml"))
    common = DEMO_RUN_CONFIG | {"local-steps": args.local_steps} | _pairs(args.overrides)
    plain = run_once(out / "no_dp", sites, common)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    private: dict[float, list[dict]] = {e: [] for e in epsilons}
    for draw in range(1, args.draws + 1):  # draw by draw, so that an interrupted benchmark has every epsilon
        for eps in epsilons:
            dp = (
                common
                | _pairs(args.dp_overrides)
                | {
                    "dp-epsilon": eps,
                    "dp-cases-per-batch": args.cases_per_batch,
                    "study": f"bench-dp-eps{eps:g}-draw{draw}-{time.time_ns()}",
                }
            )
            private[eps].append(run_once(out / f"dp_eps{eps:g}_draw{draw}", sites, dp))
    report(args, plain, private)


def report(args: argparse.Namespace, plain: dict, private: dict[float, list[dict]]) -> None:
    last_plain = plain["rounds"][-1]["sites"]
    print(
        f"Demo phantoms (seed {args.data_seed}), {args.cases} cases per site, {len(plain['rounds'])} rounds x {args.local_steps} local steps; "
        f"DP batches of {args.cases_per_batch} expected cases, DP-only settings {args.dp_overrides or 'none'}. "
        f"Run time {plain['wall_s']:.0f} s without DP; load average {os.getloadavg()[0]:.2f} at the end.\n"
    )
    print(
        "| site | epsilon | draws | Dice without DP | Dice with DP: mean (min - max) | ratio of the mean | epsilon spent | noise multiplier | DP steps | DP run time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for site in sorted(last_plain):
        a = last_plain[site]["dice_mean"]
        for eps, runs in private.items():
            finals = [r["rounds"][-1]["sites"][site] for r in runs]
            dice = [f["dice_mean"] for f in finals]
            mean = sum(dice) / len(dice)
            p = finals[0]["privacy"]
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            print(
                f"| {site} | {eps:g} | {len(dice)} | {a:.3f} | {mean:.3f} ({min(dice):.3f} - {max(dice):.3f}) | {mean / a:.2f} | "
                f"{max(f['epsilon'] for f in finals):.3f} | {p['noise_multiplier']:.3f} | {p['steps']:.0f} | {wall:.0f} |"
            )


if __name__ == "__main__":
    main()
