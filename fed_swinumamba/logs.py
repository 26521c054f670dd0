"""Console logging for the apps: Flower shows (and streams to ``flwr run``) what an app prints."""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = "fed_swinumamba"


def enable_console_logging(level: int = logging.INFO) -> None:
    """Show this project's INFO lines on stdout, unless the host program already configured logging."""
    ours = logging.getLogger(LOGGER)
    ours.setLevel(level)
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)


NOT_PRIVATE = "NOT PRIVATE (dp-insecure-reproducible): "


class _Prefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


@contextmanager
def prefixed(prefix: str, *names: str) -> Iterator[None]:
    """Every line the loggers ``names`` write during the block starts with ``prefix``.

    A run whose DP is reproducible says so on every line it logs, so that no excerpt of its log can
    pass for a private run's.
    """
    marker = _Prefix(prefix)
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(marker)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(marker)
