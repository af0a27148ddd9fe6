"""Helm, rendered and linted with Helm's own engine (helm-python-sdk bundles Helm v4's Go SDK,
so no helm binary is needed).

- The driver's chart (charts/trio-spirecsi) lints clean, validates its values with its
  schema, and renders the same objects as the kustomize install for every layout k8s/ ships.
- SPIRE's official chart, rendered with k8s/spire/helm-values.yaml on top of a production
  values file, exposes the agent's admin socket on the host path the driver mounts, lists the
  driver's SPIFFE ID as an authorized delegate, and hands the driver's identity to its
  controller manager under the controller's className. That chart is not vendored here: the
  test reads it from $SPIRE_CHART_DIR or <repo>/../shared/reference/spire-chart/spire, skips
  when neither exists, and fails when CI=true.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.test_manifests import (
    CHART_ADMIN_SOCKET,
    CHART_NAMESPACE,
    EXAMPLES,
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    ROOT,
    SPIRE_CLASS_NAME,
    STANDARD_KINDS,
    Doc,
    containers,
    driver_id,
    flags,
    load_docs,
    one,
    render,
)

CHART = ROOT / "charts" / "trio-spirecsi"
RELEASE = "trio-spirecsi"
SPIRE_RELEASE, SPIRE_NAMESPACE = "spire", "spire-mgmt"
"""SPIRE's production install (its README): releases spire-crds and spire in spire-mgmt."""
TRUST_DOMAIN = "prod.example.com"


def render_chart(
    values: dict[str, Any] | None = None, namespace: str = CHART_NAMESPACE
) -> dict[str, str]:
    with helm_python.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(
            values or {}, name=RELEASE, namespace=namespace, is_install=True
        )
    return rendered


def manifests(rendered: dict[str, str]) -> list[Doc]:
    return [
        doc
        for name, text in sorted(rendered.items())
        if not name.endswith(".txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def chart_docs(values: dict[str, Any] | None = None, namespace: str = CHART_NAMESPACE) -> list[Doc]:
    return manifests(render_chart(values, namespace))


def notes(values: dict[str, Any] | None = None, namespace: str = CHART_NAMESPACE) -> str:
    return render_chart(values, namespace)[f"{CHART.name}/templates/NOTES.txt"]


def without_labels(doc: Doc) -> Doc:
    """The object without the labels Helm adds (instance, managed-by, chart, version)."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("labels", None)
    if doc["kind"] == "DaemonSet":
        template = doc["spec"]["template"]["metadata"]
        template.pop("labels", None)
        doc["spec"].pop("selector")
    return doc


def same_objects(chart: list[Doc], kustomize: list[Doc]) -> None:
    """Same kinds, names, namespaces and content, labels aside."""
    by_kind = {d["kind"]: without_labels(d) for d in chart}
    assert sorted(by_kind) == sorted(d["kind"] for d in kustomize)
    for doc in kustomize:
        assert by_kind[doc["kind"]] == without_labels(doc), doc["kind"]


# --- the driver's chart ------------------------------------------------------------------


def test_the_chart_lints_clean() -> None:
    for values in ({}, {"metrics": {"podMonitor": {"enabled": True}}}):
        report = helm_python.lint(
            str(CHART), values, strict=True, namespace=CHART_NAMESPACE, kube_version="v1.30.0"
        )
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == []


def test_the_default_render_is_the_kustomize_install() -> None:
    """One source of truth: the DaemonSet's command line, mounts, security context,
    probes, resources and scheduling, the CSIDriver and the ServiceAccount are the same."""
    same_objects(chart_docs(), render(K8S))


@pytest.mark.parametrize("overlay", ["microk8s", "k0s"])
def test_kubelet_dir_gives_the_kubelet_root_overlays(overlay: str) -> None:
    folder, root = OVERLAYS[overlay]
    same_objects(chart_docs({"kubeletDir": root}), render(folder))


def test_admin_socket_and_namespace_give_the_agent_conf_overlay() -> None:
    values = {"spire": {"adminSocket": "/run/spire/admin/admin.sock"}}
    same_objects(chart_docs(values, namespace="spire"), render(OVERLAYS["agent-conf"][0]))


def test_selinux_context_gives_the_selinux_example() -> None:
    values = {"driver": {"selinuxContext": "system_u:object_r:container_file_t:s0"}}
    same_objects(chart_docs(values), render(EXAMPLES / "selinux"))


def test_the_monitoring_objects_are_the_kustomize_components() -> None:
    values = {"metrics": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
    chart = chart_docs(values)
    kustomize = render(OVERLAYS["monitoring"][0])
    for kind in ("PodMonitor", "PrometheusRule"):
        ours, theirs = one(chart, kind), one(kustomize, kind)
        assert ours["metadata"]["namespace"] == theirs["metadata"]["namespace"]
        if kind == "PrometheusRule":
            assert ours["spec"] == theirs["spec"]
        else:
            assert ours["spec"]["podMetricsEndpoints"] == theirs["spec"]["podMetricsEndpoints"]
            labels = one(chart, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
            assert ours["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {d["kind"] for d in chart_docs()} == set(STANDARD_KINDS)


def test_every_rendered_object_is_strictly_schema_valid() -> None:
    for values in (
        {},
        {"metrics": {"enabled": False}},
        {"nodeSelector": {}, "tolerations": [], "priorityClassName": ""},
        {"imagePullSecrets": [{"name": "registry"}], "podAnnotations": {"a": "b"}},
    ):
        for doc in chart_docs(values):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_values_reach_the_daemonset() -> None:
    values = {
        "image": {"repository": "registry.example.com/trio-spirecsi", "tag": "dev"},
        "nodeSelector": {"kubernetes.io/os": "linux", "pool": "edge"},
        "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
        "driver": {"resources": {"limits": {"memory": "512Mi"}}, "logLevel": "debug"},
        "metrics": {"port": 9100},
    }
    daemonset = one(chart_docs(values), "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    driver = containers(daemonset)["driver"]
    assert driver["image"] == "registry.example.com/trio-spirecsi:dev"
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert spec["tolerations"] == values["tolerations"]
    assert driver["resources"]["limits"]["memory"] == "512Mi"
    passed = flags(driver["args"])
    assert passed["--log-level"] == "debug"
    assert passed["--metrics-addr"] == "0.0.0.0:9100"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in driver["ports"]
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"


def test_without_metrics_there_is_no_endpoint_and_no_readiness_probe() -> None:
    daemonset = one(chart_docs({"metrics": {"enabled": False}}), "DaemonSet")
    driver = containers(daemonset)["driver"]
    assert "--metrics-addr" not in flags(driver["args"])
    assert "readinessProbe" not in driver
    assert [p["name"] for p in driver["ports"]] == ["healthz"]
    assert "annotations" not in daemonset["spec"]["template"]["metadata"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"kubeletDir": "var/lib/kubelet"}, "at '/kubeletDir': 'var/lib/kubelet' does not match"),
        ({"driver": {"logLevel": "loud"}}, "at '/driver/logLevel': value must be one of"),
        ({"driver": {"publishTimeout": 0}}, "at '/driver/publishTimeout'"),
        ({"metrics": {"port": "9809"}}, "at '/metrics/port': got string, want integer"),
        ({"spire": {"adminSocket": "admin.sock"}}, "at '/spire/adminSocket'"),
        ({"kubeletdir": "/var/lib/kubelet"}, "additional properties 'kubeletdir' not allowed"),
    ],
)
def test_the_schema_refuses_bad_values_and_names_them(values: dict[str, Any], says: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        render_chart(values)
    assert says in str(info.value)


def test_notes_tell_the_operator_what_to_set_in_the_spire_release() -> None:
    text = notes(namespace="identity")
    assert "/ns/identity/sa/trio-spirecsi" in text
    section = text[text.index("spire-agent:") :]
    values = yaml.safe_load(section[: section.index("\n\n")])
    assert values == {
        "spire-agent": {
            "sockets": {"admin": {"enabled": True, "mountOnHost": True}},
            "authorizedDelegates": ["/ns/identity/sa/trio-spirecsi"],
        }
    }
    identity = text[text.index("spire-server:") :]
    identity_values = yaml.safe_load(identity[: identity.index("\n\n")])
    ours = identity_values["spire-server"]["controllerManager"]["identities"]["clusterSPIFFEIDs"]
    selector = ours["trio-spirecsi"]["namespaceSelector"]["matchLabels"]
    assert selector == {"kubernetes.io/metadata.name": "identity"}
    assert "adminSocket is not where" not in text
    moved = notes({"spire": {"adminSocket": "/run/spire/admin/admin.sock"}})
    assert "spire.adminSocket is not where SPIRE's chart puts the socket" in moved


# --- SPIRE's own chart with k8s/spire/helm-values.yaml ----------------------------------


SPIRE_CHART = "shared/reference/spire-chart/spire"


def spire_chart_dir() -> Path:
    """$SPIRE_CHART_DIR, else ../shared/... beside the checkout (or beside the folder of
    worktrees, for a git worktree one level deeper)."""
    configured = os.environ.get("SPIRE_CHART_DIR")
    candidates = [Path(configured)] if configured else [ROOT.parent / SPIRE_CHART]
    if not configured:
        candidates.append(ROOT.parent.parent / SPIRE_CHART)
    for path in candidates:
        if (path / "Chart.yaml").is_file():
            return path
    message = f"SPIRE's Helm chart is not at {candidates[0]} (set SPIRE_CHART_DIR)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule for several -f files: maps merge, everything else is replaced."""
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


PRODUCTION_VALUES: dict[str, Any] = {
    "global": {
        "spire": {
            "recommendations": {"enabled": True},
            "namespaces": {"create": True},
            "clusterName": "prod",
            "trustDomain": TRUST_DOMAIN,
            "caSubject": {"country": "US", "organization": "Acme", "commonName": TRUST_DOMAIN},
        }
    }
}
"""your-values.yaml of SPIRE's production install (its README), with a real trust domain."""


def helm_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((K8S / "spire" / "helm-values.yaml").read_text())
    return values


def render_spire(extra: dict[str, Any] | None = None) -> list[Doc]:
    values = merged(merged(PRODUCTION_VALUES, helm_values()), extra or {})
    with helm_python.Chart.load(spire_chart_dir()) as chart:
        rendered = chart.render(
            values, name=SPIRE_RELEASE, namespace=SPIRE_NAMESPACE, is_install=True
        )
    return manifests(rendered)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def driver_installs() -> Iterator[tuple[str, list[Doc]]]:
    yield "kustomize", render(K8S)
    yield "chart", chart_docs()


@pytest.fixture(scope="module")
def spire() -> list[Doc]:
    return render_spire()


def test_the_agent_exposes_its_admin_socket_where_the_driver_mounts_it(spire: list[Doc]) -> None:
    agent = find(spire, "DaemonSet", "spire-agent")
    assert agent["metadata"]["namespace"] == CHART_NAMESPACE
    conf = json.loads(find(spire, "ConfigMap", "spire-agent")["data"]["agent.conf"])
    socket = PurePosixPath(conf["agent"]["admin_socket_path"])
    (container,) = [c for c in containers(agent).values() if c["name"] == "spire-agent"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(socket.parent)]
    host_dir = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}[mount["name"]][
        "hostPath"
    ]["path"]
    host_socket = str(PurePosixPath(host_dir) / socket.name)
    assert host_socket == CHART_ADMIN_SOCKET
    for name, docs in driver_installs():
        daemonset = one(docs, "DaemonSet")
        driver = containers(daemonset)["driver"]
        assert flags(driver["args"])["--admin-socket"] == host_socket, name
        volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
        mounted = {
            volumes[m["name"]]["hostPath"]["path"]
            for m in driver["volumeMounts"]
            if m["mountPath"] == host_dir
        }
        assert mounted == {host_dir}, name


def test_the_agent_lists_the_driver_as_its_only_delegate(spire: list[Doc]) -> None:
    conf = json.loads(find(spire, "ConfigMap", "spire-agent")["data"]["agent.conf"])
    for name, docs in driver_installs():
        assert conf["agent"]["authorized_delegates"] == [driver_id(docs, TRUST_DOMAIN)], name


def test_the_driver_namespace_is_created_privileged_by_the_spire_chart(spire: list[Doc]) -> None:
    namespace = find(spire, "Namespace", CHART_NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def _controller_class(spire: list[Doc]) -> str:
    config = find(spire, "ConfigMap", "spire-controller-manager")
    class_name: str = yaml.safe_load(config["data"]["controller-manager-config.yaml"])["className"]
    return class_name


def _selects_driver_pods(identity: Doc, docs: list[Doc]) -> bool:
    daemonset = one(docs, "DaemonSet")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    namespace = {"kubernetes.io/metadata.name": daemonset["metadata"]["namespace"]}
    pods = identity["spec"]["podSelector"]["matchLabels"]
    namespaces = identity["spec"]["namespaceSelector"]["matchLabels"]
    return bool(pods.items() <= labels.items() and namespaces.items() <= namespace.items())


def test_the_driver_cluster_spiffe_id_has_the_controllers_class(spire: list[Doc]) -> None:
    class_name = _controller_class(spire)
    assert class_name == SPIRE_CLASS_NAME
    (identity,) = load_docs(K8S / "spire" / "clusterspiffeid-driver.yaml")
    assert identity["spec"]["className"] == class_name
    for name, docs in driver_installs():
        assert _selects_driver_pods(identity, docs), name
    assert not [d for d in spire if d["metadata"]["name"].endswith("-trio-spirecsi")]


def test_the_driver_identity_as_a_chart_value_reaches_the_controller_manager() -> None:
    on = {
        "spire-server": {
            "controllerManager": {
                "identities": {"clusterSPIFFEIDs": {"trio-spirecsi": {"enabled": True}}}
            }
        }
    }
    spire = render_spire(on)
    identity = find(spire, "ClusterSPIFFEID", f"{SPIRE_NAMESPACE}-{SPIRE_RELEASE}-trio-spirecsi")
    assert identity["spec"]["className"] == _controller_class(spire)
    (as_object,) = load_docs(K8S / "spire" / "clusterspiffeid-driver.yaml")
    for key in ("spiffeIDTemplate", "podSelector", "namespaceSelector"):
        assert identity["spec"][key] == as_object["spec"][key], key
    for name, docs in driver_installs():
        assert _selects_driver_pods(identity, docs), name
    default = find(spire, "ClusterSPIFFEID", f"{SPIRE_NAMESPACE}-{SPIRE_RELEASE}-default")
    excluded = default["spec"]["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and CHART_NAMESPACE in excluded["values"]


def test_only_the_agent_mounts_the_admin_socket_folder(spire: list[Doc]) -> None:
    """Whoever can reach the admin socket can act as the driver: in SPIRE's release only the
    agent mounts its folder (and the driver, installed separately)."""
    admin_dir = PurePosixPath(CHART_ADMIN_SOCKET).parent
    mounting = set()
    for doc in spire:
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet") and template:
            for volume in template.get("volumes", []):
                host = volume.get("hostPath", {}).get("path")
                if host and (admin_dir == PurePosixPath(host) or admin_dir.is_relative_to(host)):
                    mounting.add(doc["metadata"]["name"])
    assert mounting == {"spire-agent"}
