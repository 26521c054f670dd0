"""A site's record of what it sent: one JSON line per reply, for the hospital's own review.

Switched on by the SuperNode's node config ``audit-log`` (``python -m client start --audit-log FILE``).
A line names every record of the reply and what it holds: weight names with dtype and shape (not their
values), the metrics, the config entries, or the error text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

AUDIT_LOG = "audit-log"


def describe(content: RecordDict) -> dict:
    """Each record of a message by name: its type and what it holds (arrays: dtype and shape only)."""
    described = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            described[name] = {"type": "ArrayRecord", "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in record.items()}}
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            described[name] = {"type": type(record).__name__, "values": dict(record)}
        else:
            described[name] = {"type": type(record).__name__}
    return described


def audit_replies(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: append a description of the reply to the node's audit log, when it has one."""
    reply = call_next(msg, context)
    if AUDIT_LOG in context.node_config:
        entry = {"time": time.time(), "run_id": context.run_id, "message_type": msg.metadata.message_type}
        entry.update({"error": reply.error.reason} if reply.has_error() else {"content": describe(reply.content)})
        with Path(str(context.node_config[AUDIT_LOG])).expanduser().open("a") as log:
            log.write(json.dumps(entry, default=str) + "\n")
    return reply
