"""``flower-superlink`` with a longer SQLite busy timeout: ``python -m server.superlink [its arguments]``.

Flower 1.42's SuperLink registers a message's whole object tree (542 objects for the full-size network)
in one transaction of its SQLite database, and deletes the tree in another once it is delivered. Under
load such a transaction holds the database's single write lock for several seconds, and every other
write (a ServerApp's or SuperNode's poll, the SuperExec's task poll) waits at most Flower's busy timeout
of 5 s, then fails with HTTP 500. Neither the ServerApp's Grid nor the SuperExec retries a 500: the run
fails and the SuperExec exits, so no later run starts. Flower has no flag or environment variable for
the timeout, so this launcher sets it in the pragmas Flower applies to each new connection and then
runs Flower's own entry point unchanged.
"""

from __future__ import annotations

import sys

from flwr.supercore import sql_mixin
from flwr.superlink.cli import flower_superlink

# Below the 30 s after which Flower's HTTP clients stop waiting for an answer: a request that waits
# for the lock still answers its caller.
BUSY_TIMEOUT_MS = 25_000


def set_busy_timeout(milliseconds: int) -> None:
    """Make every SQLite connection the SuperLink opens from now on wait ``milliseconds`` for a lock."""
    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in pragmas:
        raise RuntimeError(
            "flwr.supercore.sql_mixin.SQLITE_PRAGMAS no longer sets busy_timeout: check server/superlink.py against this Flower"
        )
    sql_mixin.SQLITE_PRAGMAS = tuple({**pragmas, "busy_timeout": str(milliseconds)}.items())


if __name__ == "__main__":
    set_busy_timeout(BUSY_TIMEOUT_MS)
    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())
