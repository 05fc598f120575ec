"""Keep telemetry bugs out of the data path."""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


class FailureLog:
    """Reports exceptions a telemetry hook caught; call it from the ``except`` block.

    A telemetry ``mesh_request_complete`` must never raise: pluggy stops at
    the first exception, so a bug in one telemetry plugin would also silence
    the others.  Each hook body is a ``try`` whose ``except Exception`` calls
    this (an inline ``try`` costs nothing per request; a wrapper function
    would).  A failure is logged on its 1st, 2nd, 4th, 8th... occurrence, so a
    bug hit by every request cannot flood the log.
    """

    def __init__(self, name: str):
        self.name = name
        self.failures = 0

    def __call__(self) -> None:
        self.failures += 1
        count = self.failures
        if count & (count - 1) == 0:
            log.failure("{name} failed ({count} time(s) so far); the request itself was not affected",
                        name=self.name, count=count)
