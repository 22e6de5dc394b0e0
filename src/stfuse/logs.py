"""Logging set-up shared by rule scripts and the command line."""

from __future__ import annotations

import logging
import sys


def setup(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Send stfuse's log records to `log_file` (a rule's log) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.excepthook = _log_uncaught


def _log_uncaught(exc_type, exc, tb):
    """The error that stops a rule goes into its log: the message first, the traceback after it."""
    logger = logging.getLogger("stfuse")
    logger.error("%s: %s", exc_type.__name__, exc)
    logger.debug("traceback", exc_info=(exc_type, exc, tb))
    sys.__excepthook__(exc_type, exc, tb)
