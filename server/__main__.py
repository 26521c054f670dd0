"""Coordinator command line.

python -m server make-ca --out certs [--host coordinator.example.org]   # CA + SuperLink certificate
python -m server start --certs certs --state coordinator                # SuperLink: TLS, SuperNode auth, database
python -m server run --superlink 127.0.0.1:8000 --ca certs/ca.crt --run-config "num-server-rounds=6"
python -m server report OUT      # (re)write OUT/report.html and its plots from OUT/metrics.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fed_swinumamba.deployment import CONNECTION

from .deployment import (
    START_TIMEOUT,
    SUPERLINK_PORT,
    Certificates,
    follow_run,
    loopback_address,
    make_ca,
    start_superlink,
    submit_run,
    write_connection,
)
from .report import write_report


def _make_ca(args) -> int:
    certs = make_ca(args.out, args.host)
    print(f"CA certificate (give it to every hospital): {certs.ca_certificate.resolve()}")
    print(f"CA key (keep it here, offline if you can):  {certs.ca_key.resolve()}")
    print(
        f"SuperLink certificate and key:              {certs.server_certificate.resolve()}, {certs.server_key.resolve()}"
    )
    return 0


def _start(args) -> int:
    process = start_superlink(Certificates(args.certs), args.state, args.host, args.port)
    config = write_connection(
        loopback_address(args.host, args.port), Certificates(args.certs).ca_certificate, args.connection
    )
    print(
        f"SuperLink running, PID {process.pid} (in {process.pid_file}); log {process.log_file}; state {args.state / 'superlink.db'}"
    )
    print(f"Connection '{args.connection}' written to {config}. Register each hospital's public key:")
    print(f"    flwr supernode register HOSPITAL.pub {args.connection}")
    print(f"Stop it with: kill $(cat {process.pid_file})")
    return 0


def _run(args) -> int:
    config = write_connection(args.superlink, args.ca, args.connection)
    print(f"Connection '{args.connection}' ({args.superlink}) written to {config}")
    run_id = submit_run(args.app, args.connection, args.run_config)
    print(
        f"Run {run_id} started; following its log (it goes on if you stop following: flwr log {run_id} {args.connection})",
        flush=True,
    )
    status = follow_run(run_id, args.connection, start_timeout=args.start_timeout)
    print(f"Run {run_id}: {status}")
    return 0 if status == "finished:completed" else 1


def _report(args) -> int:
    print(write_report(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-ca", help="make a CA and the SuperLink's TLS certificate signed by it")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("certs"),
        help="folder for ca.crt, ca.key, server.pem, server.key (default: certs)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the hospitals use to reach the coordinator (repeatable; localhost and 127.0.0.1 are always in)",
    )
    p.set_defaults(handler=_make_ca)

    p = sub.add_parser(
        "start", help="start the SuperLink in the background: TLS, SuperNode authentication, persistent state"
    )
    p.add_argument("--certs", type=Path, default=Path("certs"), help="the folder make-ca wrote (default: certs)")
    p.add_argument(
        "--state",
        type=Path,
        default=Path("coordinator"),
        help="folder for the SuperLink's database, log and PID file (default: coordinator)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for hospitals on other machines (default: 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=SUPERLINK_PORT,
        help=f"the one port of the Fleet, Control and Runtime APIs (default: {SUPERLINK_PORT})",
    )
    p.add_argument(
        "--connection", default=CONNECTION, help=f"name of the flwr CLI connection to write (default: {CONNECTION})"
    )
    p.set_defaults(handler=_start)

    p = sub.add_parser("run", help="run the federation on the SuperLink (flwr run) and follow it to the end")
    p.add_argument("app", nargs="?", type=Path, default=Path("."), help="the Flower app folder (default: .)")
    p.add_argument(
        "--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}", help="the SuperLink's address as this machine reaches it"
    )
    p.add_argument(
        "--ca",
        type=Path,
        default=Path("certs/ca.crt"),
        help="the CA certificate that signed the SuperLink's (default: certs/ca.crt)",
    )
    p.add_argument(
        "--connection",
        default=CONNECTION,
        help=f"name of the flwr CLI connection to write and use (default: {CONNECTION})",
    )
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="run config overrides, 'key=value ...' or a TOML file (repeatable)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT,
        help=f"seconds the run may stay pending before it is stopped as never started (default: {START_TIMEOUT:.0f})",
    )
    p.set_defaults(handler=_run)

    p = sub.add_parser("report", help="write OUT/report.html and PNG plots from OUT/metrics.json")
    p.add_argument("out", type=Path, help="a run's output folder")
    p.set_defaults(handler=_report)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
