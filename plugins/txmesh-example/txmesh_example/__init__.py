"""The worked example of docs/hooks.md: a txmesh plugin that uses only the plugin API.

It imports nothing of txmesh but :mod:`mesh.api` (the types and ``hookimpl``;
the hooks' contracts are :mod:`mesh.hookspecs`), and shows each lifecycle step:

- ``mesh_addoption``: ``twistd mesh-proxy --example-header-value VALUE``;
- ``mesh_configure``: read the option; without it, or outside a sidecar, the
  plugin stays idle (none of its hooks is called, so it costs nothing);
- ``mesh_response_headers``: every response the sidecar sends its client gets
  ``x-example: VALUE`` and ``x-example-connections: N``, the connections this
  sidecar has accepted so far;
- ``mesh_connection_open`` / ``mesh_connection_complete``: count the
  downstream connections (HTTP and TCP passthrough) and log one line as each
  ends;
- ``mesh_unconfigure``: log the totals when the sidecar stops.

It registers through the ``mesh.plugins`` entry point as ``example``
(``txmesh_example:plugin``, an instance: its state lives per process).
"""

from __future__ import annotations

from twisted.logger import Logger

from mesh.api import Config, ConnectionView, OptionParser, RequestView, hookimpl

__version__ = "0.1.0"

#: The plugin API this plugin is written for (:data:`mesh.hookspecs.API_VERSION`): a txmesh with an
#: older API refuses to register it, with an error that says so.
MESH_API_VERSION = 1

OPTION = "example-header-value"
HEADER = b"x-example"
CONNECTIONS_HEADER = b"x-example-connections"

log = Logger(namespace="txmesh_example")


class ExamplePlugin:
    """One sidecar's example plugin: the header value, and connection counters.

    ``opened`` counts accepted connections, ``closed`` the ended ones, and
    ``bytes_received`` / ``bytes_sent`` their bytes (client -> proxy and back).
    """

    MESH_API_VERSION = MESH_API_VERSION

    def __init__(self):
        self.value = b""
        self.opened = 0
        self.closed = 0
        self.bytes_received = 0
        self.bytes_sent = 0

    @hookimpl
    def mesh_addoption(self, parser: OptionParser) -> None:
        parser.addoption(OPTION, default=None, role="proxy",
                         help="Add 'x-example: VALUE' to every response the sidecar sends to its client "
                              "(without it the plugin stays idle).")

    @hookimpl
    def mesh_configure(self, config: Config) -> None:
        value = config.option(OPTION)
        if config.role != "proxy" or value is None:
            config.set_idle(self, f"needs mesh-proxy --{OPTION}")
            return
        self.value = value.encode("latin-1")

    @hookimpl
    def mesh_response_headers(self, ctx: RequestView, status: int, headers) -> list:
        return [(HEADER, self.value), (CONNECTIONS_HEADER, b"%d" % self.opened)]

    @hookimpl
    def mesh_connection_open(self, connection: ConnectionView) -> None:
        self.opened += 1

    @hookimpl
    def mesh_connection_complete(self, connection: ConnectionView) -> None:
        self.closed += 1
        self.bytes_received += connection.bytes_received
        self.bytes_sent += connection.bytes_sent
        log.info("example: {direction} {protocol} connection from {source} closed after {duration:.3f}s: "
                 "{requests} request(s), {received} bytes in, {sent} bytes out",
                 direction=connection.direction, protocol=connection.protocol, source=connection.source_address,
                 duration=connection.duration, requests=connection.requests, received=connection.bytes_received,
                 sent=connection.bytes_sent)

    @hookimpl
    def mesh_unconfigure(self, config: Config) -> None:
        log.info("example: {opened} connection(s) accepted, {closed} ended", opened=self.opened, closed=self.closed)


#: What the entry point registers.
plugin = ExamplePlugin()
