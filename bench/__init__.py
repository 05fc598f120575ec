"""txmesh benchmark harness: direct nginx vs txmesh vs Envoy; run with ``python -m bench.run``."""
