"""Twisted's TLS transport, moving bytes through the memory BIOs without pyOpenSSL's wrappers.

Twisted's ``TLSMemoryBIOProtocol`` reads decrypted data with pyOpenSSL's
``Connection.recv`` until it raises ``WantReadError``, then reads the bytes to
send with ``Connection.bio_read`` until that raises ``WantReadError`` too: two
raised and caught exceptions (plus a fresh 32 KiB buffer per call) on every
read event, the normal way out of each loop.  And each ``send`` and
``bio_write`` goes through pyOpenSSL's checks (text or bytes, the callback
helpers, ``SSL_get_error`` even after a success).  :class:`LeanTLSTransport`
makes the same OpenSSL calls itself (``BIO_write``, ``SSL_read``,
``SSL_write``, ``BIO_read``, ``SSL_get_error``), through the binding pyOpenSSL
uses, and leaves the loops on "want read" without raising; every other
outcome goes through pyOpenSSL's own error translation and Twisted's
handling, unchanged.  The ``SSL`` and BIO pointers are looked up once per
connection, and ``bytes`` go to OpenSSL as they are (no ``ffi.from_buffer``).
The handshake, the certificate checks and everything else stay Twisted's and
pyOpenSSL's.

It relies on pyOpenSSL's binding (``OpenSSL._util``) and on a few private
attributes of ``OpenSSL.SSL.Connection``; :func:`lean_tls` uses it only when
they are there, and Twisted's own transport otherwise.

It also carries a half-close, which Twisted's transport cannot, for a protocol
that asks for it (:class:`IHalfCloseOverTLS`: the mesh's TCP tunnels) over TLS
1.3 (RFC 8446, section 6.1: a close_notify closes only its sender's write side).
``loseWriteConnection`` sends close_notify and goes on reading; the peer's
close_notify is the protocol's ``readConnectionLost``, and the connection
closes (TCP included) once both sides have sent theirs.  The TCP connection
under it stays open both ways until then.  Any other protocol, TLS 1.2, and
Twisted's transport keep Twisted's behaviour: a close_notify received ends
the connection, and ``loseWriteConnection`` half-closes the TCP connection
under TLS (which the peer takes for the end of the connection).
"""

from __future__ import annotations

from OpenSSL.SSL import TLS1_3_VERSION, TLS_METHOD, Connection, Context, Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
    from twisted.protocols.tls import _NullAggregator

    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _probe = Connection(Context(TLS_METHOD), None)
    _AVAILABLE = all(hasattr(_lib, name) for name in ("SSL_read", "SSL_write", "SSL_get_error", "BIO_read",
                                                      "BIO_write", "BIO_should_retry")) \
        and all(hasattr(_probe, name) for name in ("_ssl", "_from_ssl", "_into_ssl", "_raise_ssl_error",
                                                   "_handle_bio_errors")) \
        and all(hasattr(_probe._context, name) for name in ("_verify_helper", "_alpn_select_helper", "_ocsp_helper"))
    del _probe
except (ImportError, AttributeError):  # another pyOpenSSL: Twisted's transport is used
    _AVAILABLE = False

log = Logger()
#: Whether :func:`lean_tls` has logged that Twisted's transport is used instead (once per process).
_fallback_told = False
#: The most one read takes, as Twisted's loops (2**15).
_READ_SIZE = 2 ** 15
#: The most one ``SSL_write`` takes, as Twisted's ``_write`` (a TLS record's payload).
_RECORD_SIZE = 2 ** 14
#: The C buffer every read goes through: the reactor runs one read at a time, and each read's
#: bytes are copied out before anything else runs.
_BUFFER = _ffi.new("char[]", _READ_SIZE) if _AVAILABLE else None


class IHalfCloseOverTLS(IHalfCloseableProtocol):
    """A protocol that takes the peer's TLS 1.3 close_notify as a half-close (``readConnectionLost``), and whose
    ``transport.loseWriteConnection()`` is one (a close_notify), over :class:`LeanTLSTransport`."""


class LeanTLSTransport(BufferingTLSTransport):
    """Twisted's ``BufferingTLSTransport`` calling OpenSSL directly on its hot paths, and carrying a
    half-close for an :class:`IHalfCloseOverTLS` protocol over TLS 1.3 (see the module docstring)."""

    _writeClosed = False  # loseWriteConnection sent close_notify (or will, once buffered writes are out)
    _readClosed = False  # the peer's close_notify was passed on as readConnectionLost
    _lean = None  # (Connection, its SSL, receive BIO, send BIO): see _bind

    def loseWriteConnection(self):
        """Half-close: close_notify after the pending writes, then only read; the connection closes once the
        peer's close_notify has come too.  Without a half-close (see the module docstring), the TCP
        connection's ``loseWriteConnection``, as Twisted's transport does."""
        if not self._halfCloses():
            self.transport.loseWriteConnection()
            return
        if self._writeClosed or self.disconnecting:
            return
        self._writeClosed = True
        self._aggregator.close()  # the gathered writes go first
        self._aggregator = _NullAggregator()  # writes after the close_notify are dropped (OpenSSL refuses them)
        self.write = self._aggregator.write
        if not self._appSendBuffer:
            self._shutdownTLS()  # close_notify; if the peer's came already, the TCP connection closes too

    def loseConnection(self):
        """Close (Twisted's ``loseConnection``).  Carrying half-closes, close_notify and the TCP connection closes
        at once: the peer takes a close_notify for a half-close, and may send its own only when its side is done."""
        if not self.disconnecting and self._halfCloses():
            self.loseWriteConnection()
            if not self._appSendBuffer:
                self.transport.loseConnection()
        super().loseConnection()

    def _unbufferPendingWrites(self):
        super()._unbufferPendingWrites()
        if self._writeClosed and not self._appSendBuffer and not self.disconnecting:
            self._shutdownTLS()  # the close_notify loseWriteConnection held back

    def _halfCloses(self) -> bool:
        """Whether this connection carries half-closes: a TLS 1.3 session of an :class:`IHalfCloseOverTLS`."""
        return (self._handshakeDone and not self._lostTLSConnection
                and IHalfCloseOverTLS.providedBy(self.wrappedProtocol)
                and self._tlsConnection.get_protocol_version() == TLS1_3_VERSION)

    def _peerClosedWrite(self) -> bool:
        """The peer sent close_notify: pass it on as a half-close (True) or let Twisted end the connection (False:
        this connection carries no half-close, or its own close_notify went already).  Once passed on, nothing
        more is read (:meth:`dataReceived`), so this runs at most once with True."""
        if self._writeClosed or not self._halfCloses():
            return False
        self._readClosed = True
        self.wrappedProtocol.readConnectionLost()
        return True

    def dataReceived(self, bytes):
        """Put received bytes into the receive BIO, then as ``TLSMemoryBIOProtocol.dataReceived``.

        After the peer's close_notify was passed on as a half-close, received bytes are dropped (RFC 8446
        section 6.1: data after a closure alert is ignored); kept, they would pile up in the BIO unread.
        """
        if self._readClosed:
            return
        connection, ssl, into_ssl, from_ssl = self._lean or self._bind()
        data = _c_bytes(bytes)
        result = _lib.BIO_write(into_ssl, data, len(data))
        if result <= 0:  # what Connection.bio_write raises
            connection._handle_bio_errors(into_ssl, result)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _bind(self) -> tuple:
        """The TLS connection and its ``SSL`` and BIO pointers, looked up once per connection (an attribute of this
        transport or of a pyOpenSSL ``Connection`` goes through their ``__getattr__`` hooks: dear on every read)."""
        connection = self._tlsConnection
        self._lean = lean = (connection, connection._ssl, connection._into_ssl, connection._from_ssl)
        return lean

    def connectionLost(self, reason):
        """Twisted's, then the pointers of :meth:`_bind` dropped too: they hold the ``Connection``, whose app data
        is this transport, so keeping them would leave the pair to the cyclic collector (Twisted breaks it)."""
        super().connectionLost(reason)
        self._lean = None

    def _write(self, bytes):
        """Encrypt application bytes and send the records (``TLSMemoryBIOProtocol._write``)."""
        if self._lostTLSConnection:
            return
        connection, ssl, into_ssl, from_ssl = self._lean or self._bind()
        sent_so_far = 0
        while sent_so_far < len(bytes):
            chunk = bytes[sent_so_far:sent_so_far + _RECORD_SIZE]
            data = _c_bytes(chunk)
            sent = _lib.SSL_write(ssl, data, len(data))
            if sent <= 0 or not _no_callback_problem(connection):
                try:
                    connection._raise_ssl_error(ssl, sent)  # what Connection.send raises here
                except WantReadError:
                    self._bufferedWrite(bytes[sent_so_far:])
                    break
                except Error:
                    self._tlsShutdownFinished(Failure())
                    break
            sent_so_far += sent
            self._flushSendBIO()

    def _flushSendBIO(self):
        """Write what the send BIO holds to the TCP transport (``TLSMemoryBIOProtocol._flushSendBIO``)."""
        from_ssl = (self._lean or self._bind())[3]
        size = _lib.BIO_read(from_ssl, _BUFFER, _READ_SIZE)
        if size > 0:
            self.transport.write(_ffi.unpack(_BUFFER, size))
        elif not _lib.BIO_should_retry(from_ssl):  # not just empty: pyOpenSSL says what it is
            super()._flushSendBIO()

    def _flushReceiveBIO(self):
        """Deliver the decrypted data, then flush the send BIO (``TLSMemoryBIOProtocol._flushReceiveBIO``)."""
        connection, ssl, into_ssl, from_ssl = self._lean or self._bind()
        buffer = _BUFFER
        while not self._lostTLSConnection:
            size = _lib.SSL_read(ssl, buffer, _READ_SIZE)
            if size > 0:
                data = _ffi.unpack(buffer, size)
            elif _lib.SSL_get_error(ssl, size) == _WANT_READ and _no_callback_problem(connection):
                break
            else:
                try:
                    connection._raise_ssl_error(ssl, size)  # what Connection.recv raises here
                except WantReadError:
                    break
                except ZeroReturnError:
                    if self._peerClosedWrite():
                        break
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                    continue
                except Error:
                    self._tlsShutdownFinished(Failure())
                    continue
                data = b""
            if not self._aborted:
                self.wrappedProtocol.dataReceived(data)  # ProtocolWrapper.dataReceived
        self._flushSendBIO()


def _c_bytes(data):
    """``data`` for a ``void *`` argument: cffi passes a ``bytes`` object's own buffer; anything else (a
    ``bytearray``, a ``memoryview``) through ``ffi.from_buffer``."""
    return data if type(data) is bytes else _ffi.from_buffer(data)


def _no_callback_problem(connection) -> bool:
    """Whether none of pyOpenSSL's callback helpers holds an exception (which ``recv`` would raise first)."""
    context = connection._context
    verify, alpn, ocsp = context._verify_helper, context._alpn_select_helper, context._ocsp_helper
    return ((verify is None or not verify._problems) and (alpn is None or not alpn._problems)
            and (ocsp is None or not ocsp._problems))


def lean_tls(factory):
    """Make the ``TLSMemoryBIOFactory`` ``factory`` build :class:`LeanTLSTransport` (if pyOpenSSL allows); return it.

    When pyOpenSSL lacks what it needs, the factory keeps Twisted's transport, and the first call says so.
    """
    global _fallback_told
    if _AVAILABLE:
        factory.protocol = LeanTLSTransport
    elif not _fallback_told:
        _fallback_told = True
        log.warn("TLS through Twisted's own transport: this pyOpenSSL lacks the internals the lean one uses "
                 "(install the pinned version, deploy/constraints.txt). TLS costs more CPU per request, and a "
                 "TCP half-close over the mesh mTLS hop ends the whole connection.")
    return factory

