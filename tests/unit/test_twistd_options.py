"""The command lines of ``twistd mesh-proxy`` and ``twistd mesh-control`` (issue #10, items 6 and 11).

- No short option of ours is also one of twistd's own (``twistd -n`` is --nodaemon; mesh-proxy's ``-n``
  was --namespace): a user who puts one on the wrong side of the subcommand gets an error, not the other.
- The per-listener connection limit fits the file-descriptor limit (:mod:`mesh.proxy.overload`).
"""

from __future__ import annotations

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from mesh.control.tap import Options as ControlOptions
from mesh.proxy.overload import FD_RESERVE, FDS_PER_CONNECTION, connection_limit
from mesh.proxy.tap import Options as ProxyOptions


def _short_options(options: usage.Options) -> set[str]:
    """The one-letter options an Options class accepts (its getopt string without the colons)."""
    return set(options.shortOpt.replace(":", ""))


@pytest.mark.parametrize("ours", [ProxyOptions, ControlOptions], ids=["mesh-proxy", "mesh-control"])
def test_no_short_option_is_also_one_of_twistds(ours):
    assert _short_options(ours()) & _short_options(ServerOptions()) == set()


def test_namespace_is_a_long_option_only():
    options = ProxyOptions()
    with pytest.raises(usage.UsageError):
        options.parseOptions(["-n", "shop", "--workload", "web", "--config-dir", "."])
    options = ProxyOptions()
    options.parseOptions(["--namespace", "shop", "--workload", "web", "--config-dir", "."])
    assert options["namespace"] == "shop"


def test_twistd_parses_its_own_n_before_the_subcommand():
    server = ServerOptions()
    server.parseOptions(["-n", "--pidfile=", "mesh-proxy", "--workload", "web", "--config-dir", "."])
    assert server["nodaemon"] and server.subOptions["namespace"] == "default"


def test_the_connection_limit_fits_the_fd_limit():
    assert connection_limit(4096, listeners=2, fd_limit=1048576) == 4096
    fitted = connection_limit(4096, listeners=2, fd_limit=4096)
    assert fitted == (4096 - FD_RESERVE) // (2 * FDS_PER_CONNECTION)
    assert 2 * FDS_PER_CONNECTION * fitted + FD_RESERVE <= 4096
    assert connection_limit(200, listeners=1, fd_limit=4096) == 200


def test_the_http2_engine_is_nghttp2_unless_told_h2():
    options = ProxyOptions()
    options.parseOptions(["--workload", "web", "--config-dir", "."])
    assert options["http2-engine"] == "nghttp2"
    options = ProxyOptions()
    options.parseOptions(["--workload", "web", "--config-dir", ".", "--http2-engine", "h2"])
    assert options["http2-engine"] == "h2"
    with pytest.raises(usage.UsageError, match="--http2-engine: one of nghttp2, nghttp2-cffi, h2"):
        ProxyOptions().parseOptions(["--workload", "web", "--config-dir", ".", "--http2-engine", "hyper"])
