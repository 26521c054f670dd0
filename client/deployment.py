"""A hospital's side of a deployment: its SuperNode key pair and its SuperNode.

The SuperLink admits only SuperNodes whose public key the coordinator registered (``flwr supernode
register``); the private key never leaves the hospital. Flower accepts NIST elliptic-curve keys in
OpenSSH format, the format ``ssh-keygen -t ecdsa -b 384`` writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fed_swinumamba.deployment import Background, last_lines, start_background, wait_for_output

RUNTIME_PORT = 9094  # Flower's default port of a SuperNode's local Runtime API; one per SuperNode on a machine
JOINED = "SuperNode ID:"  # what a SuperNode logs once the SuperLink admitted it
REFUSED = "Failed to activate SuperNode"  # key not registered, or the SuperLink still counts the node online


class SuperNodeRefused(RuntimeError):
    """The SuperNode exited instead of joining; the message ends with its log."""


def make_site_key(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``folder/NAME`` (private, mode 600) and ``folder/NAME.pub``; never overwrite a key."""
    private, public = folder / name, folder / f"{name}.pub"
    if private.exists() or public.exists():
        raise FileExistsError(
            f"{private} or {public} exists already: a registered key must not be replaced by accident"
        )
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private.touch(mode=0o600)
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return private, public


def node_config(site_config: Path, audit_log: Path | None = None) -> str:
    """The SuperNode's ``--node-config``: where the ClientApp finds the site's YAML (and keeps its audit log)."""
    entries = {"site-config": site_config, "audit-log": audit_log}
    paths = {key: str(path.resolve()) for key, path in entries.items() if path is not None}
    quoted = [p for p in paths.values() if "'" in p]
    if quoted:
        raise ValueError(f"a path given to the SuperNode must not contain a single quote: {quoted[0]}")
    return " ".join(f"{key}='{path}'" for key, path in paths.items())


def supernode_command(
    site_config: Path,
    private_key: Path,
    ca_certificate: Path,
    superlink: str,
    runtime_port: int,
    audit_log: Path | None = None,
) -> list[str]:
    """``flower-supernode`` over TLS (checked against the coordinator's CA), authenticated by its key."""
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(ca_certificate.resolve()),
        "--auth-supernode-private-key", str(private_key.resolve()),
        "--node-config", node_config(site_config, audit_log),
        "--port", str(runtime_port),
    ]  # fmt: skip


def start_supernode(
    site_config: Path,
    private_key: Path,
    ca_certificate: Path,
    superlink: str,
    state_dir: Path,
    runtime_port: int = RUNTIME_PORT,
    audit_log: Path | None = None,
    env: dict | None = None,
) -> Background:
    """Start the SuperNode in the background; log and PID in ``state_dir/supernode-KEYNAME.*``."""
    if not site_config.is_file():  # the SuperNode itself would only find out at the first round
        raise FileNotFoundError(f"no site config at {site_config}")
    command = supernode_command(site_config, private_key, ca_certificate, superlink, runtime_port, audit_log)
    return start_background(command, state_dir, f"supernode-{private_key.name}", env)


def start_and_join(
    start: Callable[[], Background], timeout: float = 120.0, pause: float = 5.0
) -> tuple[Background, bool]:
    """``start()`` a SuperNode and wait until the SuperLink admits it; False: still trying to connect.

    A SuperNode restarted right after a crash is refused while the SuperLink still counts the old
    one online (until it missed two heartbeats, about a minute): a refusal is retried until
    ``timeout``. Any other exit (a certificate the CA did not sign, say) is final.
    """
    deadline = time.monotonic() + timeout
    while True:
        process = start()
        try:
            if wait_for_output(process, JOINED, max(deadline - time.monotonic(), 1.0)):
                return process, True
        except TimeoutError:
            return process, False
        output = process.output()
        if REFUSED not in output or time.monotonic() + pause > deadline:
            hint = (
                "\nThe SuperLink refused the node: is its public key registered (flwr supernode register)?"
                if REFUSED in output
                else ""
            )
            raise SuperNodeRefused(
                f"the SuperNode exited without joining; {process.log_file} ends with:\n{last_lines(output)}{hint}"
            )
        time.sleep(pause)
