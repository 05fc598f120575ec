"""twistd dropins: ``twistd mesh-proxy`` and ``twistd mesh-control``.

This directory must not contain an ``__init__.py`` (Twisted's plugin rules).
The real work lives in :mod:`mesh.proxy.tap` and :mod:`mesh.control.tap`,
imported lazily so that ``twistd --help`` stays fast.  Each has ``Options``
(called when the subcommand is parsed: it loads the plugins and adds the
options they declare in ``mesh_addoption``) and ``makeService``.
"""

from twisted.application.service import ServiceMaker

meshProxy = ServiceMaker(
    "txmesh sidecar proxy", "mesh.proxy.tap", "Run a txmesh sidecar proxy (data plane).", "mesh-proxy")

meshControl = ServiceMaker(
    "txmesh control plane", "mesh.control.tap", "Run the txmesh control plane (CA, config).", "mesh-control")
