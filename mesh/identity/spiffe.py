"""SPIFFE ids: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_ID = re.compile(rf"^spiffe://(?P<td>[a-z0-9.\-_]+)/ns/(?P<ns>{_LABEL})/sa/(?P<sa>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$")


class InvalidSpiffeId(ValueError):
    """A string is not a Kubernetes-style SPIFFE id."""


@dataclass(frozen=True)
class SpiffeId:
    """A workload identity in Istio's SPIFFE form."""

    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        match = _ID.fullmatch(uri)
        if match is None:
            raise InvalidSpiffeId(f"{uri!r} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
        return cls(match["td"], match["ns"], match["sa"])

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's principal form, as written in AuthorizationPolicy: no scheme."""
        return self.uri[len("spiffe://"):]

    def __str__(self) -> str:
        return self.uri
