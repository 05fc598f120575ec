"""Twisted Web without its HTTP/2 support in a sidecar, whose web ports speak HTTP/1.1 only.

``twisted.web.http`` imports ``twisted.web._http2``, and with it the ``h2``, ``hpack`` and
``hyperframe`` packages, whenever ``h2`` is installed, to offer HTTP/2 by ALPN on TLS ports.
A sidecar's Twisted Web sites (admin, metrics, health, the worker supervisor's) all listen on
plain TCP, where Twisted Web never speaks HTTP/2, so for a sidecar that import only costs
memory: about 1.3 MiB of RSS (docs/performance.md, "Idle memory of a sidecar").  The
sidecar's own HTTP/2 codecs import ``h2`` at their first HTTP/2 connection instead
(:meth:`mesh.proxy.pool.H2Pool.connect`, ``mesh.proxy.codec.http1_server``).

Importing this module before anything imports ``twisted.web.http`` (``mesh.proxy.tap`` does
it first) gives ``twisted.web._http2`` a ``None`` entry in ``sys.modules``, which makes the
import fail with ``ImportError``; Twisted Web takes that as "no HTTP/2" (``H2_ENABLED`` is
false, sites offer only ``http/1.1``).  Once ``twisted.web.http`` is imported this changes
nothing.  mesh-control does not import it.
"""

import sys

sys.modules.setdefault("twisted.web._http2", None)
