"""The deployment files: schema-valid offline, and consistent with each other and the driver.

Every standard manifest under k8s/ and examples/ is validated strictly (unknown fields are
errors) against the Kubernetes 1.30 schemas with kubernetes-validate. The kustomizations are
rendered by a small renderer below (resources, components, namespace and RFC 6902 patches,
the only features used here; anything else is refused), so overlays are checked as users
will apply them. tests/test_helm.py checks the Helm chart against these, and SPIRE's own
chart against k8s/spire/helm-values.yaml.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from trio_spirecsi.config import DEFAULT_DRIVER_NAME, SERVE_FLAGS, parse_csi_endpoint
from trio_spirecsi.httpserver import parse_addr

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
EXAMPLES = ROOT / "examples"
KUBERNETES_VERSION = "1.30.0"

Doc = dict[str, Any]

OVERLAYS = {
    "base": (K8S, "/var/lib/kubelet"),
    "microk8s": (K8S / "overlays" / "microk8s", "/var/snap/microk8s/common/var/lib/kubelet"),
    "k0s": (K8S / "overlays" / "k0s", "/var/lib/k0s/kubelet"),
    "agent-conf": (K8S / "overlays" / "agent-conf", "/var/lib/kubelet"),
    "monitoring": (K8S / "overlays" / "monitoring", "/var/lib/kubelet"),
}
"""Installable kustomizations and the kubelet root each one targets."""

AGENT_CONF = K8S / "overlays" / "agent-conf"
CHART_NAMESPACE = "spire-system"
"""Where SPIRE's Helm chart runs its agent (global.spire.namespaces.system.name)."""
CHART_ADMIN_SOCKET = "/run/spire/agent/sockets/csi.spiffe.io/admin/admin.sock"
"""Where SPIRE's Helm chart puts the admin socket on the host (sockets.admin.mountOnHost)."""
SPIRE_CLASS_NAME = "spire-mgmt-spire"
"""The controller manager's class for SPIRE's release "spire" in "spire-mgmt"."""

CRD_FILES = {
    K8S / "spire" / "clusterspiffeid-driver.yaml",
    K8S / "spire" / "clusterspiffeid-workloads.yaml",
    K8S / "components" / "podmonitor" / "podmonitor.yaml",
    K8S / "components" / "alerts" / "prometheusrule.yaml",
}
PARTIAL_FILES = {AGENT_CONF / "agent-daemonset-patch.yaml"}
VALUES_FILES = {K8S / "spire" / "helm-values.yaml"}
"""Not manifests: values for SPIRE's Helm chart (tests/test_helm.py renders that chart)."""
STANDARD_KINDS = ["CSIDriver", "DaemonSet", "ServiceAccount"]
CLUSTER_SPIFFE_ID_FIELDS = {
    "spiffeIDTemplate",
    "ttl",
    "jwtTtl",
    "dnsNameTemplates",
    "workloadSelectorTemplates",
    "federatesWith",
    "namespaceSelector",
    "podSelector",
    "admin",
    "downstream",
    "autoPopulateDNSNames",
    "className",
    "fallback",
    "hint",
}
"""spec fields of spire-controller-manager's ClusterSPIFFEID (spire.spiffe.io/v1alpha1)."""

DRIVER_SELECTOR_KINDS = ("ns", "sa", "pod-uid", "pod-name", "node-name")


# --- loading and rendering --------------------------------------------------------------


def load_docs(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    *parents, last = _pointer(path)
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, last


def apply_json_patch(doc: Doc, ops: list[Doc], where: str) -> Doc:
    """RFC 6902 add / replace / remove / test (all this repository uses)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parent, key = _parent(doc, op["path"])
        index: Any = key
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
        if op["op"] == "test":
            assert parent[index] == op["value"], f"{where}: test failed at {op['path']}"
        elif op["op"] == "replace":
            assert index in range(len(parent)) if isinstance(parent, list) else index in parent
            parent[index] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(index, op["value"])
            else:
                parent[index] = op["value"]
        elif op["op"] == "remove":
            del parent[index]
        else:
            raise AssertionError(f"{where}: unsupported JSON patch op {op['op']!r}")
    return doc


def _matches(doc: Doc, target: Mapping[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
    }
    return all(wanted[k] == v for k, v in target.items())


CLUSTER_SCOPED = {"CSIDriver", "ClusterSPIFFEID", "Namespace"}


def render(folder: Path, kind: str = "Kustomization") -> list[Doc]:
    """What ``kubectl kustomize folder`` produces, for the features used in this repository."""
    (kustomization,) = load_docs(folder / "kustomization.yaml")
    assert kustomization["kind"] == kind, f"{folder}: expected a {kind}"
    allowed = {"apiVersion", "kind", "resources", "patches", "components", "namespace"}
    unknown = set(kustomization) - allowed
    assert not unknown, f"{folder}: the test renderer does not know {sorted(unknown)}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for component in kustomization.get("components", []):
        docs += render((folder / component).resolve(), kind="Component")
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{folder}: only path + target patches"
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        assert isinstance(ops, list), f"{folder / patch['path']}: expected a JSON patch"
        targets = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
        assert targets, f"{folder}: patch {patch['path']} matches no resource"
        for i in targets:
            docs[i] = apply_json_patch(docs[i], ops, str(folder / patch["path"]))
    return docs


def one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def containers(daemonset: Doc) -> dict[str, Doc]:
    return {c["name"]: c for c in daemonset["spec"]["template"]["spec"]["containers"]}


def flags(args: list[str]) -> dict[str, str]:
    """``["serve", "--a=1", "--b", "2"]`` -> ``{"--a": "1", "--b": "2"}`` (after the command)."""
    result: dict[str, str] = {}
    items = iter(args[1:] if args and not args[0].startswith("-") else args)
    for item in items:
        assert item.startswith("--"), f"unexpected positional argument {item!r}"
        name, eq, value = item.partition("=")
        result[name] = value if eq else next(items)
    return result


def volumes(daemonset: Doc) -> dict[str, Doc]:
    return {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}


def mount_of(container: Doc, volume: str) -> Doc:
    found: list[Doc] = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(found) == 1, f"{container['name']} mounts volume {volume} {len(found)} times"
    return found[0]


def volume_for_path(container: Doc, path: str) -> str:
    """The volume whose mount holds ``path`` in ``container`` (longest mountPath prefix)."""
    best = max(
        (
            m
            for m in container["volumeMounts"]
            if PurePosixPath(path).is_relative_to(m["mountPath"])
        ),
        key=lambda m: len(m["mountPath"]),
    )
    return str(best["name"])


def pod_specs(doc: Doc) -> Iterator[Doc]:
    if doc["kind"] == "Pod":
        yield doc["spec"]
    elif doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        yield doc["spec"]["template"]["spec"]


def manifest_files() -> list[Path]:
    return sorted(p for p in [*K8S.rglob("*.yaml"), *EXAMPLES.rglob("*.yaml")])


def is_kustomize_file(path: Path) -> bool:
    """A kustomization, or a patch file one of them names."""
    if path.name == "kustomization.yaml":
        return True
    kustomization = path.parent / "kustomization.yaml"
    if not kustomization.exists():
        return False
    patches = load_docs(kustomization)[0].get("patches", [])
    return any(patch.get("path") == path.name for patch in patches)


STANDARD_FILES = [
    p
    for p in manifest_files()
    if p not in CRD_FILES | PARTIAL_FILES | VALUES_FILES and not is_kustomize_file(p)
]


def example_docs() -> Iterator[tuple[Path, Doc]]:
    for path in STANDARD_FILES:
        if path.is_relative_to(EXAMPLES):
            for doc in load_docs(path):
                yield path, doc


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- schema validation ------------------------------------------------------------------


def test_every_manifest_file_is_validated_or_checked_by_hand() -> None:
    files = set(manifest_files())
    assert files >= CRD_FILES | PARTIAL_FILES | VALUES_FILES
    kustomize_files = {p for p in files if is_kustomize_file(p)}
    assert len(kustomize_files) == 14
    standard = {_id(p) for p in STANDARD_FILES}
    assert standard == {
        "k8s/base/csidriver.yaml",
        "k8s/base/daemonset.yaml",
        "k8s/base/serviceaccount.yaml",
        "examples/pod.yaml",
        "examples/envoy.yaml",
        "examples/envoy-sds.yaml",
        "examples/curl-jwt-job.yaml",
        "examples/selinux/pod.yaml",
    }


@pytest.mark.parametrize("path", STANDARD_FILES, ids=_id)
def test_standard_manifests_are_strictly_schema_valid(path: Path) -> None:
    for doc in load_docs(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", [*sorted(OVERLAYS), "examples/selinux"])
def test_rendered_kustomizations_are_strictly_schema_valid(name: str) -> None:
    folder = EXAMPLES / "selinux" if name == "examples/selinux" else OVERLAYS[name][0]
    docs = render(folder)
    extra = ["PodMonitor", "PrometheusRule"] if name == "monitoring" else []
    assert sorted(d["kind"] for d in docs) == sorted(STANDARD_KINDS + extra)
    for doc in docs:
        if doc["kind"] in STANDARD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_an_unknown_field() -> None:
    (daemonset,) = [d for d in render(K8S) if d["kind"] == "DaemonSet"]
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["mountPropagation"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- the DaemonSet against the driver and the kubelet -------------------------------------


@pytest.fixture(params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> tuple[list[Doc], str]:
    folder, kubelet_root = OVERLAYS[request.param]
    return render(folder), kubelet_root


def test_driver_args_are_flags_the_cli_documents(rendered: tuple[list[Doc], str]) -> None:
    driver = containers(one(rendered[0], "DaemonSet"))["driver"]
    assert driver["args"][0] == "serve"
    passed = set(flags(driver["args"]))
    assert passed <= SERVE_FLAGS, f"unknown flags: {sorted(passed - SERVE_FLAGS)}"
    for env in driver.get("env", []):
        if env["name"] != "NODE_NAME":
            name = env["name"].removeprefix("TRIO_SPIRECSI_")
            assert name != env["name"], f"{env['name']}: not a driver setting"
            assert "--" + name.lower().replace("_", "-") in SERVE_FLAGS, env["name"]


def test_every_required_setting_is_passed(rendered: tuple[list[Doc], str]) -> None:
    driver = containers(one(rendered[0], "DaemonSet"))["driver"]
    passed = flags(driver["args"])
    required = {"--csi-endpoint", "--admin-socket", "--node-id", "--state-dir", "--kubelet-dir"}
    assert required <= set(passed)
    assert passed["--node-id"] == "$(NODE_NAME)"
    (node_name,) = [e for e in driver["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_csi_socket_is_shared_by_driver_registrar_and_livenessprobe(
    rendered: tuple[list[Doc], str],
) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    by_name = containers(daemonset)
    socket = str(parse_csi_endpoint(flags(by_name["driver"]["args"])["--csi-endpoint"]))
    plugin_volume = volume_for_path(by_name["driver"], socket)
    for sidecar in ("node-driver-registrar", "livenessprobe"):
        container = by_name[sidecar]
        address = flags(container["args"])["--csi-address"]
        assert address == socket, sidecar
        assert volume_for_path(container, address) == plugin_volume, sidecar
        assert (
            mount_of(container, plugin_volume)["mountPath"]
            == mount_of(by_name["driver"], plugin_volume)["mountPath"]
        )


def test_registration_path_is_the_driver_socket_seen_from_the_host(
    rendered: tuple[list[Doc], str],
) -> None:
    docs, kubelet_root = rendered
    daemonset = one(docs, "DaemonSet")
    by_name = containers(daemonset)
    driver_flags = flags(by_name["driver"]["args"])
    driver_name = driver_flags.get("--driver-name", DEFAULT_DRIVER_NAME)
    socket = PurePosixPath(parse_csi_endpoint(driver_flags["--csi-endpoint"]))
    plugin_volume = volume_for_path(by_name["driver"], str(socket))
    mount_path = mount_of(by_name["driver"], plugin_volume)["mountPath"]
    host_dir = volumes(daemonset)[plugin_volume]["hostPath"]["path"]
    host_socket = PurePosixPath(host_dir) / socket.relative_to(mount_path)

    registration = flags(by_name["node-driver-registrar"]["args"])
    assert registration["--kubelet-registration-path"] == str(host_socket)
    assert host_dir == f"{kubelet_root}/plugins/{driver_name}"
    registry_volume = volume_for_path(by_name["node-driver-registrar"], "/registration")
    assert volumes(daemonset)[registry_volume]["hostPath"]["path"] == (
        f"{kubelet_root}/plugins_registry"
    )


def test_driver_name_is_the_same_everywhere(rendered: tuple[list[Doc], str]) -> None:
    docs, _ = rendered
    driver = containers(one(docs, "DaemonSet"))["driver"]
    name = flags(driver["args"]).get("--driver-name", DEFAULT_DRIVER_NAME)
    assert one(docs, "CSIDriver")["metadata"]["name"] == name == "csi.spire.io"
    for path, doc in example_docs():
        for spec in pod_specs(doc):
            for volume in spec.get("volumes", []):
                if "csi" in volume:
                    assert volume["csi"]["driver"] == name, path


def test_pods_folder_is_mounted_at_its_host_path_with_bidirectional_propagation(
    rendered: tuple[list[Doc], str],
) -> None:
    docs, kubelet_root = rendered
    daemonset = one(docs, "DaemonSet")
    driver = containers(daemonset)["driver"]
    kubelet_dir = flags(driver["args"])["--kubelet-dir"]
    assert kubelet_dir == kubelet_root
    pods = volume_for_path(driver, f"{kubelet_dir}/pods/some-uid/volumes")
    mount = mount_of(driver, pods)
    assert mount["mountPath"] == f"{kubelet_dir}/pods"
    assert volumes(daemonset)[pods]["hostPath"]["path"] == f"{kubelet_dir}/pods"
    assert mount["mountPropagation"] == "Bidirectional"
    bidirectional = [
        (c["name"], m["name"])
        for c in containers(daemonset).values()
        for m in c.get("volumeMounts", [])
        if m.get("mountPropagation") == "Bidirectional"
    ]
    assert bidirectional == [("driver", pods)]


def test_every_mount_names_a_declared_volume_and_every_volume_is_used(
    rendered: tuple[list[Doc], str],
) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    declared = set(volumes(daemonset))
    mounted = {m["name"] for c in containers(daemonset).values() for m in c["volumeMounts"]}
    assert mounted <= declared
    assert declared <= mounted


def test_only_the_driver_is_privileged_and_every_root_filesystem_is_read_only(
    rendered: tuple[list[Doc], str],
) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    for name, container in containers(daemonset).items():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context.get("privileged", False) is (name == "driver"), name
        if name != "driver":
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
    spec = daemonset["spec"]["template"]["spec"]
    assert spec.get("hostPID", False) is False
    assert spec.get("hostNetwork", False) is False
    assert spec["automountServiceAccountToken"] is False


def test_admin_socket_and_state_folders_come_from_the_host(
    rendered: tuple[list[Doc], str],
) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    driver = containers(daemonset)["driver"]
    passed = flags(driver["args"])
    admin_dir = str(PurePosixPath(passed["--admin-socket"]).parent)
    admin_volume = volume_for_path(driver, passed["--admin-socket"])
    assert mount_of(driver, admin_volume)["mountPath"] == admin_dir
    assert volumes(daemonset)[admin_volume]["hostPath"]["path"] == admin_dir
    for name, container in containers(daemonset).items():
        if name != "driver":
            assert admin_volume not in {m["name"] for m in container["volumeMounts"]}, name

    state_dir = passed["--state-dir"]
    state_volume = volume_for_path(driver, state_dir)
    assert mount_of(driver, state_volume)["mountPath"] == state_dir
    host_state = volumes(daemonset)[state_volume]["hostPath"]
    assert host_state["path"] == state_dir
    assert host_state["type"] == "DirectoryOrCreate"
    assert PurePosixPath(state_dir).is_relative_to("/run"), "keys must stay on tmpfs"


def test_probes_and_ports_line_up(rendered: tuple[list[Doc], str]) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    by_name = containers(daemonset)
    driver = by_name["driver"]
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    _host, metrics_port = parse_addr(flags(driver["args"])["--metrics-addr"])
    assert ports["metrics"] == metrics_port == 9809
    assert driver["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert driver["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    health_port = int(flags(by_name["livenessprobe"]["args"])["--health-port"])
    assert ports["healthz"] == health_port == 9808
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_daemonset_runs_on_every_linux_node_and_rolls(rendered: tuple[list[Doc], str]) -> None:
    daemonset = one(rendered[0], "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name, container in containers(daemonset).items():
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
    images = {name: c["image"] for name, c in containers(daemonset).items()}
    assert images["node-driver-registrar"] == (
        "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0"
    )
    assert images["livenessprobe"] == "registry.k8s.io/sig-storage/livenessprobe:v2.15.0"


def test_service_account_exists_where_the_daemonset_uses_it(
    rendered: tuple[list[Doc], str],
) -> None:
    docs = rendered[0]
    daemonset = one(docs, "DaemonSet")
    account = one(docs, "ServiceAccount")
    assert (
        account["metadata"]["name"] == daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    )
    assert account["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert "Namespace" not in {d["kind"] for d in docs}, "delete -k must never remove a namespace"


def test_csidriver_declares_what_the_driver_supports() -> None:
    spec = one(render(K8S), "CSIDriver")["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral"],
        "fsGroupPolicy": "File",
        "requiresRepublish": False,
    }


@pytest.mark.parametrize("overlay", ["microk8s", "k0s"])
def test_overlays_change_only_the_kubelet_root(overlay: str) -> None:
    folder, root = OVERLAYS[overlay]
    base = json.dumps(render(K8S), sort_keys=True)
    assert json.loads(base.replace("/var/lib/kubelet", root)) == render(folder)
    assert "/var/lib/kubelet/" not in json.dumps(render(folder)).replace(root, "<root>")


def test_selinux_example_only_adds_the_context_to_the_driver() -> None:
    base, selinux = render(K8S), render(EXAMPLES / "selinux")
    assert [d["kind"] for d in base] == [d["kind"] for d in selinux]
    driver = containers(one(selinux, "DaemonSet"))["driver"]
    env = {e["name"]: e.get("value") for e in driver["env"]}
    assert env["TRIO_SPIRECSI_SELINUX_CONTEXT"] == "system_u:object_r:container_file_t:s0"
    driver["env"] = [e for e in driver["env"] if e["name"] != "TRIO_SPIRECSI_SELINUX_CONTEXT"]
    assert selinux == base
    commented = (K8S / "base" / "daemonset.yaml").read_text()
    assert "# - name: TRIO_SPIRECSI_SELINUX_CONTEXT" in commented


# --- SPIRE registration -----------------------------------------------------------------


def _agent_conf() -> str:
    return (AGENT_CONF / "agent.conf").read_text()


def _hcl_string(conf: str, key: str) -> str:
    match = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', conf, re.MULTILINE)
    assert match, key
    return match[1]


def driver_id(docs: list[Doc], trust_domain: str = "example.org") -> str:
    """The SPIFFE ID the driver pods get: from their namespace and service account."""
    daemonset = one(docs, "DaemonSet")
    namespace = daemonset["metadata"]["namespace"]
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


def test_the_default_install_meets_spire_from_its_helm_chart() -> None:
    docs = render(K8S)
    daemonset = one(docs, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == CHART_NAMESPACE
    driver = containers(daemonset)["driver"]
    assert flags(driver["args"])["--admin-socket"] == CHART_ADMIN_SOCKET
    values = yaml.safe_load((K8S / "spire" / "helm-values.yaml").read_text())
    delegates = values["spire-agent"]["authorizedDelegates"]
    assert [f"spiffe://example.org{d}" for d in delegates] == [driver_id(docs)]


def test_agent_conf_overlay_changes_only_the_namespace_and_the_admin_socket() -> None:
    base, overlay = render(K8S), render(AGENT_CONF)
    for doc in overlay:
        if doc["kind"] != "CSIDriver":
            assert doc["metadata"]["namespace"] == "spire"
    text = json.dumps(base, sort_keys=True)
    text = text.replace(CHART_ADMIN_SOCKET, "/run/spire/admin/admin.sock")
    text = text.replace(str(PurePosixPath(CHART_ADMIN_SOCKET).parent), "/run/spire/admin")
    text = text.replace(f'"namespace": "{CHART_NAMESPACE}"', '"namespace": "spire"')
    assert json.loads(text) == overlay


def test_agent_conf_authorizes_the_driver_on_the_socket_it_dials() -> None:
    conf = _agent_conf()
    docs = render(AGENT_CONF)
    driver = containers(one(docs, "DaemonSet"))["driver"]
    admin = _hcl_string(conf, "admin_socket_path")
    assert admin == flags(driver["args"])["--admin-socket"]
    workload_socket = _hcl_string(conf, "socket_path")
    assert PurePosixPath(workload_socket).parent != PurePosixPath(admin).parent
    delegates = re.search(r"authorized_delegates\s*=\s*\[([^\]]*)\]", conf)
    assert delegates
    assert re.findall(r'"([^"]+)"', delegates[1]) == [driver_id(docs)]
    assert _hcl_string(conf, "trust_domain") == "example.org"


def test_agent_patch_exposes_the_admin_folder_the_driver_mounts() -> None:
    (patch,) = load_docs(AGENT_CONF / "agent-daemonset-patch.yaml")
    assert (patch["apiVersion"], patch["kind"]) == ("apps/v1", "DaemonSet")
    assert (
        patch["metadata"]["namespace"]
        == one(render(AGENT_CONF), "DaemonSet")["metadata"]["namespace"]
    )
    spec = patch["spec"]["template"]["spec"]
    admin_dir = str(PurePosixPath(_hcl_string(_agent_conf(), "admin_socket_path")).parent)
    (volume,) = spec["volumes"]
    assert volume["hostPath"]["path"] == admin_dir
    (container,) = spec["containers"]
    assert mount_of(container, volume["name"])["mountPath"] == admin_dir
    driver_volumes = volumes(one(render(AGENT_CONF), "DaemonSet"))
    assert admin_dir in {v.get("hostPath", {}).get("path") for v in driver_volumes.values()}


def _check_cluster_spiffe_id(doc: Doc) -> None:
    assert doc["apiVersion"] == "spire.spiffe.io/v1alpha1"
    assert doc["kind"] == "ClusterSPIFFEID"
    assert "namespace" not in doc["metadata"], "ClusterSPIFFEID is cluster-scoped"
    assert set(doc["spec"]) <= CLUSTER_SPIFFE_ID_FIELDS
    assert doc["spec"]["spiffeIDTemplate"] == (
        "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/"
        "{{ .PodSpec.ServiceAccountName }}"
    )
    assert doc["spec"]["className"] == SPIRE_CLASS_NAME, "ignored by the chart's controller"
    for template in doc["spec"].get("workloadSelectorTemplates", []):
        kind, _, value = template.partition(":")
        assert kind == "k8s" and value.startswith(DRIVER_SELECTOR_KINDS), template


def _selected_by(selector: Doc, labels: Mapping[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}
    return bool(selector["matchLabels"].items() <= labels.items())


def test_driver_cluster_spiffe_id_selects_the_driver_pods() -> None:
    (doc,) = load_docs(K8S / "spire" / "clusterspiffeid-driver.yaml")
    _check_cluster_spiffe_id(doc)
    daemonset = one(render(K8S), "DaemonSet")
    namespace = daemonset["metadata"]["namespace"]
    assert _selected_by(
        doc["spec"]["podSelector"], daemonset["spec"]["template"]["metadata"]["labels"]
    )
    assert _selected_by(
        doc["spec"]["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
    )
    (kustomization,) = load_docs(K8S / "spire" / "kustomization.yaml")
    assert kustomization["resources"] == ["clusterspiffeid-driver.yaml"]


def test_workload_cluster_spiffe_id_selects_every_example_workload() -> None:
    (doc,) = load_docs(K8S / "spire" / "clusterspiffeid-workloads.yaml")
    _check_cluster_spiffe_id(doc)
    workloads = 0
    for _path, example in example_docs():
        for spec in pod_specs(example):
            if any("csi" in v for v in spec.get("volumes", [])):
                template = example if example["kind"] == "Pod" else example["spec"]["template"]
                assert _selected_by(doc["spec"]["podSelector"], template["metadata"]["labels"])
                workloads += 1
    assert workloads >= 4


def test_spire_server_commands_register_the_authorized_delegate() -> None:
    readme = (AGENT_CONF / "README.md").read_text()
    commands = [
        shlex.split(block.replace("\\\n", " "))
        for block in re.findall(r"spire-server entry create(?:[^\n]*\\\n)*[^\n]*", readme)
    ]
    assert len(commands) == 3
    driver_entries = [c for c in commands if driver_id(render(AGENT_CONF)) in c]
    assert len(driver_entries) == 1
    (entry,) = driver_entries
    selectors = {entry[i + 1] for i, word in enumerate(entry) if word == "-selector"}
    assert {"k8s:ns:spire", "k8s:sa:trio-spirecsi"} <= selectors
    for command in commands:
        if "-node" in command:
            continue
        assert "-parentID" in command
        for i, word in enumerate(command):
            if word == "-selector" and command is not entry:
                kind, _, value = command[i + 1].partition(":")
                assert kind == "k8s" and value.startswith(DRIVER_SELECTOR_KINDS), command


# --- monitoring components ----------------------------------------------------------------


def _exposed_metric_names() -> set[str]:
    """Every series name of a real exposition of the driver's metrics (one volume's SVID
    known, one error of each kind seen, every publish outcome present)."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from trio_spirecsi.metrics import Metrics

    metrics = Metrics()
    metrics.set_expiry_source(lambda: [time.time() + 3600])
    metrics.errors_total.labels(kind="agent_unavailable").inc()
    body, _ = metrics.render()
    return {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


PROMQL_WORDS = {"sum", "by", "rate", "increase", "min", "max", "and", "or", "unless", "on"}


def test_podmonitor_scrapes_the_driver_metrics_port() -> None:
    docs = render(OVERLAYS["monitoring"][0])
    daemonset, monitor = one(docs, "DaemonSet"), one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert _selected_by(monitor["spec"]["selector"], labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in containers(daemonset)["driver"]["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}


def test_alert_rules_use_only_metrics_the_driver_exports() -> None:
    docs = render(OVERLAYS["monitoring"][0])
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == one(docs, "DaemonSet")["metadata"]["namespace"]
    exposed = _exposed_metric_names()
    alerts = {}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for item in group["rules"]:
            assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}
            assert item["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(item["annotations"])
            alerts[item["alert"]] = item["expr"]
            without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\([^()]*\)\s*(?=\()", " ", item["expr"])
            names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels))
            names -= PROMQL_WORDS | {"namespace", "pod", "outcome", "kind"}
            assert names, item["alert"]
            assert names <= exposed, (item["alert"], names - exposed)
    expressions = " ".join(alerts.values())
    for wanted in (
        "trio_spirecsi_svid_expiry_min_seconds",  # SVID close to expiry
        'trio_spirecsi_svids_expiring{within_seconds="0"}',  # volumes degraded
        "trio_spirecsi_agent_connected",  # agent unreachable
        "trio_spirecsi_errors_total",  # errors
        "trio_spirecsi_publish_duration_seconds_count",
    ):
        assert wanted in expressions, wanted


def test_the_expression_check_catches_an_unknown_metric() -> None:
    exposed = _exposed_metric_names()
    assert "trio_spirecsi_svid_remaining_seconds_bucket" not in exposed
    assert "trio_spirecsi_errors_total" in exposed
    assert "process_resident_memory_bytes" in exposed


def test_the_components_add_only_their_objects() -> None:
    base, monitoring = render(K8S), render(OVERLAYS["monitoring"][0])
    assert [d for d in monitoring if d["kind"] in STANDARD_KINDS] == base
    for name, kind in (("podmonitor", "PodMonitor"), ("alerts", "PrometheusRule")):
        docs = render(K8S / "components" / name, kind="Component")
        assert [d["kind"] for d in docs] == [kind]


# --- examples: consumers read what the driver writes ---------------------------------------


def _csi_volumes(spec: Doc) -> dict[str, Doc]:
    return {v["name"]: v["csi"] for v in spec.get("volumes", []) if "csi" in v}


def test_example_volumes_are_read_only_and_use_driver_attributes() -> None:
    found = 0
    for path, doc in example_docs():
        for spec in pod_specs(doc):
            for name, csi in _csi_volumes(spec).items():
                found += 1
                assert csi["readOnly"] is True, (path, name)
                for key in csi.get("volumeAttributes", {}):
                    assert key.startswith("csi.spire.io/"), (path, key)
                for container in spec["containers"]:
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == name:
                            assert mount["readOnly"] is True, (path, container["name"])
    assert found >= 4


def _mount_paths(spec: Doc, volume: str) -> set[str]:
    return {
        m["mountPath"]
        for c in spec["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == volume
    }


def test_envoy_watches_the_volume_folder_for_the_default_file_names() -> None:
    docs = load_docs(EXAMPLES / "envoy.yaml")
    config = one(docs, "ConfigMap")["data"]
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (spiffe_volume,) = _csi_volumes(spec)
    (folder,) = _mount_paths(spec, spiffe_volume)
    (config_volume,) = [v["name"] for v in spec["volumes"] if "configMap" in v]
    (config_dir,) = _mount_paths(spec, config_volume)

    bootstrap = yaml.safe_load(config["envoy.yaml"])
    sds_paths = re.findall(r"'path': '([^']+\.yaml)'", str(bootstrap))
    assert sorted(sds_paths) == [f"{config_dir}/sds_bundle.yaml", f"{config_dir}/sds_svid.yaml"]
    svid = yaml.safe_load(config["sds_svid.yaml"])["resources"][0]["tls_certificate"]
    assert svid["certificate_chain"]["filename"] == f"{folder}/svid.pem"
    assert svid["private_key"]["filename"] == f"{folder}/svid_key.pem"
    assert svid["watched_directory"]["path"] == folder
    bundle = yaml.safe_load(config["sds_bundle.yaml"])["resources"][0]["validation_context"]
    assert bundle["trusted_ca"]["filename"] == f"{folder}/svid_bundle.pem"
    assert bundle["watched_directory"]["path"] == folder
    (allowed,) = bundle["match_typed_subject_alt_names"]
    job = load_docs(EXAMPLES / "curl-jwt-job.yaml")
    client = one(job, "Job")["spec"]["template"]["spec"]["serviceAccountName"]
    assert allowed["matcher"]["exact"] == f"spiffe://example.org/ns/default/sa/{client}"
    service = one(docs, "Service")
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def _walk(node: object) -> list[dict[str, Any]]:
    """Every mapping inside a parsed YAML document."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _walk(value)
    elif isinstance(node, list):
        for value in node:
            found += _walk(value)
    return found


def test_envoy_gets_its_identity_over_sds_from_the_pods_socket_where_istio_looks() -> None:
    docs = load_docs(EXAMPLES / "envoy-sds.yaml")
    bootstrap = yaml.safe_load(one(docs, "ConfigMap")["data"]["envoy.yaml"])
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    ((volume, csi),) = _csi_volumes(spec).items()
    (folder,) = _mount_paths(spec, volume)
    attributes = csi["volumeAttributes"]
    assert attributes["csi.spire.io/workload-api"] == "true"
    assert folder == "/var/run/secrets/workload-spiffe-uds"  # Istio's WorkloadIdentityPath
    assert attributes["csi.spire.io/workload-api-socket"] == "socket"  # Istio's default name
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] != "app"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["pipe"]["path"] == f"{folder}/socket"
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(options)  # gRPC needs HTTP/2 to the socket
    configs = [m for m in _walk(bootstrap) if "sds_config" in m]
    assert sorted(c["name"] for c in configs) == ["ROOTCA", "default"]
    for config in configs:
        source = config["sds_config"]["api_config_source"]
        assert source["api_type"] == "GRPC" and source["transport_api_version"] == "V3"
        (service,) = source["grpc_services"]
        assert service["envoy_grpc"]["cluster_name"] == cluster["name"]
    # The socket is 0660 owned by the pod's fsGroup; Envoy runs as a member of it.
    security = spec["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"]


def test_curl_job_reads_its_jwt_from_the_file_the_driver_writes() -> None:
    docs = load_docs(EXAMPLES / "curl-jwt-job.yaml")
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    ((volume, csi),) = _csi_volumes(spec).items()
    (folder,) = _mount_paths(spec, volume)
    attributes = csi["volumeAttributes"]
    assert attributes["csi.spire.io/jwt-audiences"] == "api"
    token = attributes.get("csi.spire.io/jwt-svid-file", "jwt_svid.token")
    script = " ".join(spec["containers"][0]["command"])
    assert f"Bearer $(cat {folder}/{token})" in script
    for name in ("svid.pem", "svid_key.pem", "svid_bundle.pem"):
        assert f"{folder}/{name}" in script
    envoy = load_docs(EXAMPLES / "envoy.yaml")
    port = one(envoy, "Service")["spec"]["ports"][0]["port"]
    assert f"https://api.default.svc:{port}/" in script


# --- the image ------------------------------------------------------------------------------


def test_containerfile_runs_the_driver_and_checks_its_health_endpoint() -> None:
    text = (ROOT / "Containerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(froms) == 2, "multi-stage: build, runtime"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert base and base[1].startswith("docker.io/library/python:3.11-slim")
    assert re.search(r'^ENTRYPOINT \["trio-spirecsi"\]$', text, re.MULTILINE)
    healthcheck = re.search(
        r'^\s+CMD \["trio-spirecsi", "healthcheck", "--url", "([^"]+)"\]', text, re.MULTILINE
    )
    assert healthcheck
    daemonset = one(render(K8S), "DaemonSet")
    _host, port = parse_addr(flags(containers(daemonset)["driver"]["args"])["--metrics-addr"])
    assert healthcheck[1] == f"http://127.0.0.1:{port}/healthz"
    for label in ("title", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    version = re.search(r"^ARG VERSION=(\S+)", text, re.MULTILINE)
    assert version
    assert containers(daemonset)["driver"]["image"].endswith(f":{version[1]}")
