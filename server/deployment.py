"""The coordinator's side of a deployment: TLS certificates, the SuperLink, the flwr CLI's connection, runs.

The SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (its own ServerApp process) on one port, all over TLS with one server
certificate. Hospitals hold only the CA certificate, to check that they talk to this coordinator.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fed_swinumamba.deployment import CONNECTION, Background, descendants, last_lines, start_background, wait_for_output
from fed_swinumamba.flower_internals import SuperLinkConnection, get_flwr_home, write_superlink_connection

ACTIVE_RUN_STATUSES = ("pending", "starting", "running")
START_TIMEOUT = 120.0  # seconds a run may stay pending: the SuperExec takes it within seconds
SUPERLINK_PORT = 8000  # Flower's default
# The SuperLink's own ServerApp process reaches it on the loopback address, so the server certificate
# always names it, besides the names the hospitals use.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Certificates:
    """The files of ``make_ca``: the CA (its key stays on the coordinator) and the SuperLink's pair."""

    folder: Path

    @property
    def ca_certificate(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


def make_ca(folder: Path, hosts: Sequence[str] = (), days: int = 825) -> Certificates:
    """A new CA and a server certificate it signs, valid for ``hosts`` and the loopback names.

    ``hosts`` are the DNS names or IP addresses under which hospitals reach the coordinator.
    """
    certs = Certificates(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-swinumamba coordinator CA")])
    ca_cert = (
        _certificate(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    server_cert = (
        _certificate(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_name, server_key.public_key(), now, days
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_key(certs.ca_key, ca_key)
    _write_key(certs.server_key, server_key)
    certs.ca_certificate.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_certificate.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def superlink_command(certs: Certificates, database: Path, host: str, port: int) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, persistent state, no runtime installs.

    It runs through ``server.superlink``, which gives its database a longer busy timeout than Flower's.
    """
    return [
        sys.executable, "-m", "server.superlink",
        "--ssl-ca-certfile", str(certs.ca_certificate.resolve()),
        "--ssl-certfile", str(certs.server_certificate.resolve()),
        "--ssl-keyfile", str(certs.server_key.resolve()),
        "--enable-supernode-auth",
        "--database", str(database.resolve()),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def start_superlink(
    certs: Certificates, state_dir: Path, host: str = "127.0.0.1", port: int = SUPERLINK_PORT, env: dict | None = None
) -> Background:
    """Start the SuperLink in the background (database, log and PID in ``state_dir``); return once it listens.

    Registered SuperNodes and past runs live in ``state_dir/superlink.db``: a restarted SuperLink
    still knows its hospitals.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    process = start_background(
        superlink_command(certs, state_dir / "superlink.db", host, port), state_dir, "superlink", env
    )
    if not wait_for_output(process, "Uvicorn running on", timeout=120):
        raise RuntimeError(f"the SuperLink exited; {process.log_file} ends with:\n{last_lines(process.output())}")
    return process


def superexec_pids(superlink_pid: int) -> list[int]:
    """The SuperExec that a SuperLink started, the process that starts its runs' ServerApps ([] once it exited)."""
    pids = []
    for pid in descendants(superlink_pid):
        try:
            if b"flower-superexec" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:  # exited meanwhile
            continue
    return pids


def write_connection(address: str, ca_certificate: Path, name: str = CONNECTION) -> Path:
    """Add (or replace) SuperLink connection ``name`` in the flwr CLI's config.toml (under $FLWR_HOME)."""
    write_superlink_connection(
        SuperLinkConnection(name=name, address=address, root_certificates=str(ca_certificate.resolve()))
    )
    return get_flwr_home() / "config.toml"


def loopback_address(host: str, port: int) -> str:
    """Where this machine reaches a SuperLink bound to ``host``: a bind-all address means the loopback one."""
    return f"{ {'0.0.0.0': '127.0.0.1', '::': '[::1]'}.get(host, host) }:{port}"


def _flwr_json(*args: str) -> tuple[dict | None, str]:
    """``flwr ARGS --format json``: its answer if it succeeded (else None), and its whole output.

    In JSON mode the flwr CLI reports an error (the SuperLink unreachable, an HTTP 500) as
    ``"success": false`` and still exits with status 0.
    """
    done = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {}
    return (answer if done.returncode == 0 and answer.get("success") else None), done.stdout + done.stderr


def submit_run(app: Path, connection: str = CONNECTION, run_config: Sequence[str] = ()) -> int:
    """``flwr run APP CONNECTION``: the SuperLink builds a run from the app; returns its run ID."""
    answer, output = _flwr_json(
        "run", str(app), connection, *[arg for value in run_config for arg in ("--run-config", value)]
    )
    if answer is None:
        raise RuntimeError(f"flwr run failed:\n{output}")
    return int(answer["run-id"])


def run_status(run_id: int, connection: str = CONNECTION) -> str:
    """The run's status as ``flwr ls`` reports it, e.g. ``running`` or ``finished:completed``; ``unknown``
    when the SuperLink does not answer."""
    answer, _ = _flwr_json("ls", connection, "--run-id", str(run_id))
    return answer["runs"][0]["status"] if answer else "unknown"


def wait_until_started(
    run_id: int, connection: str = CONNECTION, timeout: float = START_TIMEOUT, poll: float = 2.0
) -> str:
    """The run's status once it is no longer pending; RuntimeError once it has been pending ``timeout`` s.

    The SuperLink's SuperExec starts a pending run's ServerApp within seconds, but Flower 1.42's SuperExec
    exits for good after a failed request, and then runs stay pending without a word. Such a run is
    stopped here, so that a restarted SuperLink does not start it beside its rerun.
    """
    deadline = time.monotonic() + timeout
    while (status := run_status(run_id, connection)) in ("pending", "unknown"):
        if time.monotonic() > deadline:
            stopped = subprocess.run(["flwr", "stop", str(run_id), connection], capture_output=True).returncode == 0
            cause = (
                "the SuperLink does not answer"
                if status == "unknown"
                else "the SuperLink's SuperExec, which starts ServerApps, is not running"
            )
            raise RuntimeError(
                f"run {run_id} is still {status} after {timeout:.0f} s: {cause}. "
                + (f"Run {run_id} was stopped. " if stopped else f"Stop it with: flwr stop {run_id} {connection}. ")
                + "Restart the SuperLink (kill it by its PID, then the same `server start` command) and run again; "
                "resume=true in the run config continues an interrupted run's rounds."
            )
        time.sleep(poll)
    return status


def follow_run(
    run_id: int,
    connection: str = CONNECTION,
    poll: float = 5.0,
    patience: int = 3,
    start_timeout: float = START_TIMEOUT,
) -> str:
    """Print the run's log as it comes; return its final status (``unknown``: the SuperLink is gone).

    The log stream can end before the run does (the SuperLink's database busy under load), so the
    run's status decides when it is over; ``patience`` failed status queries in a row mean it is gone.
    A run that never leaves ``pending`` raises RuntimeError (``wait_until_started``).
    """
    wait_until_started(run_id, connection, start_timeout)
    subprocess.run(["flwr", "log", str(run_id), connection, "--stream"])
    failures = 0
    while (status := run_status(run_id, connection)) in ACTIVE_RUN_STATUSES or (
        status == "unknown" and failures < patience
    ):
        failures = failures + 1 if status == "unknown" else 0
        time.sleep(poll)
    return status
