"""A site's record of what it sent: one JSON line per reply, for the hospital's own review.

Switched on by the SuperNode's node config ``audit-log`` (``python -m client start --audit-log FILE``).
A line names every record of the reply and what it holds: weight names with dtype and shape (not their
values), the metrics, the config entries, or the error text.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fed_swinumamba.flower_internals import ErrorCode

AUDIT_LOG = "audit-log"
log = logging.getLogger("fed_swinumamba.client")


def describe(content: RecordDict) -> dict:
    """Each record of a message by name: its type and what it holds (arrays: dtype and shape only)."""
    described = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            described[name] = {
                "type": "ArrayRecord",
                "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in record.items()},
            }
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            described[name] = {"type": type(record).__name__, "values": dict(record)}
        else:
            described[name] = {"type": type(record).__name__}
    return described


def audit_replies(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: append a description of the reply to the node's audit log, when it has one.

    A reply that cannot be recorded is not sent (an error without the log's path goes instead): with
    an audit log, nothing leaves the site unrecorded.
    """
    reply = call_next(msg, context)
    if AUDIT_LOG not in context.node_config:
        return reply
    entry = {"time": time.time(), "run_id": context.run_id, "message_type": msg.metadata.message_type}
    entry.update({"error": reply.error.reason} if reply.has_error() else {"content": describe(reply.content)})
    path = Path(str(context.node_config[AUDIT_LOG])).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as audit:
            audit.write(json.dumps(entry, default=str) + "\n")
    except OSError:
        log.exception("could not write the audit log; the reply is withheld")
        return Message(
            error=Error(
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the site could not write its audit log; reply withheld"
            ),
            reply_to=msg,
        )
    return reply
