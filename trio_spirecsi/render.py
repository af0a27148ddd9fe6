"""From what the SPIRE agent sends to the files a volume holds: pure functions.

Everything that comes from the agent is validated here before it can reach a pod: a
chain that does not parse, a leaf whose SPIFFE ID differs from the one the agent named,
or a key that does not belong to the leaf is a :class:`RenderError`, never a file. No
message built here contains key material or tokens.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from .errors import RenderError
from .storage.writer import FileContent
from .volumes.attributes import (
    CREDENTIAL_BUNDLE_FILE,
    FEDERATED_BUNDLE_SUFFIX,
    LABEL_MAX,
    TRUST_BUNDLE_SUFFIX,
    VolumeSpec,
    file_name_problem,
    spiffe_id_problem,
    trust_domain_problem,
    with_label,
)

_CRYPTO_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,  # an Exception, not a ValueError: a certificate claiming v2
)
_LABEL = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{LABEL_MAX - 1}}}")
_JWT = re.compile(r"[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]*)+")
_EMPTY_TOKENS: Mapping[tuple[str, ...], str] = MappingProxyType({})
_EMPTY_BUNDLES: Mapping[str, bytes] = MappingProxyType({})


@dataclass(frozen=True)
class X509SVID:
    """One X.509-SVID, validated: the chain parses, the leaf's only URI SAN is
    ``spiffe_id`` and the key belongs to the leaf."""

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    """DER certificates, leaf first."""
    key_pkcs8_der: bytes = field(repr=False)
    expires_at: int
    """The leaf's notAfter, unix seconds."""
    hint: str = ""

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id[len("spiffe://") :].partition("/")[0]


@dataclass(frozen=True)
class X509Update:
    """One SubscribeToX509SVIDs response: the pod's SVIDs (possibly none) and the trust
    domains they federate with (normalised names, sorted, no duplicates)."""

    svids: tuple[X509SVID, ...]
    federates_with: tuple[str, ...] = ()


# Agent responses -----------------------------------------------------------------


def normalise_trust_domain(name: str) -> str:
    """``spiffe://example.org`` and ``example.org`` -> ``example.org``; the agent uses
    the first form although its proto says "trust domain name"."""
    bare = name[len("spiffe://") :] if name.startswith("spiffe://") else name
    problem = trust_domain_problem(bare)
    if problem is not None:
        raise RenderError(problem)
    return bare


def split_der(data: bytes) -> tuple[bytes, ...]:
    """Split concatenated DER structures (how the agent sends a bundle) into each one."""
    parts: list[bytes] = []
    at = 0
    while at < len(data):
        if data[at] != 0x30 or at + 1 >= len(data):
            raise RenderError("not a sequence of DER certificates")
        first = data[at + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            size = first & 0x7F
            if size == 0 or size > 4 or at + 2 + size > len(data):
                raise RenderError("not a sequence of DER certificates (bad length)")
            header, length = 2 + size, int.from_bytes(data[at + 2 : at + 2 + size], "big")
        end = at + header + length
        if end > len(data):
            raise RenderError("not a sequence of DER certificates (truncated)")
        parts.append(data[at:end])
        at = end
    return tuple(parts)


def x509_from_response(resp: di.SubscribeToX509SVIDsResponse) -> X509Update:
    """Validate every SVID of a response; zero SVIDs is a valid (empty) update."""
    svids = tuple(_svid_of(index, item) for index, item in enumerate(resp.x509_svids))
    federates_with = tuple(sorted({normalise_trust_domain(td) for td in resp.federates_with}))
    return X509Update(svids, federates_with)


def _svid_of(index: int, item: di.X509SVIDWithKey) -> X509SVID:
    """Validated SVIDs are cached by their bytes: an agent sends the same SVID to every pod
    of a registration entry, so a rotation is validated once, not once per volume, and the
    volumes share one copy in memory."""
    try:
        return _validated(item.SerializeToString(deterministic=True))
    except RenderError:
        return _svid(index, item)  # the same error, naming this SVID's position


@functools.lru_cache(maxsize=1024)
def _validated(serialized: bytes) -> X509SVID:
    return _svid(0, di.X509SVIDWithKey.FromString(serialized))


def _svid(index: int, item: di.X509SVIDWithKey) -> X509SVID:
    svid = item.x509_svid
    where = f"SVID {index + 1}"
    try:
        trust_domain = normalise_trust_domain(svid.id.trust_domain)
    except RenderError as exc:
        raise RenderError(f"{where} has no valid SPIFFE ID: {exc.message}") from None
    spiffe_id = f"spiffe://{trust_domain}{svid.id.path}"
    problem = spiffe_id_problem(spiffe_id)
    if svid.id.path and not svid.id.path.startswith("/"):
        problem = f"the path {svid.id.path[:200]!r} of its SPIFFE ID does not start with '/'"
    if problem is not None:
        raise RenderError(f"{where}: {problem}")
    where = f"SVID {index + 1} ({spiffe_id})"
    if not svid.cert_chain:
        raise RenderError(f"{where} has no certificates")
    chain = tuple(bytes(der) for der in svid.cert_chain)
    certs = [_certificate(der, f"{where}: certificate {n + 1}") for n, der in enumerate(chain)]
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except _CRYPTO_ERRORS:
        raise RenderError(f"{where}: the leaf certificate's extensions do not parse") from None
    if len(uris) != 1:
        raise RenderError(
            f"{where}: the leaf certificate has {len(uris)} URI SANs; an X.509-SVID has "
            "exactly one, its SPIFFE ID"
        )
    if uris[0] != spiffe_id:
        raise RenderError(
            f"{where}: the leaf certificate is for {uris[0][:200]!r}, not for the SPIFFE ID "
            "the agent named"
        )
    try:
        key = serialization.load_der_private_key(bytes(item.x509_svid_key), password=None)
        key_pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        matches = key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    except _CRYPTO_ERRORS:
        raise RenderError(f"{where}: the private key is not a PKCS#8 DER key") from None
    if not matches:
        raise RenderError(f"{where}: the private key does not belong to the leaf certificate")
    try:
        expires_at = int(leaf.not_valid_after_utc.timestamp())
    except _CRYPTO_ERRORS:
        raise RenderError(f"{where}: the leaf certificate has no valid notAfter") from None
    return X509SVID(spiffe_id, chain, key_pkcs8, expires_at, svid.hint)


def _certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except _CRYPTO_ERRORS:
        raise RenderError(f"{what} is not a DER X.509 certificate") from None


def bundles_from_response(
    resp: di.SubscribeToX509BundlesResponse,
) -> dict[str, tuple[bytes, ...]]:
    """Trust domain name -> its CA certificates (DER), each certificate parsed."""
    bundles: dict[str, tuple[bytes, ...]] = {}
    for raw in sorted(resp.ca_certificates):
        trust_domain = _bundle_key(raw, bundles)
        certs = split_der(bytes(resp.ca_certificates[raw]))
        if not certs:
            raise RenderError(f"the X.509 bundle of {trust_domain} has no certificates")
        for n, der in enumerate(certs):
            _certificate(der, f"the X.509 bundle of {trust_domain}: certificate {n + 1}")
        bundles[trust_domain] = certs
    return bundles


def jwt_bundles_from_response(resp: di.SubscribeToJWTBundlesResponse) -> dict[str, bytes]:
    """Trust domain name -> its JWKS document (JSON with a ``keys`` list), as sent."""
    bundles: dict[str, bytes] = {}
    for raw in sorted(resp.bundles):
        trust_domain = _bundle_key(raw, bundles)
        data = bytes(resp.bundles[raw])
        _jwks(data, trust_domain)
        bundles[trust_domain] = data
    return bundles


def _bundle_key(raw: str, seen: Mapping[str, object]) -> str:
    trust_domain = normalise_trust_domain(raw)
    if trust_domain in seen:
        raise RenderError(f"the agent sent two bundles for trust domain {trust_domain}")
    return trust_domain


def _jwks(data: bytes, trust_domain: str) -> dict[str, object]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise RenderError(f"the JWT bundle of {trust_domain} is not JSON") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("keys"), list)
        or not all(isinstance(k, dict) for k in document["keys"])
    ):
        raise RenderError(
            f"the JWT bundle of {trust_domain} is not a JWKS document (an object with a "
            "'keys' list of objects)"
        )
    return document


# Files -----------------------------------------------------------------------------


def select_svids(spec: VolumeSpec, update: X509Update) -> tuple[X509SVID, ...]:
    """The SVIDs a volume writes: the selected one first (the first the agent sent that
    matches ``svid-hint`` and ``spiffe-id``), then, with ``all-svids``, every other SVID
    in the agent's order."""
    if not update.svids:
        raise RenderError("the SPIRE agent sent no SVID for this pod")
    matching = [
        s
        for s in update.svids
        if (not spec.svid_hint or s.hint == spec.svid_hint)
        and (not spec.spiffe_id or s.spiffe_id == spec.spiffe_id)
    ]
    if not matching:
        wanted = " and ".join(
            part
            for part in (
                f"hint {spec.svid_hint!r}" if spec.svid_hint else "",
                f"SPIFFE ID {spec.spiffe_id}" if spec.spiffe_id else "",
            )
            if part
        )
        sent = ", ".join(f"{s.spiffe_id} (hint {s.hint!r})" for s in update.svids)
        raise RenderError(f"no SVID with {wanted}; the SPIRE agent sent: {sent}")
    primary = matching[0]
    if not spec.all_svids:
        return (primary,)
    return (primary, *(s for s in update.svids if s is not primary))


def svid_labels(svids: Sequence[X509SVID]) -> tuple[str, ...]:
    """What ``all-svids`` puts into each SVID's file names: the hints, when every SVID
    has a distinct hint that is a safe file name part (letters, digits, ``.``, ``-``,
    ``_``, at most 64, not starting with ``.``); otherwise the 0-based positions."""
    hints = [s.hint for s in svids]
    if all(_LABEL.fullmatch(h) for h in hints) and len(set(hints)) == len(hints):
        return tuple(hints)
    return tuple(str(n) for n in range(len(svids)))


def render_files(
    spec: VolumeSpec,
    update: X509Update,
    x509_bundles: Mapping[str, tuple[bytes, ...]],
    *,
    jwt_tokens: Mapping[tuple[str, ...], str] = _EMPTY_TOKENS,
    jwt_bundles: Mapping[str, bytes] = _EMPTY_BUNDLES,
) -> dict[str, FileContent]:
    """Every file the volume should contain, name -> content (the complete set).

    ``x509_bundles`` and ``jwt_bundles`` are keyed by normalised trust domain name (as
    :func:`bundles_from_response` returns them); ``jwt_tokens`` by audience set as in
    ``spec.jwt_audiences``. Raises :class:`RenderError` when the update has no SVID
    matching the selection, a needed bundle or token has not arrived, or two files
    would get the same name.
    """
    written = select_svids(spec, update)
    primary = written[0]
    federated = (
        tuple(td for td in update.federates_with if td != primary.trust_domain)
        if spec.federated_bundles != "none"
        else ()
    )
    files = _Files(spec)
    labeled: tuple[tuple[X509SVID, str], ...] = ()
    if spec.all_svids:
        labeled = tuple(zip(update.svids, svid_labels(update.svids), strict=True))

    if spec.layout == "default":
        _default_layout(files, spec, primary, labeled, federated, x509_bundles)
    else:
        _spiffe_fs_layout(files, spec, written, labeled, federated, x509_bundles)

    for audiences, name in spec.jwt_files().items():
        token = jwt_tokens.get(audiences)
        shown = ",".join(audiences)
        if token is None:
            raise RenderError(f"no JWT-SVID for the audiences {shown} yet")
        if not _JWT.fullmatch(token):
            raise RenderError(f"the JWT-SVID for the audiences {shown} is not a compact JWT")
        files.key(name, token.encode("ascii"))
    if spec.jwt_bundle_file is not None:
        files.cert(spec.jwt_bundle_file, _jwt_bundle_file(primary, update, spec, jwt_bundles))
    return files.contents


class _Files:
    """The volume's files being assembled; refuses invalid and duplicate names."""

    def __init__(self, spec: VolumeSpec) -> None:
        self._spec = spec
        self.contents: dict[str, FileContent] = {}

    def cert(self, name: str, data: bytes) -> None:
        self._add(name, FileContent(data, self._spec.cert_file_mode))

    def key(self, name: str, data: bytes) -> None:
        self._add(name, FileContent(data, self._spec.key_file_mode))

    def _add(self, name: str, content: FileContent) -> None:
        problem = file_name_problem(name)
        if problem is not None:
            raise RenderError(f"cannot write a file named {name[:300]!r}: {problem}")
        if name in self.contents:
            raise RenderError(
                f"two files of this volume would be named {name!r}; choose other file names "
                "in the volume attributes"
            )
        self.contents[name] = content


def _default_layout(
    files: _Files,
    spec: VolumeSpec,
    primary: X509SVID,
    labeled: Sequence[tuple[X509SVID, str]],
    federated: Sequence[str],
    x509_bundles: Mapping[str, tuple[bytes, ...]],
) -> None:
    """svid-file, svid-key-file and bundle-file (once more per SVID with all-svids)."""
    names = (spec.svid_file, spec.svid_key_file, spec.bundle_file)
    merged = (
        [c for td in federated for c in x509_bundles.get(td, ())]
        if spec.federated_bundles == "merged"
        else []
    )
    for svid, label in ((primary, ""), *labeled):
        cert_name, key_name, bundle_name = (with_label(n, label) if label else n for n in names)
        files.cert(cert_name, _pem_certs(svid.cert_chain))
        files.key(key_name, _key_pem(svid, spec))
        own = _own_bundle(svid, x509_bundles, [svid] if spec.intermediates_in_bundle else [])
        files.cert(bundle_name, _pem_certs(_unique([*own, *merged])))
    if spec.federated_bundles == "files":
        for td in federated:
            if td in x509_bundles:
                files.cert(td + FEDERATED_BUNDLE_SUFFIX, _pem_certs(x509_bundles[td]))


def _spiffe_fs_layout(
    files: _Files,
    spec: VolumeSpec,
    written: Sequence[X509SVID],
    labeled: Sequence[tuple[X509SVID, str]],
    federated: Sequence[str],
    x509_bundles: Mapping[str, tuple[bytes, ...]],
) -> None:
    """credential-bundle.pem (per SVID with all-svids) and one trust bundle file per
    trust domain: those of the written SVIDs, then the federated ones."""
    files.key(CREDENTIAL_BUNDLE_FILE, _credential_bundle(written[0]))
    for svid, label in labeled:
        files.key(with_label(CREDENTIAL_BUNDLE_FILE, label), _credential_bundle(svid))
    own_domains = dict.fromkeys(s.trust_domain for s in written)
    for td in own_domains:
        in_td = [s for s in written if s.trust_domain == td]
        own = _own_bundle(in_td[0], x509_bundles, in_td if spec.intermediates_in_bundle else [])
        files.cert(td + TRUST_BUNDLE_SUFFIX, _pem_certs(own))
    for td in federated:
        if td in x509_bundles and td not in own_domains:
            files.cert(td + TRUST_BUNDLE_SUFFIX, _pem_certs(x509_bundles[td]))


def _own_bundle(
    svid: X509SVID, x509_bundles: Mapping[str, tuple[bytes, ...]], with_chains: Iterable[X509SVID]
) -> list[bytes]:
    certs = x509_bundles.get(svid.trust_domain)
    if not certs:
        raise RenderError(f"the SPIRE agent has not sent the trust bundle of {svid.trust_domain}")
    return _unique([*certs, *(c for s in with_chains for c in s.cert_chain[1:])])


def _unique(certs: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(certs))


def _pem(label: str, der: bytes) -> bytes:
    text = base64.b64encode(der).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode("ascii")


def _pem_certs(certs: Iterable[bytes]) -> bytes:
    return b"".join(_pem("CERTIFICATE", der) for der in certs)


def _key_pem(svid: X509SVID, spec: VolumeSpec) -> bytes:
    if spec.key_format == "pkcs8":
        return _pem("PRIVATE KEY", svid.key_pkcs8_der)
    try:
        key = serialization.load_der_private_key(svid.key_pkcs8_der, password=None)
    except _CRYPTO_ERRORS:
        raise RenderError(f"the private key of {svid.spiffe_id} does not parse") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise RenderError(
            f"key-format traditional exists for RSA and EC keys only; the key of "
            f"{svid.spiffe_id} is neither: use key-format pkcs8"
        )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _credential_bundle(svid: X509SVID) -> bytes:
    return _pem("PRIVATE KEY", svid.key_pkcs8_der) + _pem_certs(svid.cert_chain)


def _jwt_bundle_file(
    primary: X509SVID, update: X509Update, spec: VolumeSpec, jwt_bundles: Mapping[str, bytes]
) -> bytes:
    """``{"<trust domain>": <JWKS>, ...}``: the own trust domain's JWKS and, unless
    ``federated-bundles`` is none, those of the federated trust domains the agent has."""
    own = primary.trust_domain
    if own not in jwt_bundles:
        raise RenderError(f"the SPIRE agent has not sent the JWT bundle of {own}")
    domains = [own]
    if spec.federated_bundles != "none":
        domains += [td for td in update.federates_with if td != own and td in jwt_bundles]
    document = {td: _jwks(jwt_bundles[td], td) for td in domains}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


__all__ = [
    "X509SVID",
    "FileContent",
    "X509Update",
    "bundles_from_response",
    "jwt_bundles_from_response",
    "normalise_trust_domain",
    "render_files",
    "select_svids",
    "split_der",
    "svid_labels",
    "x509_from_response",
]
