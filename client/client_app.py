"""Flower ClientApp run by each hospital's SuperNode: train and evaluate on the site's own data."""

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .site import SiteRound

app = ClientApp()
logging.getLogger("fed_swinumamba").setLevel(logging.INFO)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=SiteRound(msg.content, context).train(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=SiteRound(msg.content, context).evaluate(), reply_to=msg)
