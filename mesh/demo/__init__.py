"""Demo workloads: the real HTTP application used by ``meshctl demo`` and the integration tests.

:mod:`mesh.demo.app` is a small HTTP/1.1 + WebSocket server; run it with
``python -m mesh.demo.app --name NAME --port N``.
"""
