"""What each site gets from the federation, personalised or not, against training alone.

Per site, on its **test** cases (``split.test_fraction`` of its patients, which neither the rounds nor the
best-checkpoint choice see): local-only, the FedAvg global model, the FedBN-style global model
(``norm-partition=modality``), the global model fine-tuned at the site (``finetune``), FedBN + fine-tuning,
Ditto's personal model, and the centralized baseline; mean and range over ``--seeds`` seeds (phantoms and
run seed). Federations:

- ``demo``: the demo's three sites, one per modality (CT, MRI, US), ``--cases`` phantoms each;
- ``quantity`` / ``dirichlet``: ``--cases`` CT phantoms split into 4 sites by ``simulation split --scheme``
  (``quantity`` gives one small site).

A personal model's scores are those of the model the site keeps: since 5912fb9 a site compares its personal
model with the global one on its validation cases at the end and keeps the better one (``finetune`` and
``ditto`` below are that choice; runs of earlier code reported the personal model as trained).

Per federation and seed, three runs: FedAvg + ``finetune`` with ``--local-only --centralized``;
``norm-partition=modality`` + ``finetune``; ``ditto``. Finished runs are kept (``OUT/<federation>/seed<s>/<run>``),
so an interrupted benchmark continues. Prints a Markdown table per federation and the issue's targets: the
best personalised model >= local-only at every site, and its mean over sites >= 0.97 x centralized.

    python benchmarks/bench_personalization.py --federations demo,quantity --seeds 0,1,2 --out runs/bench_personal
    # the FedAvg run again (e.g. after a change of the personal model), with the baselines of an earlier --out:
    python benchmarks/bench_personalization.py --federations dirichlet --seeds 0,1 --cases 64 --fedavg-only \
        --baselines-from runs/bench_personal --out runs/bench_personal_kept
    # another setting of every run (any run config key):
    python benchmarks/bench_personalization.py --federations dirichlet --seeds 2 --cases 64 --fedavg-only \
        --set choice-margin=0 --baselines-from runs/bench_personal --out runs/bench_personal_margin0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tomllib
from pathlib import Path

from federation_runs import ROOT, make_sites, run_once

from fed_swinumamba.run_config import parse_value

DEMO_RUN_CONFIG = tomllib.loads((ROOT / "simulation" / "demo.toml").read_text())
PERSONALISED = ("finetune", "FedBN + finetune", "ditto")
METHODS = ("local-only", "global", "FedBN global", *PERSONALISED, "centralized")


def scores(
    out: Path, sites: list[Path], config: dict, baselines: Path | None = None, variants: bool = True
) -> dict[str, dict[str, float]]:
    """Method -> site -> mean test Dice, from the three runs of one federation and seed (``variants`` False:
    the FedAvg run only). ``baselines``: an earlier FedAvg run of the same sites whose local-only and
    centralized baselines are taken instead of training them again."""
    flags = () if baselines else ("--local-only", "--centralized")
    plain = run_once(out / "fedavg", sites, {**config, "personalization": "finetune"}, flags)
    trained_alone = json.loads((baselines / "metrics.json").read_text()) if baselines else plain

    def final(metrics, personal=False):
        sites = metrics["final_evaluation"]["global"]["sites"]
        untested = [s for s, v in sites.items() if v["split"] != "test"]
        if untested:
            raise SystemExit(f"{out}: {untested} kept no test case (too few patients): give more --cases")
        return {s: (v["personal"] if personal else v)["dice_mean"] for s, v in sites.items()}

    result = {
        "local-only": {s: v["dice_mean"] for s, v in trained_alone["local_only"][-1]["sites"].items()},
        "global": final(plain),
        "finetune": final(plain, personal=True),
        "centralized": {s: v["dice_mean"] for s, v in trained_alone["centralized"][-1]["sites"].items()},
    }
    if variants:
        fedbn = run_once(out / "fedbn", sites, {**config, "personalization": "finetune", "norm-partition": "modality"})
        ditto = run_once(out / "ditto", sites, {**config, "personalization": "ditto"})
        result |= {
            "FedBN global": final(fedbn),
            "FedBN + finetune": final(fedbn, personal=True),
            "ditto": final(ditto, personal=True),
        }
    return result


def report(federation: str, runs: list[dict[str, dict[str, float]]]) -> str:
    sites = sorted(runs[0]["global"])
    methods = [m for m in METHODS if m in runs[0]]
    personalised = [m for m in PERSONALISED if m in runs[0]]
    lines = [f"### {federation} ({len(runs)} seeds)", "", "| site | " + " | ".join(methods) + " |"]
    lines.append("|---" * (len(methods) + 1) + "|")
    for site in sites:
        cells = []
        for method in methods:
            values = [r[method][site] for r in runs]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})")
        lines.append(f"| {site} | " + " | ".join(cells) + " |")

    def mean_of(method, site):
        return statistics.mean(r[method][site] for r in runs)

    best = {site: max(personalised, key=lambda m: mean_of(m, site)) for site in sites}
    beaten = [s for s in sites if mean_of(best[s], s) < mean_of("local-only", s)]
    overall = {m: statistics.mean(mean_of(m, s) for s in sites) for m in methods}
    top = max(personalised, key=overall.get)
    lines += [
        "",
        f"- best personalised model per site: {', '.join(f'{s} {best[s]}' for s in sites)}; "
        + (f"below local-only at {', '.join(beaten)}" if beaten else "at or above local-only at every site"),
        f"- mean over sites: {top} {overall[top]:.3f} = {overall[top] / overall['centralized']:.3f} x centralized "
        f"({overall['centralized']:.3f}; target >= 0.97)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federations", default="demo,quantity", help="comma-separated: demo, quantity, dirichlet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", type=int, default=16, help="phantom cases per site (demo) or in all (others: x4)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=None, help="default: the demo's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_personal"))
    parser.add_argument(
        "--baselines-from",
        type=Path,
        help="an earlier --out of the same federations and seeds: its local-only and centralized baselines are used",
    )
    parser.add_argument("--fedavg-only", action="store_true", help="skip the FedBN and Ditto runs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a run config key of every run (repeatable)"
    )
    args = parser.parse_args()
    overrides = {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        overrides[key] = parse_value(key, value)
    for federation in args.federations.split(","):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            out = args.out / federation / f"seed{seed}"
            cases = args.cases if federation == "demo" else 4 * args.cases
            sites = make_sites(federation, out / "sites", cases, seed, args.test_fraction)
            config = {**DEMO_RUN_CONFIG, "seed": seed, "cross-site-eval": False}
            config |= ({"num-server-rounds": args.rounds} if args.rounds else {}) | overrides
            baselines = args.baselines_from / federation / f"seed{seed}" / "fedavg" if args.baselines_from else None
            runs.append(scores(out, sites, config, baselines, variants=not args.fedavg_only))
        print(report(federation, runs), flush=True)


if __name__ == "__main__":
    main()
