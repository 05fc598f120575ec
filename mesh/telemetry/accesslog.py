"""``builtin.accesslog``: one JSON line per request, with the fields of Istio's default JSON access log.

Istio's fields come first, named and typed as Istio's ``accessLogEncoding: JSON``
writes them; txmesh's own follow (``direction``, the deciding AuthorizationPolicy,
both ends' principals and workloads, the trace id).

And one per TCP passthrough connection, when it ends (``"protocol":"tcp"``):
:meth:`AccessLog.mesh_connection_complete`.  A request that dry-run AuthorizationPolicies (``istio.io/dry-run``)
evaluated carries their results too (:func:`dry_run_fields`).

Lines are kept in memory and written by a one-second ``LoopingCall`` (and
whenever :data:`MAX_PENDING` lines are waiting), always as whole lines, so the
data path never waits for a disk and the log never holds half a line.
docs/telemetry.md describes every field.
"""

from __future__ import annotations

import os
import time
from json.encoder import encode_basestring_ascii as escape

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mesh import hookimpl
from mesh.telemetry.guard import FailureLog
from mesh.telemetry.peers import PEER_METADATA, ConfigCache

log = Logger()

#: Lines held before a write even if the second is not over.
MAX_PENDING = 4096


def open_destination(destination: str):
    """A binary file for ``--access-log``: ``stdout`` (the process's fd 1), ``log`` (:class:`LogLines`) or a
    path, appended to."""
    if destination == "stdout":
        return open(os.dup(1), "ab")
    if destination == "log":
        return LogLines()
    return open(destination, "ab")


class LogLines:
    """``--access-log log``, and ``stdout`` in a daemon: each line is a log event of namespace ``mesh.accesslog``.

    So the lines go where twistd's log goes (``--logfile``, ``--syslog`` or
    ``--logger``), after its timestamp and ``[mesh.accesslog#info]``, and are
    rotated with it.  A daemon's stdout is /dev/null, and a copy of the
    launching shell's stdout would keep ``x=$(twistd ...)`` waiting forever.
    """

    _log = Logger(namespace="mesh.accesslog")

    def write(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            if line:
                self._log.info("{line}", line=line)

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        """Nothing to close."""


class AccessLog(service.Service):
    """The ``mesh_request_complete`` implementation behind the access log, and its writer.

    :param stream: a binary file (see :func:`open_destination`), closed when the service stops.
    :param peers: a :class:`mesh.telemetry.peers.PeerDirectory`.
    :param workload: the :class:`mesh.config.compile.Workload` this sidecar serves.
    """

    def __init__(self, reactor, stream, peers, workload, interval: float = 1.0):
        self._stream = stream
        formatter = LineFormatter(peers, workload)
        self._format = formatter.format
        self._format_tcp = formatter.format_tcp
        self._failed = FailureLog("builtin.accesslog")
        self._pending = []
        self._interval = interval
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = reactor

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        try:
            pending = self._pending
            pending.append(self._format(ctx, outcome))
            if len(pending) >= MAX_PENDING:
                self.flush()
        except Exception:
            self._failed()

    @hookimpl
    def mesh_connection_complete(self, connection):
        """A line for each TCP passthrough connection that ended (``connection`` is a
        :class:`mesh.api.ConnectionView` with the tunnel's ``cluster`` and ``response_flags``)."""
        if connection.protocol != "tcp":
            return
        try:
            line = self._format_tcp(connection)
        except Exception:
            self._failed()
            return
        pending = self._pending
        pending.append(line)
        if len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        lines.append("")
        try:
            self._stream.write("\n".join(lines).encode())
            self._stream.flush()
        except OSError as error:
            log.error("access log: {count} line(s) lost: {error}", count=len(lines) - 1, error=error)

    def startService(self):
        super().startService()
        self._flusher.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        self._stream.close()


#: The fields that repeat from request to request (who called whom, how): formatted once per distinct
#: combination and cached, as two parts: Istio's fields, then txmesh's own (:data:`TXMESH_FIELDS`).
#: Istio's fields txmesh cannot know are ``null``, as in Istio's JSON when Envoy has no value.
ISTIO_REPEATED_FIELDS = (
    '"method":%s,"protocol":"HTTP/%s","response_flags":%s,"response_code_details":%s,'
    '"connection_termination_details":null,"upstream_transport_failure_reason":null,"user_agent":%s,'
    '"authority":%s,"upstream_host":%s,"upstream_cluster":%s,"upstream_local_address":null,'
    '"downstream_local_address":null,"downstream_remote_address":%s,"requested_server_name":null,"route_name":%s'
)
#: txmesh's fields, after Istio's: named as Istio's metric labels where Istio has the notion.
TXMESH_FIELDS = (
    '"direction":"%s","authz_policy":%s,"source_principal":%s,"destination_principal":%s,'
    '"source_workload":%s,"source_workload_namespace":%s,"destination_workload":%s,"destination_workload_namespace":%s'
)


#: ``.000Z`` ... ``.999Z``: the end of a timestamp, by millisecond (cheaper than formatting it).
_MILLIS = tuple(f".{millisecond:03d}Z" for millisecond in range(1000))


class LineFormatter:
    """Formats access-log lines: JSON objects written with f-strings, no dict and no encoder.

    The fields are those of Istio's default JSON access log (``meshConfig.accessLogEncoding: JSON``,
    Envoy's ``%...%`` operators), with Envoy's value types (numbers, ``"-"`` for no flags, ``null``
    when there is no value), then txmesh's own fields (docs/telemetry.md lists them all).
    Strings from the request are escaped with the json module's C escaper.  The repeated fields
    are formatted once per distinct combination (per config, since principals come from it) and
    the timestamp once per second.

    :param peers: a :class:`mesh.telemetry.peers.PeerDirectory`.
    :param workload: the :class:`mesh.config.compile.Workload` this sidecar serves.
    """

    def __init__(self, peers, workload):
        self._peers = peers
        self._own = (_json(workload.name), _json(workload.namespace))
        self._repeated = ConfigCache(peers, self._format_repeated)
        self._second = None
        self._second_text = ""

    def format(self, ctx, outcome) -> str:
        """The access-log line of one finished request (without its newline)."""
        headers = ctx.headers
        route = ctx.route
        istio, own = self._repeated.get((
            ctx.direction, ctx.method, ctx.http_version, ctx.authority, headers.get("user-agent"),
            ctx.response_flags, outcome.detail, ctx.upstream_host, ctx.cluster,
            route.name if route is not None else None, ctx.authz_policy, ctx.source_address, ctx.peer,
            ctx.get_extra(PEER_METADATA)))
        trace = ctx.get_extra("trace_id") or trace_id(headers)
        forwarded_for = headers.get("x-forwarded-for")
        upstream_time = ctx.upstream_time  # Envoy's x-envoy-upstream-service-time: a string of whole ms
        service_time = "null" if upstream_time is None else f'"{int(upstream_time * 1000.0)}"'
        dry_run = ctx.authz_dry_run
        start = ctx.start
        second = int(start)  # _start_time, inlined on the hot path (a method call is ~3 % of this line)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return (
            f'{{"start_time":"{self._second_text}{_MILLIS[int((start - second) * 1000.0)]}",'
            f'"path":{escape(ctx.path)},"response_code":{ctx.response_code},'
            f'"bytes_received":{ctx.bytes_received},"bytes_sent":{ctx.bytes_sent},'
            f'"duration":{int(outcome.duration * 1000.0)},'
            f'"upstream_service_time":{service_time},'
            f'"x_forwarded_for":{"null" if forwarded_for is None else escape(forwarded_for)},'
            f'"request_id":{escape(ctx.request_id)},{istio},{own},'
            f'"trace_id":{"null" if trace is None else escape(trace)}'
            f'{"" if dry_run is None else dry_run_fields(dry_run)}}}'
        )

    def format_tcp(self, conn) -> str:
        """The access-log line of one ended TCP passthrough connection (``conn``, as
        ``mesh_connection_complete`` gets it; without its newline): Istio's fields, the
        request-level ones ``null`` (``response_code`` 0), as Envoy's TCP proxy logs them."""
        return (
            f'{{"start_time":"{self._start_time(conn.start)}","method":null,"path":null,"protocol":"tcp",'
            f'"response_code":0,"response_flags":{_json(conn.response_flags or "-")},"response_code_details":null,'
            f'"connection_termination_details":null,"upstream_transport_failure_reason":null,'
            f'"bytes_received":{conn.bytes_received},"bytes_sent":{conn.bytes_sent},'
            f'"duration":{int(conn.duration * 1000.0)},'
            f'"upstream_service_time":null,"x_forwarded_for":null,"user_agent":null,"request_id":null,'
            f'"authority":null,"upstream_host":{_json(_host_port(conn.upstream))},'
            f'"upstream_cluster":{_json(conn.cluster)},"upstream_local_address":null,'
            f'"downstream_local_address":{_json(_host_port(conn.destination))},'
            f'"downstream_remote_address":{_json(conn.source_address)},"requested_server_name":null,'
            f'"route_name":null,"direction":"{conn.direction}"}}'
        )

    def _start_time(self, start) -> str:
        """``start`` (epoch seconds) as ISO 8601 UTC with milliseconds; the seconds are formatted once each."""
        second = int(start)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}{_MILLIS[int((start - second) * 1000.0)]}"

    def _format_repeated(self, key, index) -> tuple:
        (direction, method, http_version, authority, user_agent, flags, details, upstream_host, cluster,
         route_name, authz_policy, source_address, peer, metadata) = key
        own_workload, own_namespace = self._own
        peer_workload, peer_namespace = ("null", "null") if metadata is None else (
            _json(metadata.workload), _json(metadata.namespace))
        if direction == "outbound":
            endpoint = index.endpoint(cluster, upstream_host)
            destination = endpoint.identity if endpoint is not None else None
            source = self._peers.own_identity() if destination else None
            workloads = (own_workload, own_namespace, peer_workload, peer_namespace)
        else:
            source = peer
            destination = self._peers.own_identity() if source else None
            workloads = (peer_workload, peer_namespace, own_workload, own_namespace)
        istio = ISTIO_REPEATED_FIELDS % (
            _json(method), http_version, _json(flags or "-"), _json(details or None), _json(user_agent),
            _json(authority.decode("latin-1") if authority else None), _json(upstream_host), _json(cluster),
            _json(source_address), _json(route_name))
        own = TXMESH_FIELDS % (direction, _json(authz_policy), _json(source), _json(destination), *workloads)
        return istio, own


def dry_run_fields(results) -> str:
    """The fields of the dry-run results of a request (``ctx.authz_dry_run``), each after a comma.

    Named as the dynamic metadata Istio's dry-run policies leave in Envoy's
    RBAC filter: ``istio_dry_run_deny_shadow_engine_result`` (``allowed`` or
    ``denied``) and ``istio_dry_run_deny_shadow_effective_policy_id`` (the
    matching policy, ``namespace/name``, or null), and the same with ``allow``.
    """
    return "".join(f',"istio_dry_run_{action}_shadow_engine_result":"{result}",'
                   f'"istio_dry_run_{action}_shadow_effective_policy_id":{_json(policy)}'
                   for action, result, policy in results)


def _json(text) -> str:
    """A JSON string (ASCII, every other character escaped), or ``null``."""
    return "null" if text is None else escape(text)


def _host_port(address) -> str | None:
    """``ip:port`` of a ``(host, port)`` address, or None."""
    return None if address is None else f"{address[0]}:{address[1]}"


def trace_id(headers):
    """The trace id of W3C ``traceparent`` or B3 ``x-b3-traceid``, or None.

    Used when ``builtin.tracing`` (which sets ``ctx.extra["trace_id"]``) is disabled.
    """
    traceparent = headers.get("traceparent")
    if traceparent:
        parts = traceparent.split("-")
        if len(parts) == 4 and len(parts[1]) == 32:
            return parts[1]
    return headers.get("x-b3-traceid")
