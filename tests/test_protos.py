"""The committed generated code matches protos/, and the protos carry the wire facts."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

from trio_spirecsi._proto.csi.v1 import csi_pb2
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2

ROOT = Path(__file__).resolve().parent.parent


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def _differences(left: Path, right: Path) -> list[str]:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in committed: {n}" for n in cmp.left_only]
    found += [f"only in regenerated: {n}" for n in cmp.right_only]
    found += [f"differs: {n}" for n in cmp.diff_files]
    for name in cmp.common_dirs:
        found += [f"{name}/{d}" for d in _differences(left / name, right / name)]
    return found


def test_committed_generated_code_is_what_just_protos_writes(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.generate(tmp_path / "_proto")  # type: ignore[attr-defined]
    stale = _differences(ROOT / "trio_spirecsi" / "_proto", tmp_path / "_proto")
    assert not stale, "trio_spirecsi/_proto is stale; run `just protos`: " + ", ".join(stale)


def _numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_csi_publish_request_field_numbers_match_the_spec() -> None:
    assert _numbers(csi_pb2.NodePublishVolumeRequest) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    assert _numbers(csi_pb2.VolumeCapability.MountVolume)["volume_mount_group"] == 3
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP == 6


def test_delegated_identity_field_numbers_match_the_agent() -> None:
    assert _numbers(di.SubscribeToX509SVIDsRequest) == {"selectors": 1, "pid": 2}
    assert _numbers(di.SubscribeToX509SVIDsResponse) == {"x509_svids": 1, "federates_with": 2}
    assert _numbers(di.FetchJWTSVIDsRequest) == {"audience": 1, "selectors": 2, "pid": 3}
    assert _numbers(types_pb2.X509SVID) == {"cert_chain": 1, "id": 2, "expires_at": 3, "hint": 4}
    assert _numbers(types_pb2.JWTSVID) == {
        "token": 1,
        "id": 2,
        "expires_at": 3,
        "issued_at": 4,
        "hint": 5,
    }
    service = di.DESCRIPTOR.services_by_name["DelegatedIdentity"]
    assert service.full_name == "spire.api.agent.delegatedidentity.v1.DelegatedIdentity"
