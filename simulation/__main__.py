"""Command line for local multi-site simulation.

python -m simulation demo                      # phantoms for 3 sites + the federated demo run
python -m simulation demo-data --out DIR [--ct-dicom]   # write CT, MRI and ultrasound phantom datasets
python -m simulation demo-sites --out DIR      # the same as three sites with their YAMLs (for SuperNodes)
python -m simulation split --data DIR --modality M --sites N --out DIR [--scheme iid|dirichlet|quantity]
python -m simulation run --sites DIR_OR_YAMLS --rounds R --out OUT [--centralized] [--local-only] [--dp-epsilon E]
                         [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path

from fed_swinumamba.data import load_site_config
from fed_swinumamba.run_config import parse_value
from fed_swinumamba.simulated import DEMO_MODALITIES, generate_phantoms, make_demo_sites, split_dataset
from server.report import aligned_text, gain_rows, write_report

from .runner import run_baseline, run_federated_simulation

DEMO_RUN_CONFIG = tomllib.loads((Path(__file__).parent / "demo.toml").read_text())


def _site_yamls(spec: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in spec:
        p = Path(item)
        paths.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    if not paths:
        raise SystemExit(f"no site YAML found in {spec}")
    for p in paths:
        load_site_config(p)  # fail here, with the file named, rather than inside a virtual node
    return paths


def _labels(text: str) -> dict[int, str]:
    try:
        return {
            int(value): name.strip() for value, name in (pair.split("=", 1) for pair in text.split(",") if pair.strip())
        }
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected value=name pairs such as 1=organ,2=lesion, got {text!r}") from None


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = parse_value(key.strip(), value)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    return out


def _baseline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--centralized",
        action="store_true",
        help="also train one model on the union of the sites' data with the same budget (the pooled baseline)",
    )
    p.add_argument(
        "--local-only",
        action="store_true",
        help="also train each site alone on its own data with the same budget (what a site gets without the federation)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the 3-site demo (CT, MRI, US phantoms) and run the federation on it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--cases", type=int, default=16, help="phantom cases per site")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms (other seeds: other cases)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _baseline_flags(p)
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        metavar="E",
        help="DP-SGD at every site, total budget E per site over the run",
    )

    p = sub.add_parser("demo-data", help="write CT, MRI and ultrasound phantom datasets")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ct-dicom", action="store_true", help="write the CT images as DICOM series folders (labels stay NIfTI)"
    )

    p = sub.add_parser(
        "demo-sites",
        help="write the demo's three phantom sites (CT, MRI, ultrasound) with their site YAMLs, for SuperNodes",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms (other seeds: other cases)")

    p = sub.add_parser("split", help="partition a dataset by patient into N site folders with their site YAMLs")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--modality", choices=DEMO_MODALITIES, required=True)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--scheme", choices=("iid", "dirichlet", "quantity"), default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--labels",
        type=_labels,
        help="label value=class name pairs, e.g. 1=organ,2=lesion (default: the dataset.json's labels)",
    )

    p = sub.add_parser("run", help="run the sites as virtual SuperNodes on Flower's simulation engine")
    p.add_argument("--sites", nargs="+", required=True, help="a folder of site YAMLs, or YAML files")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set strategy=fedprox",
    )
    _baseline_flags(p)
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        metavar="E",
        help="DP-SGD at every site, total budget E per site over the run",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "demo-data":
        for i, modality in enumerate(DEMO_MODALITIES):
            print(
                generate_phantoms(
                    args.out / modality,
                    modality,
                    num_cases=args.cases,
                    seed=args.seed + i,
                    dicom=args.ct_dicom and modality == "ct",
                )
            )
        return 0
    if args.command == "demo-sites":
        for path in make_demo_sites(args.out, num_cases=args.cases, seed=args.seed):
            print(path)
        return 0
    if args.command == "split":
        for path in split_dataset(
            args.data, args.modality, args.sites, args.scheme, args.seed, args.out, labels=args.labels
        ):
            print(path)
        return 0
    overrides = {}
    if args.command == "demo":
        sites = make_demo_sites(args.out, num_cases=args.cases, seed=args.data_seed)
        overrides.update(DEMO_RUN_CONFIG)
    else:
        sites = _site_yamls(args.sites)
    overrides.update(_overrides(args.overrides))
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.dp_epsilon is not None:
        overrides["dp-epsilon"] = args.dp_epsilon
    baselines = [kind for kind, asked in (("local_only", args.local_only), ("centralized", args.centralized)) if asked]
    if baselines and overrides.get("initial-checkpoint"):
        parser.error("the baselines train from scratch or ImageNet, never from initial-checkpoint: run them apart")
    metrics = run_federated_simulation(sites, args.out, overrides)
    for kind in baselines:
        metrics[kind] = run_baseline(kind, sites, args.out, overrides)
    if baselines:
        write_report(args.out)  # again, with the baselines beside the federated curves
    if metrics["rounds"]:
        print(aligned_text(*gain_rows(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
