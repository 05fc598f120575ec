"""A finished request leaves no reference cycle: its objects are freed by reference counting.

A cycle per request (the exchange and its last try pointed at each other; over HTTP/2, the
exchange and its downstream stream) left every request's context, exchange, try and trace hop to
Python's cyclic collector, which raised a loaded sidecar's peak RSS by 1 to 4 MiB
(docs/performance.md, "Peak RSS of a sidecar") and, over HTTP/2, ran a collection every few
requests.  A real sidecar, built as ``twistd mesh-proxy`` builds it, forwards requests over real
sockets (HTTP/1.1, or HTTP/2 with prior knowledge) to a backend in the same process, with the
cyclic collector off; then what a collection would find is counted.
"""

import json
import subprocess
import sys

import pytest

SIDECAR_WITHOUT_GC = r"""
import gc, http.client, json, socket, sys, threading
gc.disable()
from pathlib import Path
from twisted.internet import protocol, reactor
import twisted.plugins.mesh_services  # the twistd plugin, as `twistd mesh-proxy` loads it
from mesh.proxy import tap
from tests.harness.net import free_port  # never the same port twice (ports from port 0 may repeat)

REQUESTS = 20


class Backend(protocol.Protocol):
    buffered = b""
    def dataReceived(self, data):
        self.buffered += data
        while b"\r\n\r\n" in self.buffered:
            _, _, self.buffered = self.buffered.partition(b"\r\n\r\n")
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

backend = reactor.listenTCP(0, protocol.Factory.forProtocol(Backend), interface="127.0.0.1")
config = Path(sys.argv[1])
config.joinpath("backend.yaml").write_text(f'''
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: default}}
spec:
  hosts: [backend.test]
  location: MESH_INTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend.getHost().port}}}}}]
''')
outbound = free_port()
options = tap.Options()
options.parseOptions(["--config-dir", str(config), "--workload", "client", "--namespace", "default",
                      "--outbound-port", str(outbound), "--inbound-port", str(free_port()), "--admin-port", "0",
                      "--health-port", "0", "--metrics-port", "0", "--access-log", "off"])
service = tap.makeService(options)
result = {}

def count_garbage():
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    names = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("mesh.")]  # not the h2 client's
    result["cyclic"] = {name: names.count(name) for name in ("RequestContext", "Exchange", "Try", "H2Stream")}
    reactor.stop()

def http1_requests():
    connection = http.client.HTTPConnection("127.0.0.1", outbound, timeout=10)
    statuses = []
    for _ in range(REQUESTS):
        connection.request("GET", "/", headers={"Host": "backend.test"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    connection.close()
    return statuses

def h2_requests():
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, ResponseReceived, StreamEnded
    sock = socket.create_connection(("127.0.0.1", outbound), timeout=10)
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    statuses = []
    for _ in range(REQUESTS):
        h2.send_headers(h2.get_next_available_stream_id(), [(":method", "GET"), (":scheme", "http"),
                        (":authority", "backend.test"), (":path", "/")], end_stream=True)
        ended = False
        while not ended:
            sock.sendall(h2.data_to_send())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the sidecar closed the connection")
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived):
                    statuses.append(int(dict(event.headers)[b":status"]))
                elif isinstance(event, DataReceived):
                    h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                ended = ended or isinstance(event, StreamEnded)
    sock.close()
    return statuses

def client():
    try:
        result["statuses"] = h2_requests() if sys.argv[2] == "h2" else http1_requests()
    finally:
        reactor.callFromThread(count_garbage)

def start():
    service.startService()
    threading.Thread(target=client, daemon=True).start()

reactor.callWhenRunning(start)
reactor.run()
print(json.dumps(result))
"""


@pytest.mark.parametrize("protocol", ["http1", "h2"])
def test_finished_requests_leave_nothing_to_the_cyclic_collector(tmp_path, protocol):
    result = subprocess.run([sys.executable, "-c", SIDECAR_WITHOUT_GC, str(tmp_path), protocol],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["statuses"] == [200] * 20, outcome
    assert outcome["cyclic"] == {"RequestContext": 0, "Exchange": 0, "Try": 0, "H2Stream": 0}, outcome
