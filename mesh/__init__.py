"""txmesh: a service mesh on Twisted.

The import package is ``mesh``; see docs/ for the user guide, and
docs/architecture.md for the package map, the import rules between packages
(enforced by tests/unit/test_layering.py) and the request path.
"""

__version__ = "0.1.0"

import pluggy as _pluggy

#: Decorator for hook implementations: ``@mesh.hookimpl def mesh_route(ctx, table): ...``
hookimpl = _pluggy.HookimplMarker("mesh")
