"""Workload API responses from a volume's SVIDs and the agent's bundles (pure), and the
file writer leaving the volume's socket alone."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from tests.generations import read_current
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.spire.responses import X509SVID, X509Update
from trio_spirecsi.storage.writer import FileContent, write_atomically
from trio_spirecsi.workloadapi.responses import (
    current_svids,
    jwt_bundles_for,
    jwt_bundles_response,
    x509_bundles_response,
    x509_svid_response,
)

EXAMPLE = CertificateAuthority("example.org")
PARTNER = CertificateAuthority("partner.org")
OTHER = CertificateAuthority("other.org")
BUNDLES = {
    "example.org": (EXAMPLE.root_der,),
    "partner.org": (PARTNER.root_der,),
    "other.org": (OTHER.root_der,),
}


def svid(ca: CertificateAuthority, path: str, hint: str = "", ttl: int = 3600) -> X509SVID:
    issued = ca.issue_x509_svid(f"spiffe://{ca.trust_domain}{path}", ttl)
    return X509SVID(
        issued.spiffe_id, issued.cert_chain, issued.key_pkcs8_der, issued.expires_at, hint
    )


WEB = svid(EXAMPLE, "/web", "web")
DB = svid(EXAMPLE, "/db", "db")


def test_x509_svid_response_carries_every_svid_with_its_key_and_own_bundle() -> None:
    response = x509_svid_response((WEB, DB), ("partner.org",), BUNDLES)
    assert response is not None
    assert [(s.spiffe_id, s.hint) for s in response.svids] == [
        ("spiffe://example.org/web", "web"),
        ("spiffe://example.org/db", "db"),
    ]
    first = response.svids[0]
    assert first.x509_svid == b"".join(WEB.cert_chain)
    assert first.x509_svid_key == WEB.key_pkcs8_der
    assert first.bundle == EXAMPLE.root_der
    assert dict(response.federated_bundles) == {"spiffe://partner.org": PARTNER.root_der}


def test_federated_bundles_are_only_those_federated_with_and_never_the_own() -> None:
    response = x509_svid_response((WEB,), ("example.org", "partner.org", "missing.org"), BUNDLES)
    assert response is not None
    assert list(response.federated_bundles) == ["spiffe://partner.org"]
    assert x509_svid_response((WEB,), (), BUNDLES).federated_bundles == {}  # type: ignore[union-attr]


def test_svids_wait_for_their_own_trust_bundle() -> None:
    assert x509_svid_response((WEB,), (), {}) is None
    assert x509_svid_response((WEB,), (), {"partner.org": (PARTNER.root_der,)}) is None
    foreign = svid(PARTNER, "/api")
    mixed = x509_svid_response((WEB, foreign), (), {"example.org": (EXAMPLE.root_der,)})
    assert mixed is not None
    assert [s.spiffe_id for s in mixed.svids] == ["spiffe://example.org/web"]
    assert x509_svid_response((), (), BUNDLES) is None


def test_expired_svids_are_not_handed_out() -> None:
    update = X509Update((WEB, DB))
    assert current_svids(update, now=WEB.expires_at - 1) == (WEB, DB)
    assert current_svids(update, now=WEB.expires_at) == tuple(
        s for s in (WEB, DB) if s.expires_at > WEB.expires_at
    )
    assert current_svids(update, now=max(WEB.expires_at, DB.expires_at)) == ()


def test_x509_bundles_are_own_and_federated_keyed_by_trust_domain_id() -> None:
    response = x509_bundles_response((WEB,), ("partner.org",), BUNDLES)
    assert response is not None
    assert dict(response.bundles) == {
        "spiffe://example.org": EXAMPLE.root_der,
        "spiffe://partner.org": PARTNER.root_der,
    }
    two_roots = {"example.org": (EXAMPLE.root_der, OTHER.root_der)}
    joined = x509_bundles_response((WEB,), (), two_roots)
    assert joined is not None
    assert joined.bundles["spiffe://example.org"] == EXAMPLE.root_der + OTHER.root_der
    assert (
        x509_bundles_response((WEB,), ("partner.org",), {"partner.org": (PARTNER.root_der,)})
        is None
    )
    assert x509_bundles_response((), (), BUNDLES) is None


def test_jwt_bundles_are_limited_like_the_x509_ones() -> None:
    jwks = {td: f'{{"keys": [], "td": "{td}"}}'.encode() for td in BUNDLES}
    allowed = jwt_bundles_for((WEB,), ("partner.org",), jwks)
    assert allowed == {"example.org": jwks["example.org"], "partner.org": jwks["partner.org"]}
    assert jwt_bundles_for((WEB,), (), {"partner.org": jwks["partner.org"]}) is None
    assert dict(jwt_bundles_response(allowed).bundles) == {
        "spiffe://example.org": jwks["example.org"],
        "spiffe://partner.org": jwks["partner.org"],
    }


def test_rewriting_the_files_keeps_the_socket_beside_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(data / "agent.sock"))
    server.listen()
    try:
        write_atomically(data, {"svid.pem": FileContent(b"one", 0o644)}, gid=None)
        write_atomically(data, {"bundle.pem": FileContent(b"two", 0o644)}, gid=None)
        assert stat.S_ISSOCK(os.lstat(data / "agent.sock").st_mode)
        assert sorted(p.name for p in data.iterdir() if not p.name.startswith("..")) == [
            "agent.sock",
            "bundle.pem",
        ]
        assert read_current(data) == {"bundle.pem": b"two"}
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(data / "agent.sock"))
        client.close()
        # A regular file by a name the volume no longer writes is still removed.
        (data / "stray").write_text("x")
        write_atomically(data, {"bundle.pem": FileContent(b"two", 0o644)}, gid=None)
        assert not (data / "stray").exists()
    finally:
        server.close()
