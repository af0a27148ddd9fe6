"""The Envoy SDS protos carry the wire facts: package names (Any type URLs and gRPC paths are
derived from them), every declared field number, label and oneof, and the service's methods.
A renumbered field or a misspelt package would still compile and even round-trip in our own
tests, but Envoy would not understand it; these pins catch that."""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from trio_spirecsi._proto.envoy.config.core.v3 import base_pb2, extension_pb2
from trio_spirecsi._proto.envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2
from trio_spirecsi._proto.envoy.service.secret.v3 import sds_pb2
from trio_spirecsi._proto.envoy.type.v3 import semantic_version_pb2
from trio_spirecsi._proto.google.rpc import status_pb2

_REPEATED = "repeated"


def _fields(message: type) -> dict[str, tuple[int, str]]:
    """name -> (number, type), the type written as in the .proto (``repeated`` prefixed,
    message and enum types by full name, maps as ``map<k,v>``)."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return {f.name: (f.number, _type_of(f)) for f in descriptor.fields}


_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
}


def _type_of(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields
        return f"map<{_type_of(key)},{_type_of(value)}>"
    if field.message_type is not None:
        name = field.message_type.full_name
    elif field.enum_type is not None:
        name = field.enum_type.full_name
    else:
        name = _SCALARS[field.type]
    return f"{_REPEATED} {name}" if field.is_repeated else name


def _oneofs(message: type) -> dict[str, list[str]]:
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return {o.name: [f.name for f in o.fields] for o in descriptor.oneofs}


CORE = "envoy.config.core.v3"
TLS = "envoy.extensions.transport_sockets.tls.v3"
DISCOVERY = "envoy.service.discovery.v3"


def test_packages_give_the_type_urls_envoy_uses() -> None:
    secret = any_pb2.Any()
    secret.Pack(secret_pb2.Secret(name="default"))
    assert secret.type_url == f"type.googleapis.com/{TLS}.Secret"
    validator = any_pb2.Any()
    validator.Pack(tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig())
    assert validator.type_url == f"type.googleapis.com/{TLS}.SPIFFECertValidatorConfig"
    assert discovery_pb2.DiscoveryRequest.DESCRIPTOR.full_name == f"{DISCOVERY}.DiscoveryRequest"
    assert base_pb2.Node.DESCRIPTOR.full_name == f"{CORE}.Node"
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"


def test_the_service_paths_and_kinds_match_envoy() -> None:
    service = sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"]
    assert service.full_name == "envoy.service.secret.v3.SecretDiscoveryService"
    methods = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming)
        for m in service.methods
    }
    assert methods == {
        "StreamSecrets": (f"{DISCOVERY}.DiscoveryRequest", f"{DISCOVERY}.DiscoveryResponse", True),
        "FetchSecrets": (f"{DISCOVERY}.DiscoveryRequest", f"{DISCOVERY}.DiscoveryResponse", False),
        "DeltaSecrets": (
            f"{DISCOVERY}.DeltaDiscoveryRequest",
            f"{DISCOVERY}.DeltaDiscoveryResponse",
            True,
        ),
    }
    assert [m.server_streaming for m in service.methods] == [True, True, False]


def test_discovery_request_and_response() -> None:
    assert _fields(discovery_pb2.DiscoveryRequest) == {
        "version_info": (1, "string"),
        "node": (2, f"{CORE}.Node"),
        "resource_names": (3, "repeated string"),
        "type_url": (4, "string"),
        "response_nonce": (5, "string"),
        "error_detail": (6, "google.rpc.Status"),
        "resource_locators": (7, f"repeated {DISCOVERY}.ResourceLocator"),
    }
    assert _fields(discovery_pb2.DiscoveryResponse) == {
        "version_info": (1, "string"),
        "resources": (2, "repeated google.protobuf.Any"),
        "canary": (3, "bool"),
        "type_url": (4, "string"),
        "nonce": (5, "string"),
        "control_plane": (6, f"{CORE}.ControlPlane"),
        "resource_errors": (7, f"repeated {DISCOVERY}.ResourceError"),
    }
    assert _fields(discovery_pb2.ResourceLocator) == {
        "name": (1, "string"),
        "dynamic_parameters": (2, "map<string,string>"),
    }
    assert _fields(discovery_pb2.ResourceName) == {"name": (1, "string")}
    assert _fields(discovery_pb2.ResourceError) == {
        "resource_name": (1, f"{DISCOVERY}.ResourceName"),
        "error_detail": (2, "google.rpc.Status"),
    }
    assert _fields(base_pb2.ControlPlane) == {"identifier": (1, "string")}


def test_delta_messages() -> None:
    assert _fields(discovery_pb2.DeltaDiscoveryRequest) == {
        "node": (1, f"{CORE}.Node"),
        "type_url": (2, "string"),
        "resource_names_subscribe": (3, "repeated string"),
        "resource_names_unsubscribe": (4, "repeated string"),
        "initial_resource_versions": (5, "map<string,string>"),
        "response_nonce": (6, "string"),
        "error_detail": (7, "google.rpc.Status"),
        "resource_locators_subscribe": (8, f"repeated {DISCOVERY}.ResourceLocator"),
        "resource_locators_unsubscribe": (9, f"repeated {DISCOVERY}.ResourceLocator"),
    }
    assert _fields(discovery_pb2.DeltaDiscoveryResponse) == {
        "system_version_info": (1, "string"),
        "resources": (2, f"repeated {DISCOVERY}.Resource"),
        "type_url": (4, "string"),
        "nonce": (5, "string"),
        "removed_resources": (6, "repeated string"),
        "control_plane": (7, f"{CORE}.ControlPlane"),
        "removed_resource_names": (8, f"repeated {DISCOVERY}.ResourceName"),
        "resource_errors": (9, f"repeated {DISCOVERY}.ResourceError"),
    }
    assert _fields(discovery_pb2.Resource) == {
        "version": (1, "string"),
        "resource": (2, "google.protobuf.Any"),
        "name": (3, "string"),
        "aliases": (4, "repeated string"),
        "ttl": (6, "google.protobuf.Duration"),
        "cache_control": (7, f"{DISCOVERY}.Resource.CacheControl"),
        "resource_name": (8, f"{DISCOVERY}.ResourceName"),
        "metadata": (9, f"{CORE}.Metadata"),
    }
    assert _fields(discovery_pb2.Resource.CacheControl) == {"do_not_cache": (1, "bool")}


def test_node_and_build_version() -> None:
    assert _fields(base_pb2.Node) == {
        "id": (1, "string"),
        "cluster": (2, "string"),
        "metadata": (3, "google.protobuf.Struct"),
        "locality": (4, f"{CORE}.Locality"),
        "user_agent_name": (6, "string"),
        "user_agent_version": (7, "string"),
        "user_agent_build_version": (8, f"{CORE}.BuildVersion"),
        "extensions": (9, f"repeated {CORE}.Extension"),
        "client_features": (10, "repeated string"),
    }
    assert _oneofs(base_pb2.Node) == {
        "user_agent_version_type": ["user_agent_version", "user_agent_build_version"]
    }
    assert _fields(base_pb2.Locality) == {
        "region": (1, "string"),
        "zone": (2, "string"),
        "sub_zone": (3, "string"),
    }
    assert _fields(base_pb2.BuildVersion) == {
        "version": (1, "envoy.type.v3.SemanticVersion"),
        "metadata": (2, "google.protobuf.Struct"),
    }
    assert _fields(base_pb2.Extension) == {
        "name": (1, "string"),
        "category": (2, "string"),
        "type_descriptor": (3, "string"),
        "version": (4, f"{CORE}.BuildVersion"),
        "disabled": (5, "bool"),
        "type_urls": (6, "repeated string"),
    }
    assert _fields(semantic_version_pb2.SemanticVersion) == {
        "major_number": (1, "uint32"),
        "minor_number": (2, "uint32"),
        "patch": (3, "uint32"),
    }
    assert _fields(base_pb2.Metadata) == {
        "filter_metadata": (1, "map<string,google.protobuf.Struct>"),
        "typed_filter_metadata": (2, "map<string,google.protobuf.Any>"),
    }


def test_data_source_and_extension_config() -> None:
    assert _fields(base_pb2.DataSource) == {
        "filename": (1, "string"),
        "inline_bytes": (2, "bytes"),
        "inline_string": (3, "string"),
        "environment_variable": (4, "string"),
        "watched_directory": (5, f"{CORE}.WatchedDirectory"),
    }
    assert _oneofs(base_pb2.DataSource) == {
        "specifier": ["filename", "inline_bytes", "inline_string", "environment_variable"]
    }
    assert _fields(base_pb2.WatchedDirectory) == {"path": (1, "string")}
    assert _fields(extension_pb2.TypedExtensionConfig) == {
        "name": (1, "string"),
        "typed_config": (2, "google.protobuf.Any"),
    }


def test_secret_and_its_kinds() -> None:
    assert _fields(secret_pb2.Secret) == {
        "name": (1, "string"),
        "tls_certificate": (2, f"{TLS}.TlsCertificate"),
        "session_ticket_keys": (3, f"{TLS}.TlsSessionTicketKeys"),
        "validation_context": (4, f"{TLS}.CertificateValidationContext"),
        "generic_secret": (5, f"{TLS}.GenericSecret"),
    }
    assert _oneofs(secret_pb2.Secret) == {
        "type": ["tls_certificate", "session_ticket_keys", "validation_context", "generic_secret"]
    }
    assert _fields(secret_pb2.GenericSecret) == {
        "secret": (1, f"{CORE}.DataSource"),
        "secrets": (2, f"map<string,{CORE}.DataSource>"),
    }
    assert _fields(common_pb2.TlsSessionTicketKeys) == {"keys": (1, f"repeated {CORE}.DataSource")}
    assert _fields(common_pb2.TlsCertificate) == {
        "certificate_chain": (1, f"{CORE}.DataSource"),
        "private_key": (2, f"{CORE}.DataSource"),
        "password": (3, f"{CORE}.DataSource"),
        "ocsp_staple": (4, f"{CORE}.DataSource"),
        "signed_certificate_timestamp": (5, f"repeated {CORE}.DataSource"),
        "private_key_provider": (6, f"{TLS}.PrivateKeyProvider"),
        "watched_directory": (7, f"{CORE}.WatchedDirectory"),
        "pkcs12": (8, f"{CORE}.DataSource"),
    }
    assert _oneofs(common_pb2.TlsCertificate) == {}
    assert _fields(common_pb2.PrivateKeyProvider) == {
        "provider_name": (1, "string"),
        "typed_config": (3, "google.protobuf.Any"),
        "fallback": (4, "bool"),
    }
    assert _oneofs(common_pb2.PrivateKeyProvider) == {"config_type": ["typed_config"]}


def test_certificate_validation_context() -> None:
    context = common_pb2.CertificateValidationContext
    assert _fields(context) == {
        "trusted_ca": (1, f"{CORE}.DataSource"),
        "verify_certificate_hash": (2, "repeated string"),
        "verify_certificate_spki": (3, "repeated string"),
        "require_signed_certificate_timestamp": (6, "google.protobuf.BoolValue"),
        "crl": (7, f"{CORE}.DataSource"),
        "allow_expired_certificate": (8, "bool"),
        "trust_chain_verification": (
            10,
            f"{TLS}.CertificateValidationContext.TrustChainVerification",
        ),
        "watched_directory": (11, f"{CORE}.WatchedDirectory"),
        "custom_validator_config": (12, f"{CORE}.TypedExtensionConfig"),
        "only_verify_leaf_cert_crl": (14, "bool"),
        "max_verify_depth": (16, "google.protobuf.UInt32Value"),
        "system_root_certs": (17, f"{TLS}.CertificateValidationContext.SystemRootCerts"),
    }
    # trusted_ca is a plain field on the wire, not (yet) a oneof member.
    assert _oneofs(context) == {}
    assert context.VERIFY_TRUST_CHAIN == 0
    assert context.ACCEPT_UNTRUSTED == 1


def test_spiffe_validator_config() -> None:
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig
    assert _fields(config) == {
        "trust_domains": (1, f"repeated {TLS}.SPIFFECertValidatorConfig.TrustDomain"),
        "trust_bundles": (2, f"{CORE}.DataSource"),
    }
    assert _fields(config.TrustDomain) == {
        "name": (1, "string"),
        "trust_bundle": (2, f"{CORE}.DataSource"),
    }


def test_google_rpc_status_is_byte_identical_to_googleapis_common_protos() -> None:
    """Another copy of google/rpc/status.proto in the same process (grpcio-status brings
    googleapis-common-protos) is accepted only when the two descriptors are identical."""
    assert _fields(status_pb2.Status) == {
        "code": (1, "int32"),
        "message": (2, "string"),
        "details": (3, "repeated google.protobuf.Any"),
    }
    assert status_pb2.DESCRIPTOR.serialized_pb == (
        b'\n\x17google/rpc/status.proto\x12\ngoogle.rpc\x1a\x19google/protobuf/any.proto"N\n'
        b"\x06Status\x12\x0c\n\x04code\x18\x01 \x01(\x05\x12\x0f\n\x07message\x18\x02 \x01(\t"
        b"\x12%\n\x07details\x18\x03 \x03(\x0b2\x14.google.protobuf.AnyB^\n\x0ecom.google.rpc"
        b"B\x0bStatusProtoP\x01Z7google.golang.org/genproto/googleapis/rpc/status;status"
        b"\xa2\x02\x03RPCb\x06proto3"
    )
