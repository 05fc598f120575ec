"""h2's connection as both HTTP/2 codecs use it: without formatting every received frame.

h2's ``H2Connection._receive_frame`` starts with
``self.config.logger.trace("Received frame: %s", repr(frame))``: the ``repr`` runs whatever the
logger does with it, and h2's default logger (``DummyLogger``, the codecs' one) does nothing.
That ``repr`` was about 72 k instructions per request in ``bench.h2floor``.
"""

from __future__ import annotations

from h2.config import DummyLogger
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import RstStreamFrame


class MeshH2Connection(H2Connection):
    """An ``H2Connection`` whose received frames are formatted only for a logger that writes them.

    :meth:`_receive_frame` is h2 4.x's, statement for statement (the dispatch and the handling of
    frames for closed and reset streams), minus the trace line's ``repr`` when the configuration's
    logger is h2's ``DummyLogger``; with any other logger it is h2's own.
    """

    def _receive_frame(self, frame):
        if type(self.config.logger) is not DummyLogger:
            return super()._receive_frame(frame)
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: a stream error, answered with RST_STREAM; otherwise a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A closed (and maybe forgotten) stream: after RST_STREAM a stream error, after END_STREAM a
            # connection error (STREAM_CLOSED), closed implicitly a connection error (PROTOCOL_ERROR).
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events
