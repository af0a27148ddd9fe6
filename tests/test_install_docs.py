"""The install commands in docs/operations.md and the README, read as an operator follows them:
every file and folder they name exists, every namespace, release and class agrees with the
manifests, the chart and SPIRE's chart values, and every --set names a value the chart has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.test_helm import CHART, SPIRE_NAMESPACE, SPIRE_RELEASE, chart_docs
from tests.test_manifests import (
    CHART_ADMIN_SOCKET,
    CHART_NAMESPACE,
    K8S,
    ROOT,
    SPIRE_CLASS_NAME,
    containers,
    flags,
    load_docs,
    one,
    render,
)

OPERATIONS = ROOT / "docs" / "operations.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def commands(text: str) -> list[list[str]]:
    """Every command of the ```sh blocks, continuation lines joined, comments dropped."""
    found = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(shlex.split(line))
    return found


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_operations_starts_with_spire_installed_with_helm() -> None:
    headings = re.findall(r"^## (.+)$", OPERATIONS.read_text(), re.MULTILINE)
    assert headings[0] == "SPIRE installed with Helm"


def test_the_spire_release_commands_give_the_class_the_driver_identity_carries() -> None:
    helm_section = section(OPERATIONS.read_text(), "SPIRE installed with Helm")
    installs = [c for c in commands(helm_section) if c[:3] == ["helm", "upgrade", "--install"]]
    assert [c[5:7] for c in installs] == [["spire-crds", "spire-crds"], ["spire", "spire"]]
    for command in installs:
        assert option(command, "-n") == SPIRE_NAMESPACE
        assert option(command, "--repo") == "https://spiffe.github.io/helm-charts-hardened/"
    spire = installs[1]
    assert spire[5] == SPIRE_RELEASE
    values = [spire[i + 1] for i, word in enumerate(spire) if word == "-f"]
    assert values[-1] == "k8s/spire/helm-values.yaml"
    assert (ROOT / values[-1]).is_file()
    class_name = f"{option(spire, '-n')}-{spire[5]}"
    assert class_name == SPIRE_CLASS_NAME
    (identity,) = load_docs(K8S / "spire" / "clusterspiffeid-driver.yaml")
    assert identity["spec"]["className"] == class_name
    assert f"`spec.className: {class_name}`" in helm_section


def test_every_path_the_install_commands_name_exists() -> None:
    text = OPERATIONS.read_text()
    checked = 0
    for command in commands(text) + commands((K8S / "spire" / "README.md").read_text()):
        if command[:2] in (["kubectl", "apply"], ["kubectl", "delete"]):
            kind, path = command[2], command[3]
            target = ROOT / path
            if kind == "-k":
                assert (target / "kustomization.yaml").is_file(), command
            else:
                assert kind == "-f" and target.is_file(), command
            checked += 1
        if command[:2] in (["helm", "install"], ["helm", "upgrade"]) and "charts/" in " ".join(
            command
        ):
            (chart,) = [w for w in command if w.startswith("charts/")]
            assert (ROOT / chart / "Chart.yaml").is_file(), command
            assert option(command, "-n") == CHART_NAMESPACE, command
            checked += 1
    assert checked >= 6


def test_every_set_in_the_docs_names_a_chart_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = OPERATIONS.read_text()
    sets = re.findall(r"--set ([\w.]+)=(\S+?)`?\s", text)
    assert len(sets) >= 4
    for key, value in sets:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
        chart_docs({key.split(".")[0]: _nested(key.split(".")[1:], _typed(value))})


def _typed(value: str) -> object:
    return {"true": True, "false": False}.get(value, value)


def _nested(parts: list[str], value: object) -> object:
    return value if not parts else {parts[0]: _nested(parts[1:], value)}


@pytest.mark.parametrize("where", ["kustomize", "chart"])
def test_the_namespace_and_socket_the_docs_give_are_the_installs(where: str) -> None:
    docs = render(K8S) if where == "kustomize" else chart_docs()
    daemonset = one(docs, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == CHART_NAMESPACE
    driver = containers(daemonset)["driver"]
    assert flags(driver["args"])["--admin-socket"] == CHART_ADMIN_SOCKET
    helm_section = section(OPERATIONS.read_text(), "SPIRE installed with Helm")
    assert CHART_ADMIN_SOCKET in helm_section
    assert f"spiffe://<trust domain>/ns/{CHART_NAMESPACE}/sa/trio-spirecsi" in helm_section
    for command in commands(helm_section):
        if command[0] == "kubectl" and "-n" in command:
            assert option(command, "-n") == CHART_NAMESPACE, command


def test_the_readme_quickstart_and_ci_agree() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = commands(section(readme, "Quickstart"))
    assert quickstart == [
        ["scripts/bootstrap.sh", "demo", "&&", ".venv/bin/just", "demo"],
        ["scripts/bootstrap.sh", "&&", ".venv/bin/just", "test"],
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nscripts/bootstrap.sh\n" in ci
    assert "exec .venv/bin/just test" in ci


def test_no_install_document_still_points_to_the_old_layout() -> None:
    for path in [OPERATIONS, ROOT / "README.md", K8S / "spire" / "README.md"]:
        text = path.read_text()
        assert "k8s/spire/agent.conf" not in text, path
        assert "k8s/spire/agent-daemonset-patch.yaml" not in text, path
        assert "-n spire " not in text and "-n spire\n" not in text, path
    assert not Path(K8S / "spire" / "agent.conf").exists()
