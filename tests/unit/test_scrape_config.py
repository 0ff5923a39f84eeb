"""examples/prometheus-scrape.yaml: Prometheus accepts it, and its annotation-based pod job
turns the DaemonSet's pods into the right scrape targets.

Debian's promtool is built without Kubernetes service discovery, so the pod job is checked by
promtool with its ``kubernetes_sd_configs`` swapped for a static target (every relabel rule
still goes through Prometheus' parser), and its relabelling is replayed here on the labels
Prometheus' pod discovery gives a tcpacct pod (``__meta_kubernetes_pod_annotation_<name>``,
the annotation name with every non-alphanumeric character turned into ``_``).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRAPE_CONFIG = REPO / "examples" / "prometheus-scrape.yaml"


def config() -> dict[str, Any]:
    return yaml.safe_load(SCRAPE_CONFIG.read_text())


def job(name: str) -> dict[str, Any]:
    (found,) = [j for j in config()["scrape_configs"] if j["job_name"] == name]
    return found


def daemonset_pod() -> dict[str, Any]:
    documents = yaml.safe_load_all((REPO / "daemonset" / "daemonset.yaml").read_text())
    (daemonset,) = [doc for doc in documents if doc and doc["kind"] == "DaemonSet"]
    return daemonset["spec"]["template"]


def _go_template(replacement: str) -> str:
    """Go's regexp expansion in Python's syntax: ``"$2:$1"`` -> ``"\\g<2>:\\g<1>"``."""
    return re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", replacement)


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep/drop/replace relabelling (regex anchored, sources joined by ";").

    Returns None when the target is dropped.
    """
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(
            labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            result = match.expand(_go_template(str(rule.get("replacement", "$1"))))
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
        assert action in ("keep", "drop", "replace"), f"relabel action {action} not replayed"
    return labels


def discovered(pod_ip: str, annotations: dict[str, str], port: int = 9437) -> dict[str, str]:
    """The labels Prometheus' pod role gives one container port of a running pod."""
    labels = {
        "__address__": f"[{pod_ip}]:{port}" if ":" in pod_ip else f"{pod_ip}:{port}",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "tcpacct",
        "__meta_kubernetes_pod_name": "tcpacct-x7k2p",
        "__meta_kubernetes_pod_node_name": "node-a",
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_pod_phase": "Running",
    }
    for name, value in annotations.items():
        labels["__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", name)] = value
    return labels


@pytest.mark.parametrize(
    ("pod_ip", "address"),
    [("198.18.0.10", "198.18.0.10:9437"), ("2001:db8::10", "[2001:db8::10]:9437")],
)
def test_pod_job_scrapes_the_daemonset_pods_on_their_annotated_port(pod_ip: str,
                                                                    address: str) -> None:
    annotations = daemonset_pod()["metadata"]["annotations"]
    target = relabel(discovered(pod_ip, annotations, port=8080),
                     job("kubernetes-pods")["relabel_configs"])
    assert target is not None
    assert target["__address__"] == address
    assert target["__metrics_path__"] == "/metrics"
    assert (target["namespace"], target["pod"], target["node"]) == ("tcpacct", "tcpacct-x7k2p",
                                                                    "node-a")


def test_pod_job_ignores_pods_without_the_annotation_and_pods_not_running() -> None:
    rules = job("kubernetes-pods")["relabel_configs"]
    assert relabel(discovered("198.18.0.11", {}), rules) is None
    annotations = daemonset_pod()["metadata"]["annotations"]
    pending = discovered("198.18.0.12", annotations) | {"__meta_kubernetes_pod_phase": "Pending"}
    assert relabel(pending, rules) is None


def test_local_job_scrapes_the_default_listen_port() -> None:
    from agent.cli import main

    (listen,) = [p for p in main.commands["run"].params if p.name == "listen"]
    port = str(listen.default).rsplit(":", 1)[1]
    assert job("tcpacct-local")["static_configs"][0]["targets"] == [f"localhost:{port}"]


def test_scrape_interval_is_the_agents_report_interval() -> None:
    args = daemonset_pod()["spec"]["containers"][0]["args"]
    assert "--interval=10" in args
    assert config()["global"]["scrape_interval"] == "10s"


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: it comes with Debian's prometheus (make setup)")
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_promtool_accepts_the_config_with_discovery_made_static(tmp_path: Path) -> None:
    checked = copy.deepcopy(config())
    for scrape in checked["scrape_configs"]:
        if scrape.pop("kubernetes_sd_configs", None) is not None:
            scrape["static_configs"] = [{"targets": ["198.18.0.10:9437"]}]
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(checked))
    result = promtool_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_relabel_rule(tmp_path: Path) -> None:
    """The check above can fail: an unbalanced regex is refused."""
    checked = copy.deepcopy(config())
    pods = next(s for s in checked["scrape_configs"] if "kubernetes_sd_configs" in s)
    del pods["kubernetes_sd_configs"]
    pods["relabel_configs"][0]["regex"] = "(true"
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(checked))
    assert promtool_check(path).returncode == 1
