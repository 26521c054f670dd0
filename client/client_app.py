"""Flower ClientApp run by each hospital's SuperNode: train and evaluate on the site's own data."""

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fed_swinumamba.flower_internals import ErrorCode
from fed_swinumamba.logs import enable_console_logging
from fed_swinumamba.protocol import redact_paths

from .audit import audit_replies
from .site import SiteRound, identify

app = ClientApp(mods=[audit_replies])
log = logging.getLogger("fed_swinumamba.client")
enable_console_logging()


def _reply(msg: Message, work: Callable[[], RecordDict]) -> Message:
    """The work's reply, or an error reply with the site's own message.

    The traceback and file names stay in the site's log; the coordinator gets the message with paths
    redacted (file names can identify patients).
    """
    try:
        return Message(content=work(), reply_to=msg)
    except Exception as err:
        log.exception("round failed at this site")
        reason = redact_paths(f"{type(err).__name__}: {err}")
        return Message(error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is (site and modality): asked before the coordinator sends any weights."""
    return _reply(msg, lambda: identify(context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: SiteRound(msg.content, context).train())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: SiteRound(msg.content, context).evaluate())
