"""A full-size Swin-UMamba update between a SuperNode and the SuperLink over TLS on loopback.

Starts a SuperLink as ``python -m server start`` does (TLS, SuperNode authentication, database) and one
authenticated SuperNode, then runs a small Flower app (this file, copied into a temporary app folder)
whose ServerApp sends a CT site's share of the full-size network (ModelConfig defaults: the shared
weights plus the CT encoder, float32) to the node and whose ClientApp sends it straight back: one round
trip = the global model down plus an update of the same size up. An empty message's round trip (the
fixed cost: polling, a fresh ClientApp process) is measured beside it. With ``--compression``, a third
message: the same tensors as a change compressed as the federation compresses it
(``fed_swinumamba.compression``), which the ClientApp decodes and compresses again as its update; the
round trip includes both sides' compression and decompression.

Reported per round trip: wall seconds seen by the ServerApp, and peak RSS of the SuperLink, the
SuperNode, the ClientApp process and the ServerApp (peaks reset before each round trip through
/proc/PID/clear_refs), plus the machine's load average. With the database: the longest time a writer
waited for its write lock (probed every half second from outside) and whether the SuperLink's SuperExec
outlived the run.

    python benchmarks/bench_large_message.py --repeats 3              # as deployed: SuperLink state in SQLite
    python benchmarks/bench_large_message.py --repeats 3 --in-memory  # for comparison: no database
    python benchmarks/bench_large_message.py --repeats 3 --compression int8,int8+topk  # also the packets
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = """[project]
name = "bench-large-message"
version = "0.1.0"
description = "echo a full-size update"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fed-swinumamba"

[tool.flwr.app.components]
serverapp = "bench_large_message:server_app"
clientapp = "bench_large_message:client_app"

[tool.flwr.app.config]
shapes = ""
result = ""
pids = ""
repeats = 3
compression = ""
block = 256
"""

server_app = ServerApp()
client_app = ClientApp()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def _packet_content(changes: dict, options) -> RecordDict:
    from fed_swinumamba.compression import compress

    packet = compress(changes, options)
    arrays = ArrayRecord({k: Array(v) for k, v in packet.arrays().items()})
    return RecordDict(
        {"arrays": arrays, "compressed": ConfigRecord({"names": list(packet.names), "method": options.method})}
    )


def _unpacked(content: RecordDict, shapes: dict, block: int) -> dict:
    from fed_swinumamba.compression import Packet, decompress

    packet = Packet.from_arrays(content["compressed"]["names"], {k: a.numpy() for k, a in content["arrays"].items()})
    return decompress(packet, shapes, block)


def _options(config, method: str):
    from fed_swinumamba.compression import CompressionOptions

    return CompressionOptions(method, int(config["block"]))


@client_app.train()
def echo(msg: Message, context: Context) -> Message:
    """Send the arrays back (a packet: decoded, then compressed again), with this ClientApp process's peak RSS."""
    if "compressed" in msg.content:
        shapes = json.loads(Path(str(context.run_config["shapes"])).read_text())
        options = _options(context.run_config, str(msg.content["compressed"]["method"]))
        content = _packet_content(_unpacked(msg.content, shapes, options.block), options)
    else:
        content = RecordDict({"arrays": msg.content["arrays"]})
    content["metrics"] = MetricRecord({"peak-rss-mib": _peak_mib()})
    return Message(content=content, reply_to=msg)


def _round_trip(grid: Grid, node: int, arrays: dict, pids: dict[str, int], options=None, shapes=None) -> dict:
    """One round trip of ``arrays`` (as a packet with ``options``), timed from building the message to
    having the reply's arrays (decoded, for a packet)."""
    for pid in pids.values():
        _reset_peak(pid)
    start = time.perf_counter()
    if options is None:
        content = RecordDict({"arrays": ArrayRecord({name: Array(array) for name, array in arrays.items()})})
    else:
        content = _packet_content(arrays, options)
    (message_id,) = grid.push_messages([Message(content, dst_node_id=node, message_type=MessageType.TRAIN)])
    while not (replies := list(grid.pull_messages([message_id]))):
        time.sleep(0.05)
    (reply,) = replies
    assert not reply.has_error(), reply.error.reason
    if options is None:
        back = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    else:
        back = _unpacked(reply.content, shapes, options.block)
    seconds = time.perf_counter() - start
    assert set(back) == set(arrays) and all(back[k].shape == v.shape for k, v in arrays.items())
    peaks = {name: _peak_rss_mib(pid) for name, pid in pids.items()}
    return {
        "seconds": seconds,
        "bytes_each_way": [_nbytes(content["arrays"]), _nbytes(reply.content["arrays"])],
        "peak_rss_mib": {
            **peaks,
            "clientapp": float(reply.content["metrics"]["peak-rss-mib"]),
            "serverapp": _peak_mib(),
        },
    }


def _nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


@server_app.main()
def measure(grid: Grid, context: Context) -> None:
    config = context.run_config
    shapes = json.loads(Path(str(config["shapes"])).read_text())
    rng = np.random.default_rng(0)
    full = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    pids = json.loads(str(config["pids"]))
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.5)
    results = {"load_before": os.getloadavg(), "empty": [], "full": []}
    messages = [("empty", {}, None), ("full", full, None)]
    for method in filter(None, str(config["compression"]).split(",")):
        messages.append((method, full, _options(config, method)))
        results[method] = []
    for _ in range(int(config["repeats"])):
        for name, arrays, options in messages:
            try:
                results[name].append(_round_trip(grid, nodes[0], arrays, pids, options, shapes))
            except Exception as err:  # a failed round trip is a result too (the SuperLink's database busy, say)
                results[name].append({"error": f"{type(err).__name__}: {err}"})
            results["load_after"] = os.getloadavg()
            Path(str(config["result"])).write_text(json.dumps(results, indent=1))  # after each: a crash keeps the rest


# ------------------------------------------------------------------------------------------- driver
# The project is imported by the driver only: the ServerApp and ClientApp above need Flower and NumPy.
def _full_size_shapes() -> dict[str, list[int]]:
    from fed_swinumamba.model import ModelConfig, build_model
    from fed_swinumamba.params import select

    state = select(build_model(ModelConfig()).state_dict(), modalities=["ct"])
    return {name: list(t.shape) for name, t in state.items()}


def _deploy(work: Path, in_memory: bool):
    """SuperLink and one registered SuperNode, started as the project's deployment commands start them
    (``in_memory``: the SuperLink without its database, for comparison)."""
    from client.deployment import make_site_key, start_and_join, start_supernode
    from fed_swinumamba.deployment import CONNECTION, free_port, start_background, wait_for_output
    from server.deployment import loopback_address, make_ca, superlink_command, write_connection

    port = free_port()
    certs = make_ca(work / "certs")
    command = superlink_command(certs, work / "superlink.db", "127.0.0.1", port)
    if in_memory:
        at = command.index("--database")
        del command[at : at + 2]
    superlink = start_background(command, work / "coordinator", "superlink")
    wait_for_output(superlink, "Uvicorn running on", timeout=120)
    write_connection(loopback_address("127.0.0.1", port), certs.ca_certificate)
    _, public = make_site_key(work / "keys", "bench_site")
    subprocess.run(["flwr", "supernode", "register", str(public), CONNECTION], check=True, capture_output=True)
    site = work / "site.yaml"  # the SuperNode needs one; the echo ClientApp reads no data
    site.write_text("site: bench_site\nmodality: ct\n")
    node, _ = start_and_join(
        lambda: start_supernode(
            site,
            work / "keys" / "bench_site",
            certs.ca_certificate,
            f"127.0.0.1:{port}",
            work / "supernodes",
            free_port(),
        )
    )
    return superlink, node


def _probe_write_lock(database: Path, waits: list[float], done: threading.Event, interval: float = 0.5) -> None:
    """Take the database's write lock every ``interval`` seconds; record how long each take waited.

    The longest wait is the longest a SuperLink request waited for it: Flower's own busy timeout gives
    up after 5 s, ``server.superlink``'s after 25 s.
    """
    connection = sqlite3.connect(database, isolation_level=None, timeout=600)
    while not done.wait(interval):
        start = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("COMMIT")
        waits.append(time.perf_counter() - start)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--in-memory", action="store_true", help="run the SuperLink without its database (the deployment uses one)"
    )
    parser.add_argument(
        "--compression",
        default="",
        help="also compressed messages of the same tensors: int8, int8+topk or both (comma-separated)",
    )
    parser.add_argument("--block", type=int, default=256, help="elements per int8 scale (the run config's default)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fed_swinumamba.deployment import CONNECTION, stop
    from server.deployment import follow_run, submit_run, superexec_pids

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-large-message-"))
    os.environ["FLWR_HOME"] = str(work / "flwr-home")  # the flwr CLI's connection for this benchmark only
    os.environ["PYTHONPATH"] = str(ROOT)
    app = work / "app"
    app.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, app / "bench_large_message.py")
    (app / "pyproject.toml").write_text(PYPROJECT)
    shapes = _full_size_shapes()
    (work / "shapes.json").write_text(json.dumps(shapes))
    superlink, node = _deploy(work, args.in_memory)
    lock_waits: list[float] = []
    probed = threading.Event()
    if not args.in_memory:
        threading.Thread(
            target=_probe_write_lock, args=(work / "superlink.db", lock_waits, probed), daemon=True
        ).start()
    try:
        pids = json.dumps({"superlink": superlink.pid, "supernode": node.pid})
        config = f"shapes='{work / 'shapes.json'}' result='{work / 'result.json'}' pids='{pids}' repeats={args.repeats}"
        config += f" compression='{args.compression}' block={args.block}"
        status = follow_run(submit_run(app, CONNECTION, [config]))
        probed.set()
        print(f"benchmark run: {status}; SuperLink log {superlink.log_file}")
        _report(json.loads((work / "result.json").read_text()), shapes, not args.in_memory)
        if lock_waits:
            print(
                f"\nlongest wait for the database's write lock: {max(lock_waits):.2f} s ({len(lock_waits)} probes); "
                f"SuperExec {'still running' if superexec_pids(superlink.pid) else 'gone'} after the run"
            )
    finally:
        probed.set()
        stop(node.pid)
        stop(superlink.pid)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _report(results: dict, shapes: dict, database: bool) -> None:
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    print(
        f"\n{parameters / 1e6:.2f} M parameters ({len(shapes)} tensors, {parameters * 4 / 2**20:.0f} MiB float32) each way; "
        f"SuperLink state {'in its SQLite database' if database else 'in memory'}; "
        f"load average (1 min) {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after\n"
    )
    print(
        "| message | MiB each way | round trips ok | round trip (s), median [min-max] | SuperLink peak RSS | SuperNode peak RSS | ClientApp peak RSS | ServerApp peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in (k for k in results if k not in ("load_before", "load_after")):
        runs = [r for r in results[name] if "error" not in r]
        size = (
            f"{runs[0]['bytes_each_way'][0] / 2**20:.1f} / {runs[0]['bytes_each_way'][1] / 2**20:.1f}" if runs else "-"
        )
        print(
            f"| {name} | {size} | {len(runs)} of {len(results[name])} | "
            + (_timing_and_memory(runs) if runs else "- | - | - | - | - |")
        )
        for failure in (r["error"] for r in results[name] if "error" in r):
            print(f"|   failed: {failure[:200]} |")


def _timing_and_memory(runs: list[dict]) -> str:
    seconds = sorted(r["seconds"] for r in runs)
    peak = {k: max(r["peak_rss_mib"][k] for r in runs) for k in runs[0]["peak_rss_mib"]}
    return (
        f"{np.median(seconds):.2f} [{seconds[0]:.2f}-{seconds[-1]:.2f}] | {peak['superlink']:.0f} MiB | {peak['supernode']:.0f} MiB | "
        f"{peak['clientapp']:.0f} MiB | {peak['serverapp']:.0f} MiB |"
    )


if __name__ == "__main__":
    main()
