"""Volume attributes: ``parse_volume_context`` on any volume_context the kubelet could send.

Input: UTF-8 text (invalid bytes replaced, as protobuf strings are always valid UTF-8). The
first line is ``volume_capability.mount.volume_mount_group``; every further line is one
``key=value`` entry of the volume_context (a line without ``=`` is a key with an empty value).

Promise: a :class:`VolumeSpec` or :class:`InvalidArgument` naming a field, with a bounded
message; parsing is deterministic and an accepted spec names only files that can exist.
"""

from __future__ import annotations

from trio_spirecsi.attributes import (
    MOUNT_GROUP_FIELD,
    file_name_problem,
    parse_volume_context,
)
from trio_spirecsi.errors import InvalidArgument

MAX_MESSAGE = 2000


def decode(data: bytes) -> tuple[str, dict[str, str]]:
    lines = data.decode("utf-8", errors="replace").split("\n")
    context: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition("=")
        context[key] = value
    return lines[0], context


def test_one_input(data: bytes) -> str:
    group, context = decode(data)
    try:
        spec = parse_volume_context(context, volume_mount_group=group)
    except InvalidArgument as exc:
        if not (exc.field.startswith("volume_context") or exc.field == MOUNT_GROUP_FIELD):
            raise AssertionError(f"refusal names no request field: {exc.field!r}") from exc
        if not exc.message or len(str(exc)) > MAX_MESSAGE:
            raise AssertionError(f"refusal message of {len(str(exc))} chars") from exc
        return "rejected"
    if parse_volume_context(context, volume_mount_group=group) != spec:
        raise AssertionError(f"parsing the same context twice gave another spec: {spec!r}")
    for name in (spec.svid_file, spec.svid_key_file, spec.bundle_file, spec.jwt_svid_file):
        problem = file_name_problem(name)
        if problem is not None:
            raise AssertionError(f"accepted a file name that cannot exist: {problem}")
    return "accepted"
