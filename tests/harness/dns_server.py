"""A small authoritative DNS server (Twisted names) on loopback, with records a test can change.

Run as a script (``python tests/harness/dns_server.py --port P --zone FILE``) it answers A queries
over UDP and TCP from the zone file, a JSON object ``{"ttl": 1, "records": {"name": ["ip", ...]}}``
that it reads again on every query: a test changes a record by rewriting the file
(:meth:`DnsServer.set_records`).  A name not in the file gets NXDOMAIN.  :class:`DnsServer` runs it
as a managed process; stop it and start it again (same port, same file) to take the DNS server
down and bring it back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if __package__:
    from .net import free_port
    from .processes import ManagedProcess, venv_bin
else:  # run as a script: only Twisted is needed
    ManagedProcess = object


class DnsServer(ManagedProcess):
    """The DNS server as a process on ``127.0.0.1:port`` (UDP and TCP), serving ``records``.

    ``records`` maps names to lists of IPv4 addresses, answered with ``ttl`` seconds.
    """

    kind = "dns"

    def __init__(self, records: dict, *, ttl: int = 1, port: int | None = None, zone: Path | None = None,
                 log_dir: Path | None = None):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-dns-"))
        self.port = port or free_port("127.0.0.1")
        self.ttl = ttl
        self.zone = Path(zone or log_dir / "zone.json")
        if zone is None:
            self.set_records(records)
        argv = [venv_bin("python"), Path(__file__).resolve(), "--port", self.port, "--zone", self.zone]
        super().__init__("dns", argv, log_dir / f"dns-{self.port}.log")

    @property
    def address(self) -> str:
        """``IP:PORT``, as ``mesh-proxy --dns-server`` takes it."""
        return f"127.0.0.1:{self.port}"

    def set_records(self, records: dict) -> None:
        """Serve ``records`` from now on."""
        write_zone(self.zone, records, self.ttl)

    def restarted(self) -> DnsServer:
        """A new, started server on the same port with the same zone file (after :meth:`stop`)."""
        return DnsServer({}, ttl=self.ttl, port=self.port, zone=self.zone, log_dir=self.log_path.parent).start()

    def is_ready(self) -> bool:
        return f"listening on 127.0.0.1:{self.port}" in self.log_tail(5)


def write_zone(path: Path, records: dict, ttl: int = 1) -> None:
    """Write the zone file that the server reads (atomically: a query never sees half a file)."""
    temporary = Path(path).with_suffix(".tmp")
    temporary.write_text(json.dumps({"ttl": ttl, "records": records}))
    os.replace(temporary, path)


def main(argv) -> None:
    """Serve the zone file given by ``--zone`` on ``--port`` until SIGTERM."""
    import argparse

    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zone", required=True)
    options = parser.parse_args(argv)

    class ZoneFile(common.ResolverBase):
        """Answers A queries from the zone file, read on every query."""

        def _lookup(self, name, cls, type, timeout=None):
            with open(options.zone) as handle:
                zone = json.load(handle)
            key = name.decode("ascii").lower().rstrip(".")
            if key not in zone["records"]:
                return defer.fail(error.DomainError(key))  # NXDOMAIN from an authority
            answers = [dns.RRHeader(name=name, type=dns.A, ttl=zone["ttl"], auth=True,
                                    payload=dns.Record_A(address, ttl=zone["ttl"]))
                       for address in zone["records"][key] if type in (dns.A, dns.ALL_RECORDS)]
            return defer.succeed((answers, [], []))

    factory = server.DNSServerFactory(authorities=[ZoneFile()])
    reactor.listenUDP(options.port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(options.port, factory, interface="127.0.0.1")
    print(f"dns server listening on 127.0.0.1:{options.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
