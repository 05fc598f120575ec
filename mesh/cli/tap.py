"""``meshctl tap [NAME | --admin HOST:PORT] [--method M] [--path P] [--authority A] [--status S] [--direction D]``.

Live requests through one sidecar, as they finish, from its admin port's ``/tap``
(:mod:`mesh.telemetry.tap_stream`): the filter runs in the sidecar, request headers are redacted
unless ``--show-headers`` (``authorization``, ``proxy-authorization``, ``cookie`` and
``set-cookie`` always are), and the sidecar sends at most ``--max-rps`` events a second.  The
admin port listens on loopback only: that is the access control, so run meshctl on the
sidecar's host.  Stops after ``--count`` events, ``--duration``, or Ctrl-C.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import urllib.parse

from mesh.cli.admin_client import AdminError
from mesh.cli.proxies import add_proxy_arguments, resolve_admin
from mesh.durations import duration_argument

FILTERS = ("method", "path", "authority", "status", "direction")


def add_parser(subparsers):
    parser = subparsers.add_parser("tap", help="watch live requests through a sidecar (from its admin port)")
    add_proxy_arguments(parser, "to tap")
    add_filter_arguments(parser)
    parser.add_argument("--show-headers", action="store_true",
                        help="show request header values (authorization and cookies stay redacted)")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N requests")
    parser.add_argument("--duration", type=duration_argument, metavar="DURATION", help="stop after this long")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="text: one line per request; json: the sidecar's JSON objects")
    parser.set_defaults(func=run)


def add_filter_arguments(parser) -> None:
    """The request filter the sidecar applies, and its rate limit."""
    parser.add_argument("--method", help="only this HTTP method")
    parser.add_argument("--path", metavar="PREFIX", help="only paths starting with PREFIX")
    parser.add_argument("--authority", metavar="HOST", help="only this Host (port ignored)")
    parser.add_argument("--status", metavar="CODE", help="only this status code (503) or class (5xx)")
    parser.add_argument("--direction", choices=("inbound", "outbound"), help="only one listener's requests")
    parser.add_argument("--max-rps", type=int, default=100, metavar="N",
                        help="events per second the sidecar sends at most (default 100; the rest are counted "
                             "as dropped)")


def tap_query(args, show_headers: bool = False) -> dict:
    """The ``/tap`` query string of the parsed arguments."""
    query = {name: getattr(args, name) for name in FILTERS if getattr(args, name)}
    query["max_rps"] = str(args.max_rps)
    if show_headers:
        query["show_headers"] = "1"
    return query


class TapStream:
    """One open ``/tap`` stream; iterate it for the JSON objects the sidecar sends."""

    def __init__(self, host: str, port: int, query: dict, timeout: float = 5.0):
        url = f"http://{host}:{port}/tap"
        self._connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            self._connection.request("GET", "/tap?" + urllib.parse.urlencode(query))
            self._response = self._connection.getresponse()
        except OSError as error:
            raise AdminError(
                f"cannot reach the sidecar's admin port at {url}: {error}; is mesh-proxy running "
                f"with --admin-port {port}? It listens on 127.0.0.1 only: run meshctl on its host") from None
        if self._response.status != 200:
            reason = self._response.read().decode("utf-8", "replace").strip()
            if self._response.status == 404:
                reason = "no /tap here: an older txmesh, or --disable-plugin builtin.tap"
            raise AdminError(f"{url} answered {self._response.status}: {reason}")
        self._connection.sock.settimeout(None)  # a quiet tap is not a dead one
        self.opening = self._next()

    def _next(self):
        line = self._response.readline()
        return json.loads(line) if line else None

    def __iter__(self):
        try:
            while True:
                document = self._next()
                if document is None:
                    return
                yield document
        except (OSError, ValueError, http.client.HTTPException):
            return  # closed by close(), or by the sidecar

    def close(self) -> None:
        """End the stream (from any thread): iteration stops."""
        sock = self._connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_after(self, seconds) -> None:
        """Close the stream after ``seconds`` (None: never)."""
        if seconds:
            timer = threading.Timer(seconds, self.close)
            timer.daemon = True
            timer.start()


def open_tap(args, show_headers: bool = False) -> TapStream:
    """Find the sidecar ``args`` names and open its tap; :class:`AdminError` saying what to do."""
    host, port, _ = resolve_admin(args)
    return TapStream(host, port, tap_query(args, show_headers))


def run(args) -> int:
    try:
        stream = open_tap(args, args.show_headers)
    except AdminError as error:
        print(f"meshctl tap: {error}", file=sys.stderr)
        return 1
    print(f"tapping {args.name or args.admin or 'the sidecar'} ({_describe(stream.opening)}); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    stream.close_after(args.duration)
    seen = 0
    try:
        for document in stream:
            if "dropped" in document:
                print(dropped_message(document["dropped"]), file=sys.stderr)
                continue
            print(json.dumps(document, sort_keys=True) if args.output == "json"
                  else format_event(document, args.show_headers), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return 0


def _describe(opening) -> str:
    tap = (opening or {}).get("tap") or {}
    conditions = ", ".join(f"{key}={value}" for key, value in sorted((tap.get("filter") or {}).items()))
    return f"{conditions or 'every request'}, at most {tap.get('max_rps')}/s"


def dropped_message(dropped: dict) -> str:
    """What a ``{"dropped": ...}`` line means, and what to do."""
    return (f"meshctl tap: the sidecar dropped events so far: {dropped.get('slow_client', 0)} while this terminal "
            f"was not reading fast enough, {dropped.get('rate_limit', 0)} over --max-rps; narrow the filter "
            "or raise --max-rps")


def format_event(event: dict, show_headers: bool = False) -> str:
    """One request as a line (and its headers below it, with ``--show-headers``)."""
    line = (f"{event.get('time')} {event.get('direction'):8} {event.get('method')} {event.get('authority')} "
            f"{event.get('path')} {event.get('status')} {event.get('flags')} {event.get('duration_ms')}ms "
            f"route={event.get('route') or '-'} upstream={event.get('upstream_host') or '-'} "
            f"id={event.get('request_id')}")
    if show_headers:
        line += "".join(f"\n    {name}: {value}" for name, value in sorted((event.get("headers") or {}).items()))
    return line
