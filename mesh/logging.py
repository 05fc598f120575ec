"""Log observers for twistd's ``--logger`` option.

``twistd -n --logger=mesh.logging.json_observer mesh-proxy ...`` writes one
JSON object per log event (twisted.logger's structured format) to stdout
instead of text lines.
"""

import sys

from twisted.logger import jsonFileLogObserver


def json_observer():
    """A twisted.logger observer writing JSON lines to stdout."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
