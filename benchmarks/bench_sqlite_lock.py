"""How long Flower's SQLite object store holds the database's write lock for a full-size message.

The SuperLink keeps messages in its database as object trees (a message, its records, each array and
each array's chunks of at most 5 MB). This replays, on Flower 1.42's ``SqlObjectStore`` in a fresh
database file, what the SuperLink does with a CT site's share of the full-size network (ModelConfig
defaults, float32): ``preregister`` the tree (one transaction, when the message is pushed), ``put``
each object (one transaction each), ``delete`` the tree (one transaction, once the receiver confirms
it). Another connection meanwhile takes the write lock every 50 ms; its longest wait is how long a
SuperLink request waits behind each step (Flower's busy timeout gives up after 5 s).

    python benchmarks/bench_sqlite_lock.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_large_message import ROOT, _full_size_shapes, _probe_write_lock
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.supercore.task_identity import TaskIdentity


def _full_size_message() -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a message needs its app's identity
    rng = np.random.default_rng(0)
    record = ArrayRecord()
    for name, shape in _full_size_shapes().items():
        record[name] = Array(rng.standard_normal(shape, dtype=np.float32))
    return Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    message = _full_size_message()
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    tree = get_object_tree(message)
    work = Path(tempfile.mkdtemp(prefix="bench-sqlite-lock-"))
    database = work / "state.db"
    store = SqlObjectStore(str(database))
    store.initialize()
    waits: list[float] = []
    done = threading.Event()
    threading.Thread(target=_probe_write_lock, args=(database, waits, done, 0.05), daemon=True).start()
    print(
        f"{len(contents)} objects, {sum(map(len, contents.values())) / 2**20:.0f} MiB; load average (1 min) {os.getloadavg()[0]:.1f}\n"
    )
    print("| step | transactions | seconds | longest wait of another writer |")
    print("|---|---|---|---|")
    steps = (
        ("preregister the tree", 1, lambda: store.preregister(1, tree)),
        (
            "put each object",
            len(contents),
            lambda: [store.put(object_id, content) for object_id, content in contents.items()],
        ),
        ("delete the tree", 1, lambda: store.delete(message.object_id)),
    )
    for name, transactions, step in steps:
        time.sleep(0.2)
        first = len(waits)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        time.sleep(0.2)
        print(f"| {name} | {transactions} | {seconds:.2f} | {max(waits[first:]):.2f} s |")
    done.set()
    print(f"\nload average (1 min) after: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
