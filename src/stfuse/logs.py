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


class Progress:
    """Progress lines of a long step: ``what: 120/480 dates (25%), 12 s, ~37 s left``.

    ``step(n)`` counts ``n`` more done items and logs at most every ``every_s`` seconds (and at the first
    and last item), so a job's log shows it is alive without a line per item.
    """

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str = "items", every_s: float = 10.0):
        import time

        self._clock = time.perf_counter
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, int(total), unit, every_s
        self.done, self.start = 0, self._clock()
        self._last = None

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.logger.info("%s: %d/%d %s (%.0f%%), %.0f s, ~%.0f s left", self.what, self.done, self.total,
                         self.unit, pct, elapsed, left)
