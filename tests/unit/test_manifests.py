"""The manifests of ``kubectl apply -k daemonset/``: valid Kubernetes objects, least privilege,
and a container command line that ``tcpacct run`` accepts.

Ground truth is outside the manifests themselves: the Kubernetes OpenAPI schemas shipped by
kubernetes-validate, the click command ``agent.cli:main`` (its ``run`` options and
``config validate``), the package version in pyproject.toml and the defaults in the agent's
code.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAEMONSET_DIR = REPO / "daemonset"
# The oldest Kubernetes the manifests are written for (sidecar-free clusters of 2024 on).
KUBERNETES_VERSION = "1.29.0"
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "podmonitor.yaml"}

# What the agent's metadata cache lists and watches, as (API group, resource).
CACHE_RESOURCES = {
    ("", "pods"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("apps", "replicasets"),
    ("batch", "jobs"),
}
READ_VERBS = {"get", "list", "watch"}

# Why each capability is there: daemonset.yaml's comments and docs/deploy.md.
CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"}

# host path -> where the container sees it; every one read-only.
HOST_MOUNTS = {
    "/proc": "/host/proc",
    "/sys/fs/cgroup": "/host/sys/fs/cgroup",
    "/sys/kernel/btf": "/sys/kernel/btf",
    "/sys/kernel/tracing": "/sys/kernel/tracing",
    "/sys/kernel/debug": "/sys/kernel/debug",
    "/lib/modules": "/lib/modules",
    "/usr/src": "/usr/src",
}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    (document,) = load_documents(DAEMONSET_DIR / "kustomization.yaml")
    return document


def kustomized_objects() -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k daemonset/`` creates (no transformers are used)."""
    objects = []
    for name in kustomization()["resources"]:
        objects.extend(load_documents(DAEMONSET_DIR / name))
    return objects


def find(kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in kustomized_objects() if obj["kind"] == kind]
    return found


def pod_spec() -> dict[str, Any]:
    return find("DaemonSet")["spec"]["template"]["spec"]


def agent_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return container


def arg_values(args: list[str]) -> dict[str, str]:
    """Options given as ``--name=value`` (flags map to "").

    ``["run", "--interval=10", "--kubernetes"]`` -> ``{"--interval": "10", "--kubernetes": ""}``.
    """
    values = {}
    for arg in args[1:]:
        name, _, value = arg.partition("=")
        values[name] = value
    return values


def tcpacct_cli() -> Any:
    """The click group behind the ``tcpacct`` console script."""
    try:
        return importlib.import_module("agent.cli").main
    except ImportError as error:  # pragma: no cover - only while agent.cli is being written
        pytest.fail(f"agent.cli (click group `main` with command `run`) cannot be imported: "
                    f"{error}; the manifests' args cannot be checked without it")


def mounts_by_volume() -> dict[str, dict[str, Any]]:
    return {mount["name"]: mount for mount in agent_container()["volumeMounts"]}


def test_kustomization_lists_every_manifest_but_the_podmonitor() -> None:
    on_disk = {path.name for path in DAEMONSET_DIR.glob("*.yaml")}
    assert set(kustomization()["resources"]) == on_disk - NOT_IN_KUSTOMIZATION
    assert kustomization()["kind"] == "Kustomization"


def test_kustomization_creates_exactly_these_objects() -> None:
    created = sorted((obj["kind"], obj["metadata"]["name"]) for obj in kustomized_objects())
    assert created == [
        ("ClusterRole", "tcpacct"),
        ("ClusterRoleBinding", "tcpacct"),
        ("ConfigMap", "tcpacct-metrics"),
        ("DaemonSet", "tcpacct"),
        ("Namespace", "tcpacct"),
        ("Service", "tcpacct"),
        ("ServiceAccount", "tcpacct"),
    ]
    namespaced = [obj for obj in kustomized_objects()
                  if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {obj["metadata"]["namespace"] for obj in namespaced} == {"tcpacct"}


@pytest.mark.parametrize(
    "obj", kustomized_objects(), ids=lambda obj: f"{obj['kind']}/{obj['metadata']['name']}"
)
def test_manifest_validates_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert validated == "1.29"


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The validation above can fail: a typo in the DaemonSet is refused in strict mode."""
    broken = copy.deepcopy(find("DaemonSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_clusterrole_grants_only_reads_of_the_cached_resources() -> None:
    granted = set()
    for rule in find("ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames or URLs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    expected = {(group, resource, verb)
                for group, resource in CACHE_RESOURCES for verb in READ_VERBS}
    assert granted == expected


def test_clusterrolebinding_binds_the_role_to_the_pods_serviceaccount() -> None:
    binding = find("ClusterRoleBinding")
    account = find("ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole",
                                  "name": find("ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]


def _privileged_flags(node: Any) -> list[Any]:
    if isinstance(node, dict):
        found = [value for key, value in node.items() if key == "privileged"]
        return found + [f for value in node.values() for f in _privileged_flags(value)]
    if isinstance(node, list):
        return [f for item in node for f in _privileged_flags(item)]
    return []


def test_no_manifest_asks_for_a_privileged_container() -> None:
    for path in sorted(DAEMONSET_DIR.glob("*.yaml")):
        for document in load_documents(path):
            assert True not in _privileged_flags(document), path.name


def test_container_runs_as_root_with_named_capabilities_only() -> None:
    context = agent_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["runAsUser"] == 0
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == CAPABILITIES
    assert len(context["capabilities"]["add"]) == len(CAPABILITIES)


def test_host_namespaces_and_tolerations() -> None:
    spec = pod_spec()
    assert spec["hostPID"] is True
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] == 30


def test_host_paths_are_mounted_read_only_where_the_agent_expects_them() -> None:
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = mounts_by_volume()
    host_mounts = {}
    for name, volume in volumes.items():
        if "hostPath" in volume:
            assert mounts[name]["readOnly"] is True, name
            host_mounts[volume["hostPath"]["path"]] = mounts[name]["mountPath"]
    assert host_mounts == HOST_MOUNTS
    assert set(mounts) == set(volumes)


def test_writable_paths_are_empty_dirs() -> None:
    """The root filesystem is read-only: /tmp (bcc) and the agent's header cache are not."""
    from agent.ebpf.headers import choose_headers

    cache_default = inspect.signature(choose_headers).parameters["cache_dir"].default
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    writable = {mount["mountPath"] for name, mount in mounts_by_volume().items()
                if "emptyDir" in volumes[name]}
    assert writable == {"/tmp", "/var/cache/tcpacct"}
    assert Path("/var/cache/tcpacct") in Path(cache_default).parents
    assert not any(mount.get("readOnly") for name, mount in mounts_by_volume().items()
                   if "emptyDir" in volumes[name])


def test_args_name_only_options_of_tcpacct_run() -> None:
    main = tcpacct_cli()
    args = agent_container()["args"]
    assert args[0] == "run"
    run = main.commands["run"]
    options = {opt: param for param in run.params
               for opt in (*param.opts, *param.secondary_opts)}
    for arg in args[1:]:
        name, has_value, _ = arg.partition("=")
        assert name in options, f"{arg}: `tcpacct run` has no option {name}"
        param = options[name]
        if param.is_flag:
            assert not has_value, f"{arg}: {name} is a flag and takes no value"
        else:
            assert has_value, f"{arg}: give the value as {name}=VALUE"


def test_args_parse_with_the_real_run_command() -> None:
    """click parses the args and runs the option callbacks (interval >= 1 s ...)."""
    run = tcpacct_cli().commands["run"]
    args = agent_container()["args"]
    context = run.make_context("run", list(args[1:]))
    assert context.params["proc_root"] == Path("/host/proc")
    assert context.params["cgroup_root"] == Path("/host/sys/fs/cgroup")
    assert context.params["kubernetes"] is True
    assert [str(p) for p in context.params["config_files"]] == ["/etc/tcpacct/metrics.yaml"]


def test_args_point_at_the_mounts() -> None:
    values = arg_values(agent_container()["args"])
    assert values["--proc-root"] == HOST_MOUNTS["/proc"]
    assert values["--cgroup-root"] == HOST_MOUNTS["/sys/fs/cgroup"]
    btf_default = next(p.default for p in tcpacct_cli().commands["run"].params
                       if p.name == "btf_path")
    assert Path(HOST_MOUNTS["/sys/kernel/btf"]) in Path(btf_default).parents
    config = Path(values["--config"])
    assert str(config.parent) == mounts_by_volume()["metrics-config"]["mountPath"]
    assert config.name in find("ConfigMap")["data"]


def test_node_name_comes_from_the_downward_api_into_an_env_var_run_reads() -> None:
    env = {item["name"]: item for item in agent_container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    (node_name,) = [p for p in tcpacct_cli().commands["run"].params if p.name == "node_name"]
    envvars = [node_name.envvar] if isinstance(node_name.envvar, str) else node_name.envvar
    assert "NODE_NAME" in envvars


def listen_port() -> int:
    """The port of ``tcpacct run``'s default ``--listen`` (``"0.0.0.0:9437"`` -> 9437)."""
    (listen,) = [p for p in tcpacct_cli().commands["run"].params if p.name == "listen"]
    return int(str(listen.default).rsplit(":", 1)[1])


def test_port_probes_and_scrape_annotations_agree_with_the_agent() -> None:
    container = agent_container()
    assert "--listen" not in arg_values(container["args"])
    (port,) = container["ports"]
    assert port == {"name": "http-metrics", "containerPort": listen_port(), "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    annotations = find("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(listen_port()),
                           "prometheus.io/path": "/metrics"}


def test_service_is_headless_and_selects_the_agent_pods() -> None:
    spec = find("Service")["spec"]
    pod_labels = find("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert spec["clusterIP"] == "None"
    assert spec["selector"].items() <= pod_labels.items()
    assert spec["ports"] == [{"name": "http-metrics", "port": listen_port(),
                              "targetPort": "http-metrics", "protocol": "TCP"}]
    selector = find("DaemonSet")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()


def test_podmonitor_scrapes_the_named_port_of_the_agent_pods() -> None:
    (monitor,) = load_documents(DAEMONSET_DIR / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["namespace"] == find("DaemonSet")["metadata"]["namespace"]
    pod_labels = find("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "http-metrics", "path": "/metrics", "interval": "10s"}]


_QUANTITY = re.compile(r"^(\d+)(m|Mi|Gi)?$")


def quantity(text: str | int) -> float:
    """``"50m"`` -> 0.05 (cores); ``"256Mi"`` -> 268435456.0 (bytes); ``1`` -> 1.0."""
    number, unit = _QUANTITY.match(str(text)).groups()
    scale = {None: 1, "m": 1e-3, "Mi": 2**20, "Gi": 2**30}[unit]
    return int(number) * scale


def test_resources_have_requests_below_limits() -> None:
    resources = agent_container()["resources"]
    for resource in ("cpu", "memory"):
        assert quantity(resources["requests"][resource]) <= quantity(
            resources["limits"][resource]), resource
    # bcc's in-process compile peaks at ~210 MiB RSS (docs/deploy.md); 200Mi would OOM.
    assert quantity(resources["limits"]["memory"]) >= 400 * 2**20


def test_image_tag_is_the_package_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert agent_container()["image"] == f"tcpacct:{version}"


def test_configmap_metrics_pass_tcpacct_config_validate(tmp_path: Path) -> None:
    from click.testing import CliRunner

    metrics = find("ConfigMap")["data"]["metrics.yaml"]
    path = tmp_path / "metrics.yaml"
    path.write_text(metrics)
    result = CliRunner().invoke(tcpacct_cli(), ["config", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert [m["name"] for m in yaml.safe_load(metrics)["metrics"]] == [
        "istio_mongo_received_bytes"]


def test_config_validate_refuses_a_broken_copy_of_the_configmap(tmp_path: Path) -> None:
    """The check above can fail: an unknown attribute in the same document is refused."""
    from click.testing import CliRunner

    metrics = find("ConfigMap")["data"]["metrics.yaml"]
    path = tmp_path / "metrics.yaml"
    path.write_text(metrics.replace("destination.service.name", "destination.service.nam"))
    result = CliRunner().invoke(tcpacct_cli(), ["config", "validate", str(path)])
    assert result.exit_code == 1


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects() -> None:
    """When kubectl is at hand, its kustomize build equals the files read above."""
    rendered = subprocess.run(["kubectl", "kustomize", str(DAEMONSET_DIR)], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(yaml.safe_load_all(rendered), key=key) == sorted(kustomized_objects(), key=key)
