"""A socket whose SO_ORIGINAL_DST the unit test chooses, for the code that reads where iptables redirected a
connection from (mesh.proxy.original_dst) without a network namespace."""

from __future__ import annotations

import socket
import struct

from mesh.proxy import original_dst as od


class RedirectedSocket(socket.socket):
    """A real socket whose SO_ORIGINAL_DST answer is ``answer`` (``(ip, port)``; None: not redirected, as the
    kernel's ENOENT), whose ``getsockname`` is ``local``, and which counts the SO_ORIGINAL_DST ``reads``."""

    answer = None
    local = ("127.0.0.1", 15001)
    reads = 0

    def getsockopt(self, level, name, size=0):
        if name == od.SO_ORIGINAL_DST and size:
            self.reads += 1
            if self.answer is None:
                raise OSError(2, "No such file or directory")
            ip, port = self.answer
            return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(ip))
        return super().getsockopt(level, name, size)

    def getsockname(self):
        return self.local
