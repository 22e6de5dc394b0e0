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
