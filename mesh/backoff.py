"""One retry schedule for the whole mesh: capped, jittered exponential backoff.

Every loop that reconnects or retries after a failure (the proxy's config
stream, the workload agent's certificate renewal, the Kubernetes watches and
writers) asks a :class:`Backoff` how long to wait::

    backoff = Backoff(initial=0.5, maximum=30.0, jitter=(0.5, 1.5))
    delay = backoff.next()   # 0.25..0.75 s, then 0.5..1.5 s, 1..3 s, ... up to 15..45 s
    backoff.reset()          # after a success: back to the first step

The *step* starts at ``initial`` and is multiplied by ``factor`` after each
try, up to ``maximum``; each delay is the step times a factor drawn uniformly
from ``jitter = (low, high)``, so that many clients that failed together do
not retry together.  Give ``rng`` (a function returning a float in [0, 1)) to
make the delays deterministic in tests.

Twisted's :func:`twisted.application.internet.backoffPolicy` adds its jitter
(seconds) to the step instead of scaling it, which would change today's
delays, so the mesh keeps this small class.  It imports nothing of the mesh.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Capped, jittered exponential backoff: :meth:`next` is the delay before the next try."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0,
                 jitter: tuple[float, float] = (0.5, 1.5), rng: Callable[[], float] = random.random):
        low, high = jitter
        if not 0 < initial <= maximum or factor < 1 or not 0 <= low <= high:
            raise ValueError(f"want 0 < initial <= maximum, factor >= 1 and 0 <= low <= high; got initial={initial}, "
                             f"maximum={maximum}, factor={factor}, jitter={jitter}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng
        self._step = initial

    def next(self) -> float:
        """The delay to wait now: the current step times a factor in ``jitter``; then the step grows."""
        low, high = self.jitter
        delay = self._step * (low + (high - low) * self._rng())
        self._step = min(self.maximum, self._step * self.factor)
        return delay

    def reset(self) -> None:
        """Back to the first step (after a success)."""
        self._step = self.initial
