"""Coordinator command line.

    python -m server report OUT      # (re)write OUT/report.html and its plots from OUT/metrics.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="write OUT/report.html and PNG plots from OUT/metrics.json")
    p.add_argument("out", type=Path, help="a run's output folder")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
