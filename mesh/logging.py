"""Log observers for twistd's ``--logger`` option.

``twistd -n --logger=mesh.logging.json_observer mesh-proxy ...`` writes one
JSON object per log event (twisted.logger's structured format) instead of
text lines, where twistd would have written its text: standard output in the
foreground (``-n``), else ``--logfile`` (default ``twistd.log``), since a
daemon has no standard output.
"""

import sys

from twisted.logger import jsonFileLogObserver
from twisted.python.logfile import LogFile

#: The file json_observer writes to; None: standard output.  Set by :func:`follow_twistd`.
_logfile = None


def follow_twistd(server_options) -> None:
    """Make :func:`json_observer` write where twistd writes its own log, given twistd's options.

    The ``makeService`` of mesh-proxy and mesh-control calls this: twistd
    builds the application before it calls the ``--logger`` factory, which is
    given no arguments.  ``server_options`` None (no twistd) leaves stdout.
    """
    global _logfile
    if server_options is None:
        return
    name = server_options["logfile"]
    foreground = server_options["nodaemon"]
    _logfile = None if name == "-" or (foreground and not name) else (name or "twistd.log")


def json_observer():
    """A twisted.logger observer writing JSON lines to stdout, or to twistd's log file when daemonized."""
    stream = sys.stdout if _logfile is None else LogFile.fromFullPath(_logfile)
    return jsonFileLogObserver(stream, recordSeparator="")
