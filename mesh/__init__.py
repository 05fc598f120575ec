"""txmesh: a service mesh on Twisted.

The import package is ``mesh``; see docs/ for the user guide and
ARCHITECTURE.md-style overview in docs/architecture.md.
"""

__version__ = "0.1.0"

import pluggy as _pluggy

#: Decorator for hook implementations: ``@mesh.hookimpl def mesh_route(ctx, table): ...``
hookimpl = _pluggy.HookimplMarker("mesh")
