"""Hospital command line.

python -m client check-site sites/hospital_a.yaml           # before joining a federation
python -m client make-key --site hospital_a                 # the SuperNode's key pair (keys/hospital_a[.pub])
python -m client start --site-config sites/hospital_a.yaml --key keys/hospital_a --ca ca.crt --superlink HOST:8000
"""

import argparse
import sys
from pathlib import Path

from fed_swinumamba.deployment import CONNECTION

from .deployment import RUNTIME_PORT, SuperNodeRefused, make_site_key, start_and_join, start_supernode


def _check_site(args) -> int:
    from fed_swinumamba.data.check import check_site  # loads MONAI: only for this command

    report = check_site(args.config, args.classes.split(",") if args.classes else None)
    print(report.format())
    return 0 if report.ok else 1


def _make_key(args) -> int:
    private, public = make_site_key(args.out, args.site)
    print(f"private key (stays here): {private.resolve()}")
    print(f"public key:               {public.resolve()}")
    print("Send the public key to the coordinator, who registers it (with the path of its copy):")
    print(f"    flwr supernode register {public} {CONNECTION}")
    return 0


def _start(args) -> int:
    def start():
        return start_supernode(
            args.site_config, args.key, args.ca, args.superlink, args.state, args.port, args.audit_log
        )

    try:
        process, joined = start_and_join(start, timeout=args.join_timeout)
    except (SuperNodeRefused, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if joined:
        print(f"SuperNode joined the SuperLink at {args.superlink}.")
    else:
        print(
            f"warning: not connected to {args.superlink} yet; the SuperNode keeps trying in the background",
            file=sys.stderr,
        )
    print(f"SuperNode PID {process.pid} (in {process.pid_file}); log {process.log_file}")
    print(f"Stop it with: kill $(cat {process.pid_file})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "check-site",
        help="load every case with the training pipeline and report counts, shapes, labels, intensities, problems",
    )
    p.add_argument("config")
    p.add_argument(
        "--classes", default=None, help="the federation's class names, comma-separated (default: the site's own)"
    )
    p.set_defaults(handler=_check_site)

    p = sub.add_parser("make-key", help="make this site's SuperNode key pair (EC P-384, OpenSSH format)")
    p.add_argument("--site", required=True, help="a name for the key (the site's name)")
    p.add_argument("--out", type=Path, default=Path("keys"), help="folder for SITE and SITE.pub (default: keys)")
    p.set_defaults(handler=_make_key)

    p = sub.add_parser(
        "start", help="start this site's SuperNode in the background and wait until the SuperLink admits it"
    )
    p.add_argument("--site-config", type=Path, required=True, help="the site's YAML (check it first with check-site)")
    p.add_argument("--key", type=Path, required=True, help="the site's private key (make-key)")
    p.add_argument("--ca", type=Path, required=True, help="the coordinator's CA certificate")
    p.add_argument(
        "--superlink", default="127.0.0.1:8000", help="the SuperLink's address, host:port (default: 127.0.0.1:8000)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=RUNTIME_PORT,
        help=f"this SuperNode's local Runtime API port; each SuperNode on a machine needs its own (default: {RUNTIME_PORT})",
    )
    p.add_argument(
        "--state", type=Path, default=Path("supernodes"), help="folder for the log and PID file (default: supernodes)"
    )
    p.add_argument(
        "--audit-log",
        type=Path,
        default=None,
        help="append a description of every reply this site sends to this file (JSON lines)",
    )
    p.add_argument(
        "--join-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the SuperLink to admit the node (default: 120)",
    )
    p.set_defaults(handler=_start)

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
