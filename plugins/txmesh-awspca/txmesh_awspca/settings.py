"""The plugin's command-line options (``twistd mesh-control --awspca-...``) and their checked form.

:data:`OPTIONS` is what ``mesh_addoption`` adds; :meth:`PcaSettings.from_options` turns the parsed
values into one frozen object once ``--ca awspca`` selected AWS Private CA, or raises
:class:`SettingsError` naming the option to fix.  There is no credential option: boto3's standard
chain finds them (environment, web identity token / IRSA, instance profile).

Nothing here imports boto3: every sidecar loads the plugin (and stays idle), so only the control
plane that selected AWS Private CA pays for importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from mesh.api import PluginConfigError, seconds_option

#: ``arn:PARTITION:acm-pca:REGION:ACCOUNT:certificate-authority/ID``
CA_ARN = re.compile(r"arn:(?P<partition>aws[a-z-]*):acm-pca:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                    r"certificate-authority/(?P<id>[0-9A-Za-z-]+)")
#: ``arn:PARTITION:acm-pca:::template/NAME/VN``: AWS's predefined certificate templates.
TEMPLATE_ARN = re.compile(r"arn:aws[a-z-]*:acm-pca:::template/(?P<name>[A-Za-z_]+)/V\d+")
#: The end-entity template that takes the SPIFFE URI SAN from the IssueCertificate call (ApiPassthrough).
DEFAULT_TEMPLATE = "EndEntityCertificate_APIPassthrough/V1"
#: Signing algorithms of IssueCertificate, by the key family of the CA (its KeyAlgorithm's prefix).
SIGNING_ALGORITHMS = {
    "RSA": ("SHA256WITHRSA", "SHA384WITHRSA", "SHA512WITHRSA",
            "SHA256WITHRSA_PSS", "SHA384WITHRSA_PSS", "SHA512WITHRSA_PSS"),
    "EC": ("SHA256WITHECDSA", "SHA384WITHECDSA", "SHA512WITHECDSA"),
    "SM2": ("SM3WITHSM2",),
}
RETRY_MODES = ("standard", "adaptive")


class SettingsError(PluginConfigError):
    """An option is missing or inconsistent: the message names it and says what to give."""


def count(low: int, high: int):
    """A coercer of whole numbers from ``low`` to ``high``."""

    def coerce(value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(f"{value!r}: give a whole number from {low} to {high}")
        return int(value)

    return coerce


def signing_algorithm(value: str) -> str:
    """One of IssueCertificate's signing algorithms (``SHA256WITHECDSA``, ``SHA256WITHRSA``, ...)."""
    upper = value.strip().upper()
    if not any(upper in names for names in SIGNING_ALGORITHMS.values()):
        names = ", ".join(name for family in SIGNING_ALGORITHMS.values() for name in family)
        raise ValueError(f"{value!r}: give one of {names} (or leave it out: the CA's own algorithm)")
    return upper


def retry_mode(value: str) -> str:
    """botocore's retry mode: ``standard`` or ``adaptive`` (client-side rate limiting too)."""
    if value not in RETRY_MODES:
        raise ValueError(f"{value!r}: give one of {', '.join(RETRY_MODES)}")
    return value


def key_family(key_algorithm: str) -> str:
    """``RSA``, ``EC`` or ``SM2`` for a CA's KeyAlgorithm (``RSA_2048``, ``EC_prime256v1``, ``SM2``)."""
    return key_algorithm.split("_", 1)[0]


def choose_signing_algorithm(configured: str | None, key_algorithm: str, ca_algorithm: str | None) -> str:
    """The SigningAlgorithm of IssueCertificate for a CA whose key is ``key_algorithm``.

    ``configured`` (``--awspca-signing-algorithm``) when given, else the CA's own (``ca_algorithm``, from
    DescribeCertificateAuthority: AWS made it match the key), else the SHA-256 one of the key's family.

    :raises SettingsError: when ``configured`` cannot sign with that key, or the key is one txmesh does
        not know.
    """
    family = SIGNING_ALGORITHMS.get(key_family(key_algorithm))
    if family is None:
        raise SettingsError(f"the CA's key is {key_algorithm}, which txmesh cannot sign workloads with: use a CA "
                            "with an RSA or EC key")
    if configured is not None:
        if configured not in family:
            raise SettingsError(f"--awspca-signing-algorithm {configured} cannot sign with the CA's {key_algorithm} "
                                f"key: give one of {', '.join(family)}, or leave it out (the CA's own algorithm)")
        return configured
    return ca_algorithm if ca_algorithm in family else family[0]


class Option(NamedTuple):
    """One ``--awspca-...`` option of mesh-control (see :meth:`mesh.api.OptionParser.addoption`)."""

    name: str
    default: Any
    help: str
    coerce: Any = None


#: Every option the plugin adds to ``twistd mesh-control``, in ``--help`` order.
OPTIONS = (
    Option("awspca-arn", None, "With --ca awspca: ARN of the AWS Private CA that signs workload certificates "
           "(arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)."),
    Option("awspca-region", None, "AWS region of the CA (default: the region in --awspca-arn)."),
    Option("awspca-template-arn", None, "End-entity certificate template (default: "
           f"arn:aws:acm-pca:::template/{DEFAULT_TEMPLATE}, which takes the SPIFFE URI SAN from the call)."),
    Option("awspca-signing-algorithm", None, "IssueCertificate's signing algorithm (default: the CA's own, which "
           "matches its key, read with DescribeCertificateAuthority).", signing_algorithm),
    Option("awspca-timeout", 10.0, "Seconds one CSR may wait for AWS (IssueCertificate, then GetCertificate until "
           "issued, retries included); longer is answered 503.", seconds_option),
    Option("awspca-retry-mode", "standard", "botocore's retry mode for throttling and transient errors: standard "
           "(exponential backoff with jitter) or adaptive (also rate-limits on the client).", retry_mode),
    Option("awspca-max-attempts", 4, "Attempts per AWS call, the first included (botocore's max_attempts).",
           count(1, 10)),
    Option("awspca-refresh-interval", 30.0, "Seconds between two reads of the CA's state and certificate (the "
           "trust bundle); 2 s at most while the CA is not ready.", seconds_option),
    Option("awspca-concurrency", 8, "AWS calls in flight at once (threads); more CSRs wait their turn.",
           count(1, 64)),
)


@dataclass(frozen=True)
class PcaSettings:
    """The checked options: which CA, where, and how the calls are bounded."""

    arn: str
    region: str
    template_arn: str
    signing_algorithm: str | None = None
    timeout: float = 10.0
    retry_mode: str = "standard"
    max_attempts: int = 4
    refresh_interval: float = 30.0
    concurrency: int = 8

    @classmethod
    def from_options(cls, option) -> PcaSettings:
        """The settings from ``option(name)`` (:meth:`mesh.api.Config.option`), checked together.

        :raises SettingsError: naming the option to fix.
        """
        arn = (option("awspca-arn") or "").strip()
        match = CA_ARN.fullmatch(arn)
        if match is None:
            raise SettingsError("--ca awspca needs --awspca-arn, the ARN of the AWS Private CA, e.g. --awspca-arn "
                                "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/11111111-2222-3333-"
                                "4444-555555555555" if not arn else
                                f"--awspca-arn {arn!r} is not the ARN of an AWS Private CA "
                                "(arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)")
        region = option("awspca-region") or match["region"]
        if region != match["region"]:
            raise SettingsError(f"--awspca-region {region} is not the region of --awspca-arn ({match['region']}): "
                                "a CA is called in its own region; leave --awspca-region out")
        template = option("awspca-template-arn") or f"arn:{match['partition']}:acm-pca:::template/{DEFAULT_TEMPLATE}"
        template_match = TEMPLATE_ARN.fullmatch(template)
        if template_match is None or "EndEntity" not in template_match["name"]:
            raise SettingsError(f"--awspca-template-arn {template!r} is not an end-entity certificate template, e.g. "
                                f"arn:aws:acm-pca:::template/{DEFAULT_TEMPLATE}")
        return cls(arn=arn, region=region, template_arn=template,
                   signing_algorithm=option("awspca-signing-algorithm"),
                   timeout=option("awspca-timeout") or 10.0, retry_mode=option("awspca-retry-mode") or "standard",
                   max_attempts=option("awspca-max-attempts") or 4,
                   refresh_interval=option("awspca-refresh-interval") or 30.0,
                   concurrency=option("awspca-concurrency") or 8)

    @property
    def api_passthrough(self) -> bool:
        """Whether the template takes extensions from the call (``..._APIPassthrough``, ``..._APICSRPassthrough``):
        then the call names the SPIFFE URI SAN; otherwise AWS copies it from the CSR."""
        return "_API" in self.template_arn

    @property
    def issuer(self) -> str:
        """Who signs, in one line (``CAStatus.issuer``): ``awspca arn:aws:acm-pca:...``."""
        return f"awspca {self.arn}"
