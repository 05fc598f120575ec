"""A TCP forwarder on loopback that a test can cut and splice: a network partition between two processes.

``Cable(target_port).start()`` listens on a free port of 127.0.0.1 and forwards every connection to
``127.0.0.1:target_port``.  :meth:`Cable.cut` closes every forwarded connection and, until
:meth:`Cable.splice`, closes new ones as soon as they are accepted -- the client sees its connection
dropped while the server stays up and reachable for the test itself (e.g. to change objects on a test
API server while a control plane cannot see it).
"""

from __future__ import annotations

import socket
import threading

from .net import free_port


class Cable:
    """A cuttable TCP forwarder ``127.0.0.1:port`` -> ``127.0.0.1:target_port`` (threads, plain sockets)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port("127.0.0.1")
        self.connected = True
        self.dropped = 0  # connections closed by cut() or refused while cut
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = None

    def start(self) -> Cable:
        """Listen and forward (returns self)."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, name=f"cable-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cut()

    def cut(self) -> None:
        """Drop every forwarded connection and every new one until :meth:`splice`."""
        with self._lock:
            self.connected = False
            sockets, self._sockets = list(self._sockets), set()
        self.dropped += len(sockets) // 2
        for sock in sockets:
            _close(sock)

    def splice(self) -> None:
        """Forward new connections again."""
        self.connected = True

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.connected:
                self.dropped += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets -= {source, sink}
            _close(sink)
            _close(source)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
