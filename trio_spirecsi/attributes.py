"""Volume attributes: the one place where a volume's ``volume_context`` is validated.

:func:`parse_volume_context` turns what the kubelet sends (pod info plus the pod's
``volumeAttributes``) into a :class:`VolumeSpec`, or raises :class:`InvalidArgument`
naming the offending key. Nothing else in the project interprets raw attributes: every
later step works on a ``VolumeSpec`` that is known to be consistent. See
``docs/attributes.md`` for the user-facing description of each attribute.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from .errors import InvalidArgument
from .spiffe import Preference, spiffe_id_problem

PREFIX = "csi.spire.io/"
KUBELET_PREFIX = "csi.storage.k8s.io/"
EPHEMERAL_KEY = KUBELET_PREFIX + "ephemeral"
POD_NAME_KEY = KUBELET_PREFIX + "pod.name"
POD_NAMESPACE_KEY = KUBELET_PREFIX + "pod.namespace"
POD_UID_KEY = KUBELET_PREFIX + "pod.uid"
SERVICE_ACCOUNT_KEY = KUBELET_PREFIX + "serviceAccount.name"
MOUNT_GROUP_FIELD = "volume_capability.mount.volume_mount_group"

CREDENTIAL_BUNDLE_FILE = "credential-bundle.pem"
"""File of layout ``spiffe-fs``: PKCS#8 key, then the chain leaf to root."""
TRUST_BUNDLE_SUFFIX = ".spiffe-trust-bundle.pem"
"""Layout ``spiffe-fs`` writes ``<trust-domain>.spiffe-trust-bundle.pem`` per trust domain."""
FEDERATED_BUNDLE_SUFFIX = ".pem"
"""``federated-bundles: files`` writes ``<trust-domain>.pem`` per federated trust domain."""

NAME_MAX = 255
"""Longest file name in bytes (NAME_MAX of Linux file systems)."""
LABEL_MAX = 64
"""Longest label (an SVID hint) that ``all-svids`` puts into a file name."""

FederatedBundles = Literal["none", "files", "merged"]
Layout = Literal["default", "spiffe-fs"]
KeyFormat = Literal["pkcs8", "traditional"]

_MAX_GID = 2**32 - 2  # 2**32 - 1 is (gid_t)-1, "no group" to chown(2)
_SHOWN = 80

T = TypeVar("T")


@dataclass(frozen=True)
class PodInfo:
    """The pod a volume belongs to, as the kubelet reports it (podInfoOnMount)."""

    name: str
    namespace: str
    uid: str
    service_account: str


@dataclass(frozen=True)
class VolumeSpec:
    """Everything a volume asks for, validated and with every default filled in.

    Built by :func:`parse_volume_context` (the fields are consistent only when built
    that way). Two requests are the same request exactly when their specs are equal.
    """

    pod: PodInfo
    svid_file: str = "svid.pem"
    svid_key_file: str = "svid_key.pem"
    bundle_file: str = "svid_bundle.pem"
    svid_hint: str = ""
    """Write the SVID with this hint ("" = no preference)."""
    spiffe_id: str = ""
    """Write the SVID with this SPIFFE ID ("" = no preference)."""
    all_svids: bool = False
    federated_bundles: FederatedBundles = "none"
    intermediates_in_bundle: bool = False
    layout: Layout = "default"
    key_format: KeyFormat = "pkcs8"
    jwt_audiences: tuple[tuple[str, ...], ...] = ()
    """One JWT-SVID per audience set, in the order given; each set in the order given."""
    jwt_svid_file: str = "jwt_svid.token"
    jwt_bundle_file: str | None = None
    gid: int | None = None
    """Group owning the files (fsGroup), or None: files owned by the driver's group."""
    cert_file_mode: int = 0o644
    key_file_mode: int = 0o600
    workload_api: bool = False
    workload_api_socket: str = "agent.sock"

    def jwt_files(self) -> dict[tuple[str, ...], str]:
        """File name of each audience set's token.

        One set: ``jwt-svid-file`` as is. Several: ``<stem>-<index><suffix>`` with the
        set's 0-based position in ``jwt-audiences`` (``jwt_svid-0.token``,
        ``jwt_svid-1.token``, ...).
        """
        if len(self.jwt_audiences) == 1:
            return {self.jwt_audiences[0]: self.jwt_svid_file}
        return {
            audiences: with_label(self.jwt_svid_file, str(index))
            for index, audiences in enumerate(self.jwt_audiences)
        }

    @property
    def preference(self) -> Preference:
        """How the volume chooses its identity among the workload's (``svid-hint``,
        ``spiffe-id``): for the files, the JWT-SVID and the per-pod socket alike."""
        return Preference(self.svid_hint, self.spiffe_id)


def with_label(name: str, label: str) -> str:
    """``svid.pem`` + ``web`` -> ``svid-web.pem``; a name without a suffix gets ``-web``."""
    dot = name.rfind(".")
    if dot <= 0:
        return f"{name}-{label}"
    return f"{name[:dot]}-{label}{name[dot:]}"


# Validation shared with rendering ------------------------------------------------


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of a volume, or None when it can.

    A plain name in the volume's folder: not empty, no ``/``, no control characters, not
    starting with a dot (the writer's own ``..data`` entries do), at most 255 bytes.
    """
    if not name:
        return "a file name cannot be empty"
    if "/" in name:
        return f"{_show(name)} is not a plain file name: it contains '/'"
    if _has_control(name):
        return f"{_show(name)} contains a control character"
    if name.startswith("."):
        return f"{_show(name)} starts with '.': hidden names are reserved for the driver"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{_show(name)} is not valid UTF-8"
    if size > NAME_MAX:
        return f"{_show(name)} is {size} bytes long; at most {NAME_MAX} are allowed"
    return None


# Parsing -------------------------------------------------------------------------

_DEFAULTS = VolumeSpec(PodInfo("", "", "", ""))

MAX_VALUE_BYTES = {"jwt-audiences": 4096, "spiffe-id": 2048, "svid-hint": 128}
"""Longest value of these attributes in bytes; every other attribute: NAME_MAX (255)."""
MAX_AUDIENCE_SETS = 8
"""Most audience sets in ``jwt-audiences``: each costs a refresher, a file and agent calls."""
MAX_AUDIENCES_PER_SET = 16
MAX_AUDIENCE_BYTES = 255
POD_INFO_MAX = 253
"""Longest pod name, namespace, UID or service account name (Kubernetes allows 253)."""

_ATTRIBUTES = (
    "all-svids",
    "bundle-file",
    "cert-file-mode",
    "federated-bundles",
    "fs-group",
    "intermediates-in-bundle",
    "jwt-audiences",
    "jwt-bundle-file",
    "jwt-svid-file",
    "key-file-mode",
    "key-format",
    "layout",
    "spiffe-id",
    "svid-file",
    "svid-hint",
    "svid-key-file",
    "workload-api",
    "workload-api-socket",
)
ATTRIBUTE_NAMES = frozenset(_ATTRIBUTES)
"""Every attribute this driver accepts, without the ``csi.spire.io/`` prefix."""


def parse_volume_context(ctx: Mapping[str, str], *, volume_mount_group: str = "") -> VolumeSpec:
    """Validate a NodePublishVolume ``volume_context`` into a :class:`VolumeSpec`.

    ``volume_mount_group`` is the kubelet's fsGroup (``volume_capability.mount.
    volume_mount_group``, "" when absent); it wins over the ``fs-group`` attribute.
    Raises :class:`InvalidArgument` (and nothing else) naming the offending key: unknown
    attributes are refused rather than ignored, so a typo cannot silently change what a
    pod gets. Other ``csi.storage.k8s.io/*`` keys the kubelet may add are ignored.
    """
    attrs: dict[str, str] = {}
    for key, value in ctx.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(
                "volume_context", f"keys and values must be strings, not {_show(repr(key))}"
            )
    for key in sorted(ctx):
        if key.startswith(KUBELET_PREFIX):
            continue
        if not key.startswith(PREFIX):
            raise InvalidArgument(
                _field_of(key),
                f"unknown volume attribute {_show(key)}: this driver's attributes are named "
                f"{PREFIX}<name>; accepted names: {_accepted()}",
            )
        name = key[len(PREFIX) :]
        if name not in ATTRIBUTE_NAMES:
            raise InvalidArgument(
                _field_of(key),
                f"unknown volume attribute {_show(key)}; accepted names: {_accepted()}",
            )
        attrs[name] = ctx[key]
    pod = _pod_info(ctx)
    return _Parser(attrs).spec(pod, volume_mount_group)


def _pod_info(ctx: Mapping[str, str]) -> PodInfo:
    values: list[str] = []
    for key in (POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY, SERVICE_ACCOUNT_KEY):
        value = ctx.get(key)
        if value is None:
            raise InvalidArgument(
                _field_of(key),
                "is missing: the kubelet sends pod information only when the CSIDriver "
                "object of this driver has podInfoOnMount: true",
            )
        if not value or _has_control(value) or len(value) > POD_INFO_MAX:
            raise InvalidArgument(_field_of(key), f"{_show(value)} is not a valid value")
        values.append(value)
    ephemeral = ctx.get(EPHEMERAL_KEY)
    if ephemeral != "true":
        raise InvalidArgument(
            _field_of(EPHEMERAL_KEY),
            f"is {_show(ephemeral) if ephemeral is not None else 'missing'}: only inline "
            "ephemeral volumes are supported (a csi volume in the pod spec, not a "
            "PersistentVolume); the CSIDriver object needs volumeLifecycleModes: [Ephemeral]",
        )
    return PodInfo(*values)


class _Parser:
    """Reads the ``csi.spire.io/*`` attributes one by one, each with its own error."""

    def __init__(self, attrs: Mapping[str, str]) -> None:
        self._attrs = attrs

    def _get(self, name: str, parse: Callable[[str, str], T], default: T) -> T:
        value = self._attrs.get(name)
        return default if value is None else parse(name, value)

    def spec(self, pod: PodInfo, volume_mount_group: str) -> VolumeSpec:
        for name, value in sorted(self._attrs.items()):
            limit = MAX_VALUE_BYTES.get(name, NAME_MAX)
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise InvalidArgument(
                    _field(name), f"the value is {size} bytes long; at most {limit} are allowed"
                )
        d = _DEFAULTS
        layout = cast(Layout, self._get("layout", _choice("default", "spiffe-fs"), "default"))
        key_format = cast(
            KeyFormat, self._get("key-format", _choice("pkcs8", "traditional"), "pkcs8")
        )
        federated = cast(
            FederatedBundles,
            self._get("federated-bundles", _choice("none", "files", "merged"), "none"),
        )
        if layout == "spiffe-fs":
            for name in ("svid-file", "svid-key-file", "bundle-file"):
                if name in self._attrs:
                    raise InvalidArgument(
                        _field(name),
                        "has no effect with layout spiffe-fs, which writes "
                        f"{CREDENTIAL_BUNDLE_FILE} and <trust-domain>{TRUST_BUNDLE_SUFFIX}; "
                        "remove it or use layout default",
                    )
            if key_format == "traditional":
                raise InvalidArgument(
                    _field("key-format"),
                    "traditional cannot be combined with layout spiffe-fs: its "
                    f"{CREDENTIAL_BUNDLE_FILE} always holds a PKCS#8 key",
                )
            if federated == "merged":
                raise InvalidArgument(
                    _field("federated-bundles"),
                    "merged cannot be combined with layout spiffe-fs, which gives each trust "
                    "domain its own file; use files",
                )
        gid = self._gid(volume_mount_group)
        default_key_mode = 0o600 if gid is None else 0o640
        no_jwt_bundle: str | None = None
        spec = VolumeSpec(
            pod=pod,
            svid_file=self._get("svid-file", _file_name, d.svid_file),
            svid_key_file=self._get("svid-key-file", _file_name, d.svid_key_file),
            bundle_file=self._get("bundle-file", _file_name, d.bundle_file),
            svid_hint=self._get("svid-hint", _text, ""),
            spiffe_id=self._get("spiffe-id", _spiffe_id, ""),
            all_svids=self._get("all-svids", _bool, False),
            federated_bundles=federated,
            intermediates_in_bundle=self._get("intermediates-in-bundle", _bool, False),
            layout=layout,
            key_format=key_format,
            jwt_audiences=self._get("jwt-audiences", _audiences, ()),
            jwt_svid_file=self._get("jwt-svid-file", _file_name, d.jwt_svid_file),
            jwt_bundle_file=self._get("jwt-bundle-file", _file_name, no_jwt_bundle),
            gid=gid,
            cert_file_mode=self._get("cert-file-mode", _cert_mode, d.cert_file_mode),
            key_file_mode=self._get("key-file-mode", _key_mode, default_key_mode),
            workload_api=self._get("workload-api", _bool, False),
            workload_api_socket=self._get(
                "workload-api-socket", _socket_name, d.workload_api_socket
            ),
        )
        _check_names(spec)
        return spec

    def _gid(self, volume_mount_group: str) -> int | None:
        if volume_mount_group:
            return _parse_gid(MOUNT_GROUP_FIELD, volume_mount_group)
        value = self._attrs.get("fs-group")
        return None if value is None else _parse_gid(_field("fs-group"), value)


def _check_names(spec: VolumeSpec) -> None:
    """Every file of the volume gets its own, valid name."""
    used: dict[str, str] = {}
    labeled: tuple[tuple[str, str], ...]

    def claim(name: str, attribute: str) -> None:
        problem = file_name_problem(name)
        if problem is not None:
            raise InvalidArgument(_field(attribute), problem)
        if name in used:
            raise InvalidArgument(
                _field(attribute),
                f"file name {_show(name)} is also used by {PREFIX}{used[name]}; every file of "
                "a volume needs its own name",
            )
        used[name] = attribute

    if spec.layout == "default":
        claim(spec.svid_file, "svid-file")
        claim(spec.svid_key_file, "svid-key-file")
        claim(spec.bundle_file, "bundle-file")
        labeled = (
            ("svid-file", spec.svid_file),
            ("svid-key-file", spec.svid_key_file),
            ("bundle-file", spec.bundle_file),
        )
    else:
        claim(CREDENTIAL_BUNDLE_FILE, "layout")
        labeled = (("layout", CREDENTIAL_BUNDLE_FILE),)
    jwt_attribute = "jwt-svid-file" if len(spec.jwt_audiences) <= 1 else "jwt-audiences"
    for name in spec.jwt_files().values():
        claim(name, jwt_attribute)
    if spec.jwt_bundle_file is not None:
        claim(spec.jwt_bundle_file, "jwt-bundle-file")
    if spec.workload_api:
        claim(spec.workload_api_socket, "workload-api-socket")
    if spec.all_svids:
        for attribute, name in labeled:
            longest = with_label(name, "x" * LABEL_MAX)
            if len(longest.encode("utf-8")) > NAME_MAX:
                raise InvalidArgument(
                    _field(attribute),
                    f"{_show(name)} is too long for all-svids, which adds '-<hint or index>' "
                    f"(up to {LABEL_MAX + 1} bytes) to it",
                )


# Value parsers: (attribute name, raw value) -> value, or InvalidArgument -------------


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, value: str) -> str:
        if value not in choices:
            raise InvalidArgument(
                _field(name), f"{_show(value)} is not one of: {', '.join(choices)}"
            )
        return value

    return parse


def _bool(name: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise InvalidArgument(_field(name), f"{_show(value)} is not one of: true, false")
    return value == "true"


def _text(name: str, value: str) -> str:
    if _has_control(value):
        raise InvalidArgument(_field(name), f"{_show(value)} contains a control character")
    return value


def _file_name(name: str, value: str) -> str:
    problem = file_name_problem(value)
    if problem is not None:
        raise InvalidArgument(_field(name), problem)
    return value


SOCKET_NAME_MAX = 64
"""A unix socket path is at most 107 bytes; the server binds through /proc/self/fd/N/."""


def _socket_name(name: str, value: str) -> str:
    _file_name(name, value)
    if len(value.encode()) > SOCKET_NAME_MAX:
        raise InvalidArgument(
            _field(name), f"a socket name is at most {SOCKET_NAME_MAX} bytes (unix socket limit)"
        )
    return value


def _spiffe_id(name: str, value: str) -> str:
    if not value:
        return ""
    problem = spiffe_id_problem(value)
    if problem is not None:
        raise InvalidArgument(_field(name), problem)
    return value


def _audiences(name: str, value: str) -> tuple[tuple[str, ...], ...]:
    if not value.strip():
        return ()
    raw_sets = value.split(";")
    if len(raw_sets) > MAX_AUDIENCE_SETS:
        raise InvalidArgument(
            _field(name),
            f"{len(raw_sets)} audience sets; at most {MAX_AUDIENCE_SETS} are allowed (each "
            "set is one JWT-SVID kept fresh)",
        )
    sets: list[tuple[str, ...]] = []
    for index, raw in enumerate(raw_sets):
        audiences = tuple(a.strip() for a in raw.split(","))
        where = f"audience set {index + 1} ({_show(raw.strip())})"
        if any(not a for a in audiences):
            raise InvalidArgument(
                _field(name),
                f"{where} has an empty audience; write audience sets separated by ';', each a "
                "comma-separated list, e.g. 'api,db;billing'",
            )
        if any(_has_control(a) for a in audiences):
            raise InvalidArgument(_field(name), f"{where} contains a control character")
        if len(audiences) > MAX_AUDIENCES_PER_SET:
            raise InvalidArgument(
                _field(name),
                f"{where} has {len(audiences)} audiences; at most {MAX_AUDIENCES_PER_SET} "
                "are allowed",
            )
        if any(len(a.encode("utf-8", "surrogatepass")) > MAX_AUDIENCE_BYTES for a in audiences):
            raise InvalidArgument(
                _field(name), f"{where} has an audience longer than {MAX_AUDIENCE_BYTES} bytes"
            )
        if len(set(audiences)) != len(audiences):
            raise InvalidArgument(_field(name), f"{where} names an audience twice")
        if audiences in sets:
            raise InvalidArgument(_field(name), f"{where} is listed twice")
        sets.append(audiences)
    return tuple(sets)


def _parse_gid(field: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 10 or int(value) > _MAX_GID:
        raise InvalidArgument(field, f"{_show(value)} is not a numeric group ID (0-{_MAX_GID})")
    return int(value)


def _parse_mode(name: str, value: str) -> int:
    digits = value[2:] if value.startswith("0o") else value
    if not 1 <= len(digits) <= 4 or any(c not in "01234567" for c in digits):
        raise InvalidArgument(
            _field(name), f"{_show(value)} is not an octal file mode such as 0644 or 0600"
        )
    mode = int(digits, 8)
    if mode & 0o7000:
        raise InvalidArgument(
            _field(name), f"{value} sets setuid, setgid or sticky bits; permission bits only"
        )
    if mode & 0o111:
        raise InvalidArgument(_field(name), f"{value} makes the file executable; use e.g. 0644")
    return mode


def _cert_mode(name: str, value: str) -> int:
    return _parse_mode(name, value)


def _key_mode(name: str, value: str) -> int:
    mode = _parse_mode(name, value)
    if mode & 0o007:
        raise InvalidArgument(
            _field(name),
            f"{value} gives every user access to the private key; use 0600, or 0640 to share "
            "it with the pod's fsGroup",
        )
    return mode


# Small helpers ---------------------------------------------------------------------


def _field(name: str) -> str:
    return f"volume_context[{PREFIX}{name}]"


def _field_of(key: str) -> str:
    return f"volume_context[{_show(key, quote=False)}]"


def _show(value: str, *, quote: bool = True) -> str:
    """A value for a message: quoted, and cut short when long."""
    if len(value) > _SHOWN:
        value = value[:_SHOWN] + "..."
    return repr(value) if quote else value


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _has_control(value: str) -> bool:
    return _CONTROL.search(value) is not None


def _accepted() -> str:
    return ", ".join(PREFIX + name for name in _ATTRIBUTES)


__all__ = [
    "ATTRIBUTE_NAMES",
    "CREDENTIAL_BUNDLE_FILE",
    "FEDERATED_BUNDLE_SUFFIX",
    "PREFIX",
    "TRUST_BUNDLE_SUFFIX",
    "FederatedBundles",
    "KeyFormat",
    "Layout",
    "PodInfo",
    "VolumeSpec",
    "file_name_problem",
    "parse_volume_context",
    "with_label",
]
