"""Waiting for a real condition, with a deadline."""

from __future__ import annotations

import http.client
import time

#: Exceptions that mean "not yet" while polling: refused or reset connections,
#: half-started HTTP servers.
NOT_YET = (OSError, http.client.HTTPException)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str | None = None,
             ignore: tuple = NOT_YET):
    """Call *predicate* until it returns a truthy value, and return that value.

    Exceptions in *ignore* count as "not yet"; any other exception propagates at
    once (so a predicate can fail fast, e.g. when the process it waits for died).
    On timeout, raise :class:`TimeoutError` naming *what* was awaited, the last
    result and the last ignored exception.
    """
    deadline = time.monotonic() + timeout
    last_result, last_error = None, None
    while True:
        try:
            last_result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if last_result:
                return last_result
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.1f}s waiting for {what or getattr(predicate, '__name__', predicate)}; "
                f"last result: {last_result!r}; last error: {last_error!r}"
            )
        time.sleep(interval)
