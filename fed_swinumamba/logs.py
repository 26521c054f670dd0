"""Console logging for the apps: Flower shows (and streams to ``flwr run``) what an app prints."""

import logging
import sys

LOGGER = "fed_swinumamba"


def enable_console_logging(level: int = logging.INFO) -> None:
    """Show this project's INFO lines on stdout, unless the host program already configured logging."""
    ours = logging.getLogger(LOGGER)
    ours.setLevel(level)
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
