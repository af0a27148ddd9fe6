"""Envoy SDS resources from a volume's identity: how the SPIRE agent resolves names, pure.

:func:`build_response` answers one ``DiscoveryRequest`` from one :class:`SdsSnapshot` the way
the SPIRE agent's SDS v3 handler does (``pkg/agent/endpoints/sdsv3``), so an Envoy (or Istio)
configured for SPIRE works unchanged against a volume's socket. Requested name -> resource:

- no names (or only empty ones): every bundle and identity under its ID name: the own trust
  domain's bundle ``spiffe://<td>``, each federated ``spiffe://<fed>`` (sorted), each SVID
  under its SPIFFE ID; never the aliases below.
- ``spiffe://<own td>``: the own trust domain's bundle as a validation context.
- ``ROOTCA`` (``default_bundle_name``): the same, named ``ROOTCA``.
- ``ALL`` (``default_all_bundles_name``): one SPIFFE validator holding the own and every
  federated bundle, sorted by name; INTERNAL ``unable to use "SPIFFE validator" on Envoy
  below 1.17`` when the trusted_ca form is in use.
- ``spiffe://<federated td>``: that trust domain's bundle, only if the SVID federates with it.
- the SPIFFE ID of one of the snapshot's SVIDs: that SVID and its key as a TlsCertificate.
- ``default`` (``default_svid_name``): the selected (first) SVID, named ``default``.
- anything else: INVALID_ARGUMENT ``workload is not authorized for the requested identities
  ["n1" "n2"]`` (the leftover names, sorted, as Go's ``%q`` prints a []string).

Resources come in that order: own bundle (ID name, then ``ROOTCA``, then ``ALL``), federated
bundles, identities. A validation context is Envoy's SPIFFE validator
(``custom_validator_config`` named ``envoy.tls.cert_validator.spiffe``, one trust domain per
bundle) unless SPIFFE validation is disabled or Envoy is older than 1.18, when it is
``trusted_ca``; see :func:`uses_spiffe_validator`. Certificates are PEM in ``inline_bytes``,
leaf first; the key is one PKCS#8 ``PRIVATE KEY`` PEM block. A requested bundle that the
snapshot lacks is NOT_FOUND (SPIFFE validator) or INTERNAL (trusted_ca) with ``no bundle found
for trust domain: "spiffe://<td>"``, as in SPIRE; with no names requested, a bundle the
snapshot lacks is left out instead.

Where SPIRE's behaviour is an accident of its code, this module does the sensible thing
(situation: SPIRE / here):

- two own-bundle names in one request (``spiffe://td`` with ``ROOTCA`` or ``ALL``): SPIRE
  leaves the second unresolved and fails with INVALID_ARGUMENT / every one is returned.
- the first SVID's SPIFFE ID and ``default`` in one request: ``default`` is left over,
  INVALID_ARGUMENT / both are returned.
- ``user_agent_build_version`` without ``version``: the agent panics (nil pointer) / the
  SPIFFE validator, as for a node without a build version.
- two SVIDs with the same SPIFFE ID and no names requested: two resources with one name /
  the first SVID only.
- federated bundles when no names are requested: Go map order (random) / sorted by name.
- more than ``max_listed_names`` unknown names: all listed / the first ones and a count.

``default_bundle_name == default_all_bundles_name`` is allowed, as in SPIRE: the bundle name
wins (a trusted_ca or one-domain validator of the own trust domain under that name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf import any_pb2

from .._proto.envoy.config.core.v3 import base_pb2, extension_pb2
from .._proto.envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from .._proto.envoy.service.discovery.v3 import discovery_pb2
from ..grpc.status import StatusCode

# The one place this package learns what an SVID is and how PEM is written.
from ..render import pem_block, pem_certificates
from ..spire.responses import X509SVID

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
"""``Any.type_url`` of every resource, and what Envoy sends as ``DiscoveryRequest.type_url``."""
SPIFFE_VALIDATOR_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)
SPIFFE_VALIDATOR_NAME = "envoy.tls.cert_validator.spiffe"
DISABLE_SPIFFE_KEY = "disable_spiffe_cert_validation"
"""Node metadata key with which one Envoy overrides ``disable_spiffe_cert_validation``."""
SPIFFE_SCHEME = "spiffe://"

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_SHOWN_NAME = 256


class SdsError(Exception):
    """The request cannot be answered: the call (a whole StreamSecrets stream) ends with
    ``code`` and ``message``. Messages name resources and trust domains only, never key
    material."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SdsSettings:
    """What the SPIRE agent's ``sds`` configuration block sets, with its defaults.

    ``max_listed_names`` bounds how many unknown names an INVALID_ARGUMENT message lists (the
    rest are counted, ``... and N more``), so a client sending thousands of names gets a
    status message of bounded size; names are cut at 256 characters for the same reason.
    """

    default_svid_name: str = "default"
    default_bundle_name: str = "ROOTCA"
    default_all_bundles_name: str = "ALL"
    disable_spiffe_cert_validation: bool = False
    max_listed_names: int = 16

    def __post_init__(self) -> None:
        if self.max_listed_names < 1:
            raise ValueError(f"max_listed_names must be at least 1, got {self.max_listed_names}")


@dataclass(frozen=True)
class SdsSnapshot:
    """Everything SDS may hand out for one volume at one moment.

    ``svids``: the volume's SVIDs, the selected one (``default``) first. ``bundles``: bare
    trust domain name -> its CA certificates (DER); only the entries for
    ``own_trust_domain`` and ``federated`` are ever used. ``own_trust_domain``: the bare
    name of the selected SVID's trust domain. ``federated``: the trust domains the SVID
    federates with and the volume's policy allows (never the own one; duplicates and the
    own name are dropped here). Equal snapshots serve the same content; for those made by
    :func:`snapshot_of` (which keeps only the bundles SDS may serve) the converse holds too,
    so comparing snapshots tells whether Envoy needs a push.
    """

    svids: tuple[X509SVID, ...]
    bundles: Mapping[str, tuple[bytes, ...]] = field(hash=False)
    own_trust_domain: str
    federated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        own = self.own_trust_domain
        if not own or own.startswith(SPIFFE_SCHEME) or "/" in own:
            raise ValueError(
                f"own_trust_domain must be a bare trust domain name such as example.org, "
                f"got {own[:_SHOWN_NAME]!r}"
            )
        object.__setattr__(self, "svids", tuple(self.svids))
        federated = tuple(td for td in dict.fromkeys(self.federated) if td != own)
        object.__setattr__(self, "federated", federated)
        frozen = {td: tuple(certs) for td, certs in self.bundles.items()}
        object.__setattr__(self, "bundles", MappingProxyType(frozen))


def snapshot_of(
    svids: Sequence[X509SVID],
    federates_with: Iterable[str],
    x509_bundles: Mapping[str, Sequence[bytes]],
) -> SdsSnapshot | None:
    """The snapshot for a volume whose SVIDs (selected first) and federation are known, or
    None while it cannot be served yet: no SVID, or no bundle for the selected SVID's trust
    domain. Only the bundles SDS may serve are kept, so a change to an unrelated trust
    domain's bundle leaves the snapshot equal (and the SDS version unchanged)."""
    if not svids:
        return None
    own = svids[0].trust_domain
    if not x509_bundles.get(own):
        return None
    federated = tuple(sorted({td for td in federates_with if td != own}))
    kept = {td: tuple(x509_bundles[td]) for td in (own, *federated) if x509_bundles.get(td)}
    return SdsSnapshot(tuple(svids), kept, own, federated)


# Which validation context Envoy gets -------------------------------------------------------


def uses_spiffe_validator(node: base_pb2.Node | None, settings: SdsSettings) -> bool:
    """True for Envoy's SPIFFE validator, False for plain ``trusted_ca``.

    The SPIFFE validator needs Envoy 1.18 or later: a node whose
    ``user_agent_build_version.version`` is older gets ``trusted_ca``; a node without a build
    version (or without a node) is assumed recent, as SPIRE does, and so is a build version
    without its ``version`` (where SPIRE would crash). ``disable_spiffe_cert_validation``
    comes from the settings unless the node's metadata overrides it with a bool or a string
    Go's ``strconv.ParseBool`` accepts; any other value there is ignored.
    """
    return _supports_spiffe(node) and not _spiffe_disabled(node, settings)


def _supports_spiffe(node: base_pb2.Node | None) -> bool:
    if node is None or node.WhichOneof("user_agent_version_type") != "user_agent_build_version":
        return True
    build = node.user_agent_build_version
    if not build.HasField("version"):
        return True
    major, minor = build.version.major_number, build.version.minor_number
    return (major == 1 and minor > 17) or major > 1


def _spiffe_disabled(node: base_pb2.Node | None, settings: SdsSettings) -> bool:
    disabled = settings.disable_spiffe_cert_validation
    if node is None or not node.HasField("metadata"):
        return disabled
    fields = node.metadata.fields
    if DISABLE_SPIFFE_KEY not in fields:  # indexing a missing key would insert it
        return disabled
    value = fields[DISABLE_SPIFFE_KEY]
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        parsed = go_parse_bool(value.string_value)
        if parsed is not None:
            return parsed
    return disabled


def go_parse_bool(text: str) -> bool | None:
    """Go's ``strconv.ParseBool``: the value, or None where Go returns an error."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    return None


# Building the response ---------------------------------------------------------------------


def build_response(
    request: discovery_pb2.DiscoveryRequest,
    snapshot: SdsSnapshot,
    *,
    version_info: str,
    nonce: str,
    settings: SdsSettings,
) -> discovery_pb2.DiscoveryResponse:
    """The response to ``request`` (its names, its node) from ``snapshot``; see the module
    docstring for the resolution. ``type_url`` is echoed, as SPIRE does. Raises
    :class:`SdsError` when a name cannot be served; nothing is partially answered."""
    names = dict.fromkeys(name for name in request.resource_names if name)
    every = not names
    node = request.node if request.HasField("node") else None
    validation = _Validation(snapshot, uses_spiffe_validator(node, settings))
    resources: list[any_pb2.Any] = []

    own_id = SPIFFE_SCHEME + snapshot.own_trust_domain
    if own_id in names or (every and snapshot.bundles.get(snapshot.own_trust_domain)):
        resources.append(validation.one(own_id, snapshot.own_trust_domain))
        names.pop(own_id, None)
    if settings.default_bundle_name in names:
        resources.append(validation.one(settings.default_bundle_name, snapshot.own_trust_domain))
        del names[settings.default_bundle_name]
    if settings.default_all_bundles_name in names:
        resources.append(validation.all(settings.default_all_bundles_name))
        del names[settings.default_all_bundles_name]

    for td in sorted(snapshot.federated):
        td_id = SPIFFE_SCHEME + td
        if td_id in names or (every and snapshot.bundles.get(td)):
            resources.append(validation.one(td_id, td))
            names.pop(td_id, None)

    seen: set[str] = set()
    for index, svid in enumerate(snapshot.svids):
        if svid.spiffe_id not in seen and (every or svid.spiffe_id in names):
            resources.append(_tls_certificate(svid.spiffe_id, svid))
            names.pop(svid.spiffe_id, None)
        seen.add(svid.spiffe_id)
        if index == 0 and settings.default_svid_name in names:
            resources.append(_tls_certificate(settings.default_svid_name, svid))
            del names[settings.default_svid_name]

    if names:
        raise SdsError(
            StatusCode.INVALID_ARGUMENT,
            "workload is not authorized for the requested identities "
            + _go_quoted_list(sorted(names), settings.max_listed_names),
        )
    response = discovery_pb2.DiscoveryResponse(
        version_info=version_info, type_url=request.type_url, nonce=nonce
    )
    response.resources.extend(resources)
    return response


def fetch_response(
    request: discovery_pb2.DiscoveryRequest, snapshot: SdsSnapshot, settings: SdsSettings
) -> discovery_pb2.DiscoveryResponse:
    """FetchSecrets' answer: as a stream's, but with empty ``version_info`` and no nonce."""
    return build_response(request, snapshot, version_info="", nonce="", settings=settings)


class _Validation:
    """Validation contexts from the snapshot's bundles, as SPIFFE validator or trusted_ca."""

    def __init__(self, snapshot: SdsSnapshot, spiffe: bool) -> None:
        self._snapshot = snapshot
        self._spiffe = spiffe

    def one(self, name: str, trust_domain: str) -> any_pb2.Any:
        """One trust domain's bundle as the validation context named ``name``."""
        certs = self._bundle(trust_domain)
        context = common_pb2.CertificateValidationContext()
        if self._spiffe:
            context.custom_validator_config.CopyFrom(_spiffe_validator([(trust_domain, certs)]))
        else:
            context.trusted_ca.inline_bytes = pem_certificates(certs)
        return _secret(secret_pb2.Secret(name=name, validation_context=context))

    def all(self, name: str) -> any_pb2.Any:
        """The own and every federated bundle in one SPIFFE validator, sorted by name."""
        if not self._spiffe:
            raise SdsError(
                StatusCode.INTERNAL, 'unable to use "SPIFFE validator" on Envoy below 1.17'
            )
        snapshot = self._snapshot
        domains = [snapshot.own_trust_domain, *snapshot.federated]
        present = sorted(td for td in domains if snapshot.bundles.get(td))
        if snapshot.own_trust_domain not in present:
            self._bundle(snapshot.own_trust_domain)  # raises: the own bundle is missing
        bundles = [(td, snapshot.bundles[td]) for td in present]
        context = common_pb2.CertificateValidationContext()
        context.custom_validator_config.CopyFrom(_spiffe_validator(bundles))
        return _secret(secret_pb2.Secret(name=name, validation_context=context))

    def _bundle(self, trust_domain: str) -> tuple[bytes, ...]:
        certs = self._snapshot.bundles.get(trust_domain)
        if not certs:
            code = StatusCode.NOT_FOUND if self._spiffe else StatusCode.INTERNAL
            raise SdsError(
                code, f"no bundle found for trust domain: {go_quote(SPIFFE_SCHEME + trust_domain)}"
            )
        return certs


def _spiffe_validator(
    bundles: Sequence[tuple[str, Sequence[bytes]]],
) -> extension_pb2.TypedExtensionConfig:
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    for trust_domain, certs in bundles:
        entry = config.trust_domains.add(name=trust_domain)
        entry.trust_bundle.inline_bytes = pem_certificates(certs)
    typed = any_pb2.Any()
    typed.Pack(config, deterministic=True)
    return extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR_NAME, typed_config=typed)


def _tls_certificate(name: str, svid: X509SVID) -> any_pb2.Any:
    certificate = common_pb2.TlsCertificate()
    certificate.certificate_chain.inline_bytes = pem_certificates(svid.cert_chain)
    certificate.private_key.inline_bytes = pem_block("PRIVATE KEY", svid.key_pkcs8_der)
    return _secret(secret_pb2.Secret(name=name, tls_certificate=certificate))


def _secret(secret: secret_pb2.Secret) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(secret, deterministic=True)
    return packed


# Go's %q -------------------------------------------------------------------------------------

_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """Go's ``%q`` of a string (``strconv.Quote``): double quotes, Go escapes for control
    and non-printable characters, printable Unicode as is."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _go_quoted_list(names: Sequence[str], limit: int) -> str:
    """Go's ``%q`` of a []string, ``["a" "b"]``, listing at most ``limit`` names (each cut
    at 256 characters) and counting the rest."""
    shown = [go_quote(name[:_SHOWN_NAME]) for name in names[:limit]]
    if len(names) > limit:
        shown.append(f"... and {len(names) - limit} more")
    return "[" + " ".join(shown) + "]"


__all__ = [
    "DISABLE_SPIFFE_KEY",
    "SECRET_TYPE_URL",
    "SPIFFE_VALIDATOR_NAME",
    "SPIFFE_VALIDATOR_TYPE_URL",
    "SdsError",
    "SdsSettings",
    "SdsSnapshot",
    "build_response",
    "fetch_response",
    "go_parse_bool",
    "go_quote",
    "snapshot_of",
    "uses_spiffe_validator",
]
