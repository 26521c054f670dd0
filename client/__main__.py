"""Site tools: ``python -m client check-site sites/hospital_a.yaml`` before joining a federation."""

import argparse
import sys

from fed_swinumamba.data.check import check_site


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-site", help="load every case with the training pipeline and report counts, shapes, labels, intensities, problems")
    p.add_argument("config")
    p.add_argument("--classes", default=None, help="the federation's class names, comma-separated (default: the site's own)")
    args = parser.parse_args(argv)
    report = check_site(args.config, args.classes.split(",") if args.classes else None)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
