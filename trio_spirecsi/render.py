"""The files a volume holds, from the agent's validated data: pure functions.

Input comes from :mod:`trio_spirecsi.spire.responses` (already validated); this module
decides the layout: which SVIDs, which bundles, which names and modes. A layout that cannot
be built (no SVID matching the volume's choice, a bundle not yet sent, two files with one
name) is a :class:`RenderError`, never a file. No message built here contains key material
or tokens.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .attributes import (
    CREDENTIAL_BUNDLE_FILE,
    FEDERATED_BUNDLE_SUFFIX,
    LABEL_MAX,
    TRUST_BUNDLE_SUFFIX,
    VolumeSpec,
    file_name_problem,
    with_label,
)
from .errors import RenderError
from .spire.responses import CRYPTO_ERRORS, X509SVID, X509Update, parse_jwks
from .storage.writer import FileContent

_LABEL = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{LABEL_MAX - 1}}}")
_JWT = re.compile(r"[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]*)+")
_EMPTY_TOKENS: Mapping[tuple[str, ...], str] = MappingProxyType({})
_EMPTY_BUNDLES: Mapping[str, bytes] = MappingProxyType({})


# Files -----------------------------------------------------------------------------


def select_svids(spec: VolumeSpec, update: X509Update) -> tuple[X509SVID, ...]:
    """The SVIDs a volume writes: the selected one first (the first the agent sent that
    matches ``svid-hint`` and ``spiffe-id``), then, with ``all-svids``, every other SVID
    in the agent's order."""
    if not update.svids:
        raise RenderError("the SPIRE agent sent no SVID for this pod")
    primary = spec.preference.first(update.svids, _hint_and_id)
    if primary is None:
        sent = ", ".join(f"{s.spiffe_id} (hint {s.hint!r})" for s in update.svids)
        raise RenderError(
            f"no SVID with {spec.preference.describe()}; the SPIRE agent sent: {sent}"
        )
    if not spec.all_svids:
        return (primary,)
    return (primary, *(s for s in update.svids if s is not primary))


def _hint_and_id(svid: X509SVID) -> tuple[str, str]:
    return svid.hint, svid.spiffe_id


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
        files.cert(cert_name, pem_certificates(svid.cert_chain))
        files.key(key_name, _key_pem(svid, spec))
        own = _own_bundle(svid, x509_bundles, [svid] if spec.intermediates_in_bundle else [])
        files.cert(bundle_name, pem_certificates(_unique([*own, *merged])))
    if spec.federated_bundles == "files":
        for td in federated:
            if td in x509_bundles:
                files.cert(td + FEDERATED_BUNDLE_SUFFIX, pem_certificates(x509_bundles[td]))


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
        files.cert(td + TRUST_BUNDLE_SUFFIX, pem_certificates(own))
    for td in federated:
        if td in x509_bundles and td not in own_domains:
            files.cert(td + TRUST_BUNDLE_SUFFIX, pem_certificates(x509_bundles[td]))


def _own_bundle(
    svid: X509SVID, x509_bundles: Mapping[str, tuple[bytes, ...]], with_chains: Iterable[X509SVID]
) -> list[bytes]:
    certs = x509_bundles.get(svid.trust_domain)
    if not certs:
        raise RenderError(f"the SPIRE agent has not sent the trust bundle of {svid.trust_domain}")
    return _unique([*certs, *(c for s in with_chains for c in s.cert_chain[1:])])


def _unique(certs: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(certs))


def pem_block(label: str, der: bytes) -> bytes:
    text = base64.b64encode(der).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode("ascii")


def pem_certificates(certs: Iterable[bytes]) -> bytes:
    return b"".join(pem_block("CERTIFICATE", der) for der in certs)


def _key_pem(svid: X509SVID, spec: VolumeSpec) -> bytes:
    if spec.key_format == "pkcs8":
        return pem_block("PRIVATE KEY", svid.key_pkcs8_der)
    try:
        key = serialization.load_der_private_key(svid.key_pkcs8_der, password=None)
    except CRYPTO_ERRORS:
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
    return pem_block("PRIVATE KEY", svid.key_pkcs8_der) + pem_certificates(svid.cert_chain)


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
    document = {td: parse_jwks(jwt_bundles[td], td) for td in domains}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


__all__ = ["pem_block", "pem_certificates", "render_files", "select_svids", "svid_labels"]
