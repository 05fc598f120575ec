"""Kubernetes integration of the control plane (``mesh-control --kubernetes``).

The ``kubernetes`` client package is imported only inside this package, and
only when ``--kubernetes`` is given: a control plane outside Kubernetes never
loads it.
"""
