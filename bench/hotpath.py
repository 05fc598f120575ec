"""Instructions per request of one txmesh proxy, for comparing hot-path changes.

The host steals CPU in long stalls, so wall-clock figures of a change to the
request path drown in noise.  This tool counts what does not depend on
stalls: the instructions (callgrind's Ir) the proxy executes per request.

It starts nginx (bench/nginx.conf) and one ``twistd mesh-proxy`` in front of
it, the proxy under ``valgrind --tool=callgrind --instr-atstart=no`` so that
start-up is not counted.  A small client in this process sends ``--warmup``
keep-alive requests over one connection (pool, caches and Python's
specialising interpreter warm up), then for each of ``--samples`` samples:
``callgrind_control -i on``, ``-z`` (zero the counters), ``--requests``
requests one at a time, ``-d`` (dump the counters to a file), ``-i off``.
A sample is the dump's total divided by the request count; a proxy's figure
is the median of its samples, which differ by about 0.1 % (garbage
collections, the once-a-second timer sweep).

Python's string hashing is randomised per process, and the layout of dicts
and sets it gives moves the count by up to about 0.7 % from one process to
the next.  So each proxy runs with a fixed ``PYTHONHASHSEED``, one proxy per
seed of ``--hash-seeds`` (each seed's figure is then reproducible to about
0.05 %), and the result is the mean over the seeds.  Any change to the code
still moves object addresses, allocations and garbage collections a little
(the cost of dicts and sets keyed by identity, of the allocator, of the
collector), by up to about 0.5 % per seed: use six seeds or more
(``--samples 1`` is enough then), and take a mean difference below about
1 % as noise unless it grows where it should (``--extra-headers``).

Given several ``--tree`` options, the trees are measured in turn under each
seed and the differences to the first tree are reported per seed and on
average: the way to compare an unchanged tree with a changed one, e.g.::

    git archive HEAD | tar -x -C /tmp/before
    .venv/bin/python -m bench.hotpath --tree /tmp/before --tree .

``--tree DIR`` runs the proxy with ``mesh`` imported from ``DIR`` (through
PYTHONPATH); the default is this checkout.  The client sends the same head
every time (``Host`` plus a few headers a real client sends;
``--extra-headers`` adds more), checks that each answer is a 200 with nginx's
1 KiB body, and is not counted itself.  ``--protocol h2`` makes it an HTTP/2
client (prior knowledge, the ``h2`` library, one stream at a time on one
connection), to count the proxy's HTTP/2 server codec; nginx is still spoken
to in HTTP/1.1.

``--cprofile FILE`` runs the (first) tree's proxy without valgrind under
twistd's cProfile instead, sends the requests, and writes the profile to FILE
(for orientation: cProfile's own overhead distorts the split between small
functions).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pstats
import re
import socket
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import yaml

from bench.procs import BenchError, free_port, run_tool
from bench.topologies import (
    BENCH_DIR,
    BODY,
    MESH_HOST,
    REPO_DIR,
    Workspace,
    find_venv_bin,
    start_backend,
    txmesh_resources,
)

_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)

#: Options that switch off an access log, a metrics port and a health port, passed only if the
#: tree's ``mesh-proxy`` has them (the Envoy cases have neither).
_TELEMETRY_OFF = (("--access-log", "off"), ("--metrics-port", "0"), ("--health-port", "0"))


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection sending the same GET again and again."""

    def __init__(self, port: int, host: str, extra_headers: int = 0):
        lines = ["GET /hotpath?n=1 HTTP/1.1", f"Host: {host}", "User-Agent: txmesh-hotpath/1",
                 "Accept: */*", "Accept-Encoding: gzip, deflate"]
        lines += [f"X-Extra-{index}: value-{index}" for index in range(extra_headers)]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def get(self) -> None:
        """Send the request; read the whole response; fail unless it is nginx's 200."""
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in header_lines)
        if not status_line.startswith(b"HTTP/1.1 200 ") or b"content-length" not in headers:
            raise BenchError(f"unexpected response head from the proxy:\n{head.decode(errors='replace')}")
        length = int(headers[b"content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if body != BODY:
            raise BenchError(f"unexpected body from the proxy ({len(body)} bytes)")

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("the proxy closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


class H2Client:
    """One HTTP/2 connection (h2c, prior knowledge) sending the same GET on one stream after another.

    The same head as :class:`KeepAliveClient` (``:authority`` for ``Host``), one stream at a time,
    so that the proxy's HTTP/2 codec is counted per request; the client is the ``h2`` library.
    """

    def __init__(self, port: int, host: str, extra_headers: int = 0):
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.headers = [(":method", "GET"), (":scheme", "http"), (":authority", host), (":path", "/hotpath?n=1"),
                        ("user-agent", "txmesh-hotpath/1"), ("accept", "*/*"), ("accept-encoding", "gzip, deflate")]
        self.headers += [(f"x-extra-{index}", f"value-{index}") for index in range(extra_headers)]
        self.h2 = H2Connection(config=H2Configuration(client_side=True, header_encoding="latin-1"))
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())

    def get(self) -> None:
        """Send the request on a new stream; read the whole response; fail unless it is nginx's 200."""
        from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset

        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, self.headers, end_stream=True)
        self.sock.sendall(h2.data_to_send())
        status, body, ended = None, b"", False
        while not ended:
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("the proxy closed the connection")
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived):
                    status = dict(event.headers)[":status"]
                elif isinstance(event, DataReceived):
                    body += event.data
                    h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded) and event.stream_id == stream_id:
                    ended = True
                elif isinstance(event, StreamReset):
                    raise BenchError(f"the proxy reset stream {event.stream_id} ({event.error_code})")
            pending = h2.data_to_send()
            if pending:
                self.sock.sendall(pending)
        if status != "200" or body != BODY:
            raise BenchError(f"unexpected response from the proxy: status {status}, {len(body)} bytes")

    def close(self) -> None:
        self.sock.close()


def _client(args, port: int):
    """The client of ``--protocol``: HTTP/1.1 keep-alive or HTTP/2 (h2c)."""
    client_class = H2Client if args.protocol == "h2" else KeepAliveClient
    return client_class(port, MESH_HOST, args.extra_headers)


def _proxy_env(tree: Path, hash_seed=None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = str(hash_seed)
    return env


def _telemetry_off(twistd: str, tree: Path) -> list[str]:
    out = subprocess.run([twistd, "mesh-proxy", "--help"], capture_output=True, text=True, timeout=120,
                         env=_proxy_env(tree), cwd=str(tree))
    return [part for option, value in _TELEMETRY_OFF if option in out.stdout for part in (option, value)]


def _start_proxy(ws: Workspace, tree: Path, backend_port: int, twistd_options: list[str], hash_seed=None):
    """Start one standalone mesh-proxy from ``tree`` routing MESH_HOST to nginx; return (process, port)."""
    config_dir = ws.root / "config"
    config_dir.mkdir()
    for index, resource in enumerate(txmesh_resources(MESH_HOST, backend_port)):
        (config_dir / f"{index:02d}-{resource['kind'].lower()}.yaml").write_text(yaml.safe_dump(resource))
    outbound, inbound, admin = free_port(), free_port(), free_port()
    twistd = ws.venv_tool("twistd")
    argv = [twistd, "-n", "--pidfile=", *twistd_options, "mesh-proxy", "--config-dir", str(config_dir),
            "--workload", "bench", "--outbound-port", str(outbound), "--inbound-port", str(inbound),
            "--admin-port", str(admin), *_telemetry_off(twistd, tree)]
    proxy = ws.start_proxy("txmesh", argv, admin, "python", cwd=ws.root, env=_proxy_env(tree, hash_seed))
    return proxy, outbound


def _callgrind(pid: int, log_dir: Path, *command: str) -> None:
    run_tool(["callgrind_control", *command, str(pid)], 120, log_dir / "callgrind_control.log")


def measure(args, ws: Workspace, tree: Path, backend_port: int, hash_seed: int) -> float:
    """Median instructions per request of a proxy running from ``tree`` with ``PYTHONHASHSEED=hash_seed``."""
    proxy, port = _start_proxy(ws, tree, backend_port, [], hash_seed)
    client = _client(args, port)
    for _ in range(args.warmup):
        client.get()
    out_file = ws.callgrind_file(proxy.name)
    samples = []
    for sample in range(1, args.samples + 1):
        _callgrind(proxy.pid, ws.root, "-i", "on")
        _callgrind(proxy.pid, ws.root, "-z")
        for _ in range(args.requests):
            client.get()
        _callgrind(proxy.pid, ws.root, f"--dump=sample{sample}")
        _callgrind(proxy.pid, ws.root, "-i", "off")
        dumps = sorted(out_file.parent.glob(out_file.name + ".*"), key=lambda path: int(path.suffix[1:]))
        total = _TOTAL.search(dumps[-1].read_text(errors="replace"))
        if not total:
            raise BenchError(f"no totals in {dumps[-1]}")
        samples.append(int(total.group(1)) / args.requests)
    client.close()
    return statistics.median(samples)


def profile(args, ws: Workspace, backend_port: int) -> None:
    """Run the requests against a proxy under cProfile and print its top functions."""
    stats_file = Path(args.cprofile).resolve()
    proxy, port = _start_proxy(ws, args.tree[0], backend_port,
                               [f"--profile={stats_file}", "--profiler=cprofile", "--savestats"])
    client = _client(args, port)
    for _ in range(args.warmup + args.requests * args.samples):
        client.get()
    client.close()
    ws.stack.close()  # SIGTERM: twistd writes the profile as it exits
    pstats.Stats(str(stats_file)).sort_stats("tottime").print_stats(25)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per sample (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="samples per proxy, median taken (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting (default: %(default)s)")
    parser.add_argument("--hash-seeds", default="0,1,2", metavar="LIST",
                        help="PYTHONHASHSEED values, one proxy per seed and tree (default: %(default)s)")
    parser.add_argument("--extra-headers", type=int, default=0, metavar="N",
                        help="add N more request headers (default: %(default)s)")
    parser.add_argument("--protocol", choices=("http1", "h2"), default="http1",
                        help="what the client speaks to the proxy: HTTP/1.1 keep-alive, or HTTP/2 with prior "
                             "knowledge, one stream at a time (default: %(default)s); nginx is spoken to in HTTP/1.1")
    parser.add_argument("--tree", type=Path, action="append",
                        help="checkout the proxy imports mesh from (default: this one); repeat to compare")
    parser.add_argument("--venv", help="virtualenv holding twistd (default: as bench.run)")
    parser.add_argument("--cprofile", metavar="FILE", help="profile with cProfile instead of counting")
    args = parser.parse_args(argv)
    args.tree = [tree.resolve() for tree in args.tree or [REPO_DIR]]
    for tree in args.tree:
        if not (tree / "mesh" / "proxy").is_dir():
            parser.error(f"--tree {tree}: no mesh/proxy there")
    try:
        args.hash_seeds = [int(seed) for seed in args.hash_seeds.split(",")]
    except ValueError:
        parser.error(f"--hash-seeds wants comma-separated integers, got {args.hash_seeds!r}")
    return args


def _delta(value: float, reference: float) -> str:
    return f"{value - reference:+,.0f} ({100 * (value - reference) / reference:+.2f}%)"


def main(argv=None) -> int:
    args = parse_args(argv)
    work = BENCH_DIR / "work" / ("hotpath-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
    work.mkdir(parents=True)
    venv_bin = find_venv_bin(args.venv)
    figures = [[] for _ in args.tree]  # per tree (the same tree may be given twice), per seed
    try:
        with ExitStack() as stack:
            backend_port = start_backend(Workspace(work, stack, venv_bin))
            if args.cprofile:
                profile(args, Workspace(work, stack, venv_bin), backend_port)
                return 0
            print(f"hotpath: {args.protocol}, {args.samples} x {args.requests} requests after {args.warmup} "
                  f"warm-up per proxy, hash seeds {args.hash_seeds}; work dir {work}", flush=True)
            for seed in args.hash_seeds:
                for index, tree in enumerate(args.tree):
                    root = work / f"tree{index}-seed{seed}"
                    root.mkdir()
                    with ExitStack() as proxy_stack:  # one proxy at a time
                        ws = Workspace(root, proxy_stack, venv_bin, callgrind=True)
                        figures[index].append(measure(args, ws, tree, backend_port, seed))
                    line = f"  seed {seed}  {tree}: {figures[index][-1]:,.0f} instructions/request"
                    if index:
                        line += "  " + _delta(figures[index][-1], figures[0][-1])
                    print(line, flush=True)
    except BenchError as exc:
        print(f"hotpath: error: {exc}", file=sys.stderr)
        return 1
    reference = statistics.mean(figures[0])
    for index, tree in enumerate(args.tree):
        mean = statistics.mean(figures[index])
        print(f"mean {tree}: {mean:,.0f} instructions/request" + (f"  {_delta(mean, reference)}" if index else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
