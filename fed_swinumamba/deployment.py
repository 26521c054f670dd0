"""Background Flower processes for a deployment: started with a log and a PID file, stopped by PID.

The coordinator's SuperLink and each hospital's SuperNode run for days; the command lines in
``server/`` and ``client/`` start them here so that a person finds their PID and log in one folder
and can stop them with ``kill $(cat NAME.pid)``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The name of the SuperLink connection in the flwr CLI's config.toml: the coordinator's commands write
# it, and a hospital's make-key prints the registration command that uses it.
CONNECTION = "fed-swinumamba"


@dataclass(frozen=True)
class Background:
    """A started process: its PID, its PID file and its log (appended to by every start)."""

    pid: int
    pid_file: Path
    log_file: Path
    log_start: int  # the log's size when this process started: what follows is its own output

    def output(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")


def start_background(command: list[str], state_dir: Path, name: str, env: dict | None = None) -> Background:
    """Start ``command`` in its own session (closing the terminal does not stop it), output appended to
    ``state_dir/NAME.log``, PID written to ``state_dir/NAME.pid``.

    Flower's runtime dependency installation stays off: a hospital runs the code it installed.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file, pid_file = state_dir / f"{name}.log", state_dir / f"{name}.pid"
    env = {**os.environ, **(env or {}), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    with log_file.open("ab") as log:
        start = log.tell()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    pid_file.write_text(f"{process.pid}\n")
    return Background(process.pid, pid_file, log_file, start)


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_for_output(process: Background, marker: str, timeout: float) -> bool:
    """True once ``marker`` is in the process's output; False if it exits first; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = is_running(process.pid)
        if marker in process.output():
            return True
        if not running:
            return False
        time.sleep(0.5)
    raise TimeoutError(f"process {process.pid} did not write {marker!r} within {timeout:.0f} s; see {process.log_file}")


def last_lines(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for SuperNodes sharing a machine, and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: Flower's SuperExec and the app processes it started."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [d for child in children for d in (child, *descendants(child))]


def stop(pid: int, timeout: float = 15.0, signals: Sequence[int] = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop ``pid`` and the processes it started: each signal in turn until all have exited.

    SIGTERM lets a SuperNode tell the SuperLink it leaves; ``signals=(SIGKILL,)`` is a crash.
    """
    family = [pid, *descendants(pid)]
    for sig in signals:
        for member in family:
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(map(is_running, family)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(map(is_running, family)):
            return
