"""Metric catalogues from the built-ins, native files and Istio Mixer YAML."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from agent.metrics import (
    ConfigError,
    builtin_metrics,
    load_catalogue,
    render,
    validate_files,
)
from agent.model import (
    ConnectionAttributes,
    PeerIdentity,
    Reporter,
    ServiceIdentity,
    ValueSource,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "metrics"
MONGO_FILES = ["tcp-metrics.yaml", "tcp-metrics-crd.yaml", "tcp-metrics-native.yaml"]
MONGO_LABELS = ("source_service", "source_version", "destination_version")
BUILTIN_NAMES = [
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
]
ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

RATINGS_V2 = PeerIdentity(
    workload="ratings-v2",
    namespace="default",
    canonical_service="ratings",
    canonical_revision="v2",
    cluster="Kubernetes",
    ip="198.18.0.12",
    port=41234,
    labels={"app": "ratings", "version": "v2"},
)
MONGODB_V1 = PeerIdentity(
    workload="mongodb-v1",
    namespace="default",
    principal="spiffe://cluster.local/ns/default/sa/bookinfo-mongodb",
    ip="198.18.0.20",
    port=27017,
    labels={"app": "mongodb", "version": "v1"},
)
MONGODB = ServiceIdentity("mongodb.default.svc.cluster.local", "mongodb", "default")
RATINGS_V1 = PeerIdentity(
    workload="ratings-v1", namespace="default", labels={"app": "ratings", "version": "v1"}
)
REVIEWS_V2 = PeerIdentity(
    workload="reviews-v2", namespace="default", labels={"app": "reviews", "version": "v2"}
)
RATINGS = ServiceIdentity("ratings.default.svc.cluster.local", "ratings", "default")


def connection(
    reporter: Reporter,
    source: PeerIdentity = RATINGS_V2,
    destination: PeerIdentity = MONGODB_V1,
    service: ServiceIdentity = MONGODB,
) -> ConnectionAttributes:
    return ConnectionAttributes(reporter, source, destination, service)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(*paths: Path) -> list[str]:
    return [str(problem) for problem in validate_files(list(paths))]


# --------------------------------------------------------------------------- bookinfo mongo


@pytest.mark.parametrize("file", MONGO_FILES)
def test_bookinfo_mongo_metrics_load_unchanged(file):
    catalogue = load_catalogue([FIXTURES / file])
    assert sorted(d.name for d in catalogue.definitions()) == sorted(
        [*BUILTIN_NAMES, "istio_mongo_received_bytes", "istio_mongo_sent_bytes"]
    )
    assert catalogue.warnings == ()
    received = catalogue.get("istio_mongo_received_bytes")
    sent = catalogue.get("istio_mongo_sent_bytes")
    assert (received.value, sent.value) == (ValueSource.RECEIVED_BYTES, ValueSource.SENT_BYTES)
    assert received.label_names == sent.label_names == MONGO_LABELS
    assert received.reporters == sent.reporters == frozenset({Reporter.DESTINATION})


@pytest.mark.parametrize("file", MONGO_FILES)
@pytest.mark.parametrize("name", ["istio_mongo_received_bytes", "istio_mongo_sent_bytes"])
def test_bookinfo_mongo_metric_evaluates_ratings_v2_to_mongodb(file, name):
    metric = load_catalogue([FIXTURES / file]).get(name)
    # The server end of ratings-v2 -> mongodb: counted, with the task's labels.
    assert metric.evaluate(connection(Reporter.DESTINATION)) == ("ratings-v2", "v2", "v1")
    # The client end of the same connection: Mixer metrics count at the destination only.
    assert metric.evaluate(connection(Reporter.SOURCE)) is None
    # Traffic to another service does not match the rule.
    assert (
        metric.evaluate(connection(Reporter.DESTINATION, REVIEWS_V2, RATINGS_V1, RATINGS)) is None
    )
    # A client whose version is not known gets Mixer's "unknown" default.
    anonymous = PeerIdentity(workload="mongo-shell", namespace="default")
    assert metric.evaluate(connection(Reporter.DESTINATION, anonymous)) == (
        "mongo-shell",
        "unknown",
        "v1",
    )


def test_mixer_spellings_may_be_split_over_files(tmp_path):
    text = (FIXTURES / "tcp-metrics.yaml").read_text()
    documents = text.split("\n---\n")
    instances = write(tmp_path, "\n---\n".join(documents[:2]), "instances.yaml")
    rest = write(tmp_path, "\n---\n".join(documents[2:]), "handler-and-rule.yaml")
    catalogue = load_catalogue([instances, rest])
    assert catalogue.get("istio_mongo_received_bytes").evaluate(
        connection(Reporter.DESTINATION)
    ) == ("ratings-v2", "v2", "v1")


MIXER_RULE = """\
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {{name: bytes, namespace: {namespace}}}
spec:
  value: connection.received.bytes
  dimensions: {{workload: destination.workload.name | "unknown"}}
---
apiVersion: config.istio.io/v1alpha2
kind: prometheus
metadata: {{name: handler, namespace: {namespace}}}
spec:
  metrics:
  - {{name: {name}, instance_name: bytes.metric.{namespace}, kind: COUNTER,
     label_names: [workload]}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: all, namespace: {namespace}}}
spec:
  actions: [{{handler: handler.prometheus, instances: [bytes.metric]}}]
"""


def test_mixer_rule_outside_istio_system_applies_to_its_namespace_only(tmp_path):
    scoped = write(tmp_path, MIXER_RULE.format(namespace="default", name="scoped"), "a.yaml")
    mesh = write(tmp_path, MIXER_RULE.format(namespace="istio-system", name="mesh"), "b.yaml")
    catalogue = load_catalogue([scoped, mesh])
    elsewhere = PeerIdentity(workload="db", namespace="other")
    other_service = ServiceIdentity("db.other.svc.cluster.local", "db", "other")
    into_default = connection(Reporter.DESTINATION)
    into_other = connection(Reporter.DESTINATION, RATINGS_V2, elsewhere, other_service)
    no_service = connection(Reporter.DESTINATION, RATINGS_V2, elsewhere, ServiceIdentity())
    assert catalogue.get("istio_scoped").evaluate(into_default) == ("mongodb-v1",)
    assert catalogue.get("istio_scoped").evaluate(into_other) is None
    assert catalogue.get("istio_scoped").evaluate(no_service) is None
    assert catalogue.get("istio_mesh").evaluate(into_default) == ("mongodb-v1",)
    assert catalogue.get("istio_mesh").evaluate(into_other) == ("db",)
    assert catalogue.get("istio_mesh").evaluate(no_service) == ("db",)


def test_handler_metric_namespace_replaces_the_istio_prefix(tmp_path):
    text = MIXER_RULE.format(namespace="istio-system", name="x").replace(
        "kind: COUNTER,", "kind: COUNTER, namespace: shop, description: Bytes in,"
    )
    metric = load_catalogue([write(tmp_path, text)]).get("shop_x")
    assert (metric.name, metric.help) == ("shop_x", "Bytes in")


def test_other_istio_kinds_are_ignored_with_a_warning(tmp_path, caplog):
    path = write(
        tmp_path,
        """\
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: newlog, namespace: istio-system}
spec:
  compiledTemplate: logentry
  params: {severity: '"warning"'}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: newloghandler, namespace: istio-system}
spec:
  compiledAdapter: stdio
  params: {outputAsJson: true}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: newlogstdio, namespace: istio-system}
spec:
  match: "true"
  actions: [{handler: newloghandler, instances: [newlog]}]
---
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: kubernetes, namespace: istio-system}
spec: {}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
""",
    )
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        catalogue = load_catalogue([path])
    assert [d.name for d in catalogue.definitions()] == BUILTIN_NAMES
    assert list(catalogue.warnings) == [
        f"{path}:1: ignoring instance istio-system/newlog: template 'logentry' "
        "(tcpacct reads metric instances only)",
        f"{path}:8: ignoring handler istio-system/newloghandler: adapter 'stdio' "
        "(tcpacct reads prometheus handlers only)",
        f"{path}:22: ignoring attributemanifest istio-system/kubernetes: tcpacct reads Istio "
        "instance, handler, metric, prometheus and rule objects only",
        f"{path}:27: ignoring Deployment (apps/v1): neither a tcpacct configuration nor a "
        "config.istio.io object",
    ]
    assert [record.getMessage() for record in caplog.records] == list(catalogue.warnings)


# --------------------------------------------------------------------------- built-ins


def test_builtins_give_the_full_istio_label_set_for_both_reporters():
    catalogue = load_catalogue([])
    assert [d.name for d in catalogue.definitions()] == BUILTIN_NAMES
    assert [d.value for d in catalogue.definitions()] == [
        ValueSource.SENT_BYTES,
        ValueSource.RECEIVED_BYTES,
        ValueSource.CONNECTIONS_OPENED,
        ValueSource.CONNECTIONS_CLOSED,
    ]
    common = (
        "ratings-v2",
        "default",
        "unknown",
        "ratings",
        "v2",
        "ratings",
        "v2",
        "Kubernetes",
        "mongodb-v1",
        "default",
        "spiffe://cluster.local/ns/default/sa/bookinfo-mongodb",
        "mongodb",
        "v1",
        "unknown",
        "unknown",
        "unknown",
        "mongodb.default.svc.cluster.local",
        "mongodb",
        "default",
        "tcp",
        "-",
        "unknown",
    )
    for metric in catalogue.definitions():
        assert metric.label_names == ISTIO_LABELS
        assert metric.reporters == frozenset(Reporter)
        assert metric.evaluate(connection(Reporter.SOURCE)) == ("source", *common)
        assert metric.evaluate(connection(Reporter.DESTINATION)) == ("destination", *common)


def test_builtins_say_unknown_for_what_is_not_known():
    nothing = ConnectionAttributes(Reporter.SOURCE, PeerIdentity(), PeerIdentity())
    for metric in builtin_metrics():
        assert metric.evaluate(nothing) == ("source", *["unknown"] * 19, "tcp", "-", "unknown")


def test_builtins_can_be_switched_off(tmp_path):
    path = write(tmp_path, "builtins: {enabled: false}\n")
    assert load_catalogue([path]).definitions() == ()
    path = write(
        tmp_path,
        """\
builtins:
  metrics:
    istio_tcp_connections_opened_total: {enabled: false}
    istio_tcp_connections_closed_total: {enabled: false}
""",
    )
    assert [d.name for d in load_catalogue([path]).definitions()] == BUILTIN_NAMES[:2]


def test_builtin_labels_can_be_removed(tmp_path):
    everywhere = write(
        tmp_path,
        """\
builtins:
  removeLabels: [source_principal, destination_principal]
""",
        "a.yaml",
    )
    one_metric = write(
        tmp_path,
        """\
builtins:
  metrics:
    istio_tcp_sent_bytes_total:
      removeLabels: [source_cluster, destination_cluster, connection_security_policy]
""",
        "b.yaml",
    )
    catalogue = load_catalogue([everywhere, one_metric])
    sent = catalogue.get("istio_tcp_sent_bytes_total")
    received = catalogue.get("istio_tcp_received_bytes_total")
    dropped = {"source_principal", "destination_principal"}
    assert received.label_names == tuple(n for n in ISTIO_LABELS if n not in dropped)
    dropped |= {"source_cluster", "destination_cluster", "connection_security_policy"}
    assert sent.label_names == tuple(n for n in ISTIO_LABELS if n not in dropped)
    assert sent.evaluate(connection(Reporter.DESTINATION)) == (
        "destination",
        "ratings-v2",
        "default",
        "ratings",
        "v2",
        "ratings",
        "v2",
        "mongodb-v1",
        "default",
        "mongodb",
        "v1",
        "unknown",
        "unknown",
        "mongodb.default.svc.cluster.local",
        "mongodb",
        "default",
        "tcp",
        "-",
    )


# --------------------------------------------------------------------------- native


def test_native_reporters_choose_the_reporting_end(tmp_path):
    path = write(
        tmp_path,
        """\
metrics:
  - name: client_writes
    value: connection.received.bytes
    reporters: [source]
    dimensions:
      client: source.workload.name
      port: destination.port
      secure: connection.mtls | false
  - name: everywhere
    value: connection.opened
    match: context.protocol == "tcp"
""",
    )
    catalogue = load_catalogue([path])
    client_writes = catalogue.get("client_writes")
    assert client_writes.evaluate(connection(Reporter.SOURCE)) == ("ratings-v2", "27017", "false")
    assert client_writes.evaluate(connection(Reporter.DESTINATION)) is None
    everywhere = catalogue.get("everywhere")
    assert everywhere.label_names == ()
    assert everywhere.reporters == frozenset(Reporter)
    assert everywhere.evaluate(connection(Reporter.SOURCE)) == ()
    assert everywhere.evaluate(connection(Reporter.DESTINATION)) == ()


def test_render_shows_the_effective_definitions():
    catalogue = load_catalogue([FIXTURES / "tcp-metrics.yaml"])
    shown = yaml.safe_load(render(catalogue))["metrics"]
    # Configured metrics follow the built-ins in file order (the handler lists sent first).
    assert [entry["name"] for entry in shown] == [
        *BUILTIN_NAMES,
        "istio_mongo_sent_bytes",
        "istio_mongo_received_bytes",
    ]
    assert shown[5] == {
        "name": "istio_mongo_received_bytes",
        "help": "istio_mongo_received_bytes (Istio Mixer configuration handler "
        "default/mongohandler)",
        "kind": "counter",
        "value": "connection.received.bytes",
        "reporters": ["destination"],
        "match": '(context.protocol == "tcp" && destination.service.host == '
        '"mongodb.default.svc.cluster.local") && (destination.service.namespace | '
        'destination.namespace | "") == "default"',
        "dimensions": {
            "source_service": 'source.workload.name | "unknown"',
            "source_version": 'source.labels["version"] | "unknown"',
            "destination_version": 'destination.labels["version"] | "unknown"',
        },
        "origin": f"{FIXTURES / 'tcp-metrics.yaml'}:55 (handler default/mongohandler via "
        "rule default/mongoprom)",
    }
    assert render(catalogue) == render(load_catalogue([FIXTURES / "tcp-metrics.yaml"]))


# --------------------------------------------------------------------------- problems


def test_fixtures_validate_cleanly():
    assert validate_files([FIXTURES / file for file in MONGO_FILES[:1]]) == []
    assert validate_files([FIXTURES / MONGO_FILES[2]]) == []


def test_load_raises_config_error_with_every_problem(tmp_path):
    path = write(
        tmp_path,
        """\
metrics:
  - name: a
    value: connection.sent.bytes
    match: source.wrkload.name == "x"
  - name: b
    value: 1
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_catalogue([path])
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:4:12: metric a: match: unknown attribute 'source.wrkload.name' "
        "(did you mean 'source.workload.name'?)",
        f"{path}:6:12: metric b: value must be one of connection.received.bytes, "
        "connection.sent.bytes, connection.opened, connection.closed, found an integer",
    ]
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)


NATIVE_PROBLEMS = [
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n    match: >-\n"
        '      context.protocol == "tcp"\n      && destination.service.hots == "x"\n',
        [
            "6:10: metric m: match: unknown attribute 'destination.service.hots' "
            "(did you mean 'destination.service.host'?)"
        ],
        id="position inside a folded block scalar",
    ),
    pytest.param(
        'metrics:\n  - name: m\n    value: connection.sent.bytes\n    match: "source.port == x"\n',
        ["4:28: metric m: match: unknown attribute 'x'"],
        id="position inside a quoted scalar",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n"
        '    match: context.protocol == "tcp" &&\n',
        ["4:40: metric m: match: expected a value, found the end of the expression"],
        id="bad syntax",
    ),
    pytest.param(
        'metrics:\n  - name: m\n    value: connection.sent.bytes\n    match: source.port == "80"\n',
        [
            "4:24: metric m: match: type error: '==' needs both sides of one type, "
            "found int and string"
        ],
        id="type error",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n"
        "    match: source.workload.name\n",
        ["4:12: metric m: match: type error: the expression must be bool, found string"],
        id="match not bool",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n"
        "    dimensions:\n      source-service: source.workload.name\n",
        [
            "5:7: metric m: 'source-service' is not a valid Prometheus label name "
            "([a-zA-Z_][a-zA-Z0-9_]*)"
        ],
        id="label name",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n"
        "    dimensions:\n      __meta: source.workload.name\n",
        ["5:7: metric m: label name '__meta' is reserved (names starting with __ are Prometheus')"],
        id="reserved label name",
    ),
    pytest.param(
        "metrics:\n  - name: 9lives\n    value: connection.sent.bytes\n",
        [
            "2:11: metric 9lives: '9lives' is not a valid Prometheus metric name "
            "([a-zA-Z_:][a-zA-Z0-9_:]*)"
        ],
        id="metric name",
    ),
    pytest.param(
        "metrics:\n  - name: tcpacct_x\n    value: connection.sent.bytes\n",
        [
            "2:11: metric tcpacct_x: metric names starting with 'tcpacct_' are reserved for "
            "tcpacct itself"
        ],
        id="reserved metric name",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n"
        "  - name: m\n    value: connection.received.bytes\n",
        ["4: metric m: two metrics named 'm': this one and the one at {path}:2 (metric m)"],
        id="two metrics with one name",
    ),
    pytest.param(
        "metrics:\n  - name: istio_tcp_sent_bytes_total\n    value: connection.sent.bytes\n",
        [
            "2: metric istio_tcp_sent_bytes_total: two metrics named "
            "'istio_tcp_sent_bytes_total': this one and the one at <built-in builtin.yaml>:7 "
            "(metric istio_tcp_sent_bytes_total)"
        ],
        id="name of a built-in",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: connection.sent.bytes\n    kind: gauge\n"
        "    reporter: [source]\n",
        [
            "5:5: metric m: unknown field 'reporter' (expected one of: dimensions, help, kind, "
            "match, name, reporters, value)",
            "4:11: metric m: kind 'gauge' is not supported (only counter)",
        ],
        id="unknown field and kind",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    value: '\"1\"'\n",
        [
            "3:12: metric m: value must be one of connection.received.bytes, "
            "connection.sent.bytes, connection.opened, connection.closed (optionally '| 0'): "
            "tcpacct counts bytes and connections, found '\"1\"'"
        ],
        id="value not a count",
    ),
    pytest.param(
        "metrics:\n  - name: m\n    help: 5\n    value: connection.sent.bytes\n"
        "    dimensions: [a, b]\n    reporters: [server]\n",
        [
            "3:11: metric m: help must be text, found an integer",
            "5:17: metric m: dimensions must be a mapping, found a list",
            "6:17: metric m: unknown reporter 'server' (expected source or destination)",
        ],
        id="wrong types",
    ),
    pytest.param(
        "metrics: {name: m}\n",
        ["1:10: metrics must be a list of metric definitions"],
        id="metrics not a list",
    ),
    pytest.param(
        "metrics:\n  - value: connection.sent.bytes\n",
        ["2:5: metrics[0]: 'name' is required"],
        id="name missing",
    ),
    pytest.param(
        "metric:\n  - name: m\n",
        ["1:1: unknown field 'metric' (expected one of: builtins, metrics)"],
        id="unknown top-level field",
    ),
    pytest.param(
        "builtins:\n  removeLabels: [source_pod]\n  metrics:\n    istio_tcp_bytes: {}\n",
        [
            "2:18: builtins: cannot remove label 'source_pod': the built-in metrics have no "
            "such label",
            "4:22: builtins.metrics.istio_tcp_bytes: no built-in metric 'istio_tcp_bytes' "
            "(built-ins: istio_tcp_sent_bytes_total, istio_tcp_received_bytes_total, "
            "istio_tcp_connections_opened_total, istio_tcp_connections_closed_total)",
        ],
        id="builtin switches",
    ),
    pytest.param("", ["empty file: no metric definitions or Istio objects"], id="empty file"),
    pytest.param(
        "---\n# nothing\n---\n",
        ["empty file: no metric definitions or Istio objects"],
        id="empty documents",
    ),
    pytest.param(
        "metrics: [\n", ["2:1: not YAML: did not find expected node content"], id="not YAML"
    ),
    pytest.param(
        "- 1\n- 2\n", ["1:1: a YAML document must be a mapping, found a list"], id="not a mapping"
    ),
    pytest.param(
        "a: &x [*x]\n", ["1:4: YAML nested too deeply (limit is 64)"], id="recursive alias"
    ),
]


@pytest.mark.parametrize(("text", "expected"), NATIVE_PROBLEMS)
def test_native_problems_name_file_object_and_position(tmp_path, text, expected):
    path = write(tmp_path, text)
    prefix = f"{path}:" if expected and expected[0][0].isdigit() else f"{path}: "
    assert problems_of(path) == [prefix + e.format(path=path) for e in expected]


MONGO = (FIXTURES / "tcp-metrics.yaml").read_text()

MIXER_PROBLEMS = [
    pytest.param(
        MONGO.replace(
            'destination.service.host == "mongodb', 'destination.service.hots == "mongodb'
        ),
        [
            "71:13: rule default/mongoprom: match: unknown attribute 'destination.service.hots' "
            "(did you mean 'destination.service.host'?)"
        ],
        id="unknown attribute on the second line of a match",
    ),
    pytest.param(
        MONGO.replace(
            'source_version: source.labels["version"] | "unknown"',
            'source_version: source.labels["version"] | 0',
            1,
        ),
        [
            "17:48: instance default/mongosentbytes: dimension source_version: type error: '|' "
            "needs both sides of one type, found string and int"
        ],
        id="type error in a dimension",
    ),
    pytest.param(
        MONGO.replace(
            "instance_name: mongosentbytes.instance.default",
            "instance_name: mongosentbyte.instance.default",
        ),
        [
            "48:7: handler default/mongohandler: istio_mongo_sent_bytes: instance_name refers "
            "to instance default/mongosentbyte, which is not defined in the configuration"
        ],
        id="handler references a missing instance",
    ),
    pytest.param(
        MONGO.replace("    - mongosentbytes\n", "    - mongosentbytes.instance.istio-system\n"),
        [
            "76:7: rule default/mongoprom: instance 'mongosentbytes.instance.istio-system' "
            "(istio-system/mongosentbytes) is not defined in the configuration"
        ],
        id="rule references a missing instance",
    ),
    pytest.param(
        MONGO.replace("  - handler: mongohandler\n", "  - handler: mongohandler.stdio\n"),
        [
            "73:14: rule default/mongoprom: handler 'mongohandler.stdio' (stdio/mongohandler) "
            "is not defined in the configuration"
        ],
        id="rule references a missing handler",
    ),
    pytest.param(
        MONGO.replace(
            "      - destination_version\n    - name: mongo_received_bytes",
            "      - destination_app\n    - name: mongo_received_bytes",
        ),
        [
            "48:7: handler default/mongohandler: istio_mongo_sent_bytes: label 'destination_app' "
            "is not a dimension of instance default/mongosentbytes"
        ],
        id="label that is not a dimension",
    ),
    pytest.param(
        MONGO.replace("kind: COUNTER\n", "kind: DISTRIBUTION\n", 1),
        [
            "50:13: handler default/mongohandler metric mongo_sent_bytes: kind DISTRIBUTION is "
            "not supported: tcpacct exports counters (COUNTER) only"
        ],
        id="distribution",
    ),
    pytest.param(
        MONGO.replace("value: connection.sent.bytes | 0", "value: connection.duration | 0"),
        [
            "14:12: instance default/mongosentbytes: value must be one of "
            "connection.received.bytes, connection.sent.bytes, connection.opened, "
            "connection.closed (optionally '| 0'): tcpacct counts bytes and connections, "
            "found 'connection.duration | 0'"
        ],
        id="value that is not a count",
    ),
    pytest.param(
        MONGO + "---\n" + MONGO.split("---\n")[0],
        [
            "83:1: instance default/mongosentbytes: default/mongosentbytes is defined twice "
            "(instance and metric objects share one set of names)"
        ],
        id="instance defined twice",
    ),
    pytest.param(
        MONGO.replace("  name: mongoprom\n", "  name: Mongo.Prom\n"),
        [
            "67:9: rule Mongo.Prom: metadata.name 'Mongo.Prom' is not a Kubernetes name "
            "(lower case letters, digits and '-')"
        ],
        id="bad object name",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MIXER_PROBLEMS)
def test_mixer_problems_name_file_object_and_position(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}:{e}" for e in expected]


def test_two_spellings_of_one_metric_collide(tmp_path):
    first = FIXTURES / "tcp-metrics.yaml"
    native = FIXTURES / "tcp-metrics-native.yaml"
    problems = problems_of(first, native)
    assert problems == [
        f"{native}:6: metric istio_mongo_sent_bytes: two metrics named "
        f"'istio_mongo_sent_bytes': this one and the one at {first}:48 (handler "
        "default/mongohandler via rule default/mongoprom)",
        f"{native}:18: metric istio_mongo_received_bytes: two metrics named "
        f"'istio_mongo_received_bytes': this one and the one at {first}:55 (handler "
        "default/mongohandler via rule default/mongoprom)",
    ]


def test_unreadable_file_is_a_problem(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert problems_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"metrics: \xff\xfe\n")
    assert problems_of(binary) == [f"{binary}: not UTF-8 text (byte 9)"]


def test_alias_bombs_are_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    path = write(tmp_path, "\n".join(lines) + "\n")
    [problem] = problems_of(path)
    assert (
        "too many YAML values (limit is 200000; aliases count each time they are used)" in problem
    )


# --------------------------------------------------------------------------- Istio defaults


def test_istio_default_tcp_config_reads_with_connection_events(tmp_path):
    no_builtins = write(tmp_path, "builtins: {enabled: false}\n")
    catalogue = load_catalogue([no_builtins, FIXTURES / "istio-default-tcp.yaml"])
    assert [(d.name, d.value) for d in catalogue.definitions()] == [
        ("istio_tcp_sent_bytes_total", ValueSource.SENT_BYTES),
        ("istio_tcp_received_bytes_total", ValueSource.RECEIVED_BYTES),
        ("istio_tcp_connections_opened_total", ValueSource.CONNECTIONS_OPENED),
        ("istio_tcp_connections_closed_total", ValueSource.CONNECTIONS_CLOSED),
    ]
    # The connection.event term is what selects opened/closed; the rest of the match stays.
    assert {d.match.text for d in catalogue.definitions()} == {'context.protocol == "tcp"'}
    for metric in catalogue.definitions():
        assert metric.evaluate(connection(Reporter.SOURCE)) is None
        assert metric.evaluate(connection(Reporter.DESTINATION)) == (
            "destination",
            "ratings",
            "unknown",
            "ratings-v2",
            "default",
            "v2",
            "mongodb",
            "spiffe://cluster.local/ns/default/sa/bookinfo-mongodb",
            "mongodb-v1",
            "default",
            "v1",
            "mongodb.default.svc.cluster.local",
            "mongodb",
            "default",
            "none",
            "-",
        )


def test_istio_default_tcp_config_collides_with_the_builtins():
    problems = problems_of(FIXTURES / "istio-default-tcp.yaml")
    assert len(problems) == 4
    assert all("two metrics named 'istio_tcp_" in problem for problem in problems)


EVENT_RULE = """\
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {{name: counted, namespace: istio-system}}
spec: {{value: {value}, dimensions: {{}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: prometheus
metadata: {{name: handler, namespace: istio-system}}
spec:
  metrics: [{{name: x, instance_name: counted.metric.istio-system, kind: COUNTER}}]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: r, namespace: istio-system}}
spec:
  match: {match}
  actions: [{{handler: handler.prometheus, instances: [counted.metric]}}]
"""


@pytest.mark.parametrize(
    ("value", "match", "expected"),
    [
        ("1", 'connection.event == "close"', ValueSource.CONNECTIONS_CLOSED),
        (
            '"1"',
            '\'"open" == connection.event && context.protocol == "tcp"\'',
            ValueSource.CONNECTIONS_OPENED,
        ),
    ],
)
def test_connection_event_selects_what_value_1_counts(tmp_path, value, match, expected):
    path = write(tmp_path, EVENT_RULE.format(value=value, match=match))
    metric = load_catalogue([path]).get("istio_x")
    assert metric.value is expected
    assert metric.evaluate(connection(Reporter.DESTINATION)) == ()


@pytest.mark.parametrize(
    ("value", "match", "expected"),
    [
        (
            "1",
            'context.protocol == "tcp"',
            "17:55: rule istio-system/r: metric istio-system/counted counts 1 per event: the rule "
            'must also match connection.event == "open" or "close"',
        ),
        (
            "connection.sent.bytes",
            'connection.event == "open"',
            "17:55: rule istio-system/r: metric istio-system/counted counts bytes, which tcpacct "
            "does not split by connection.event",
        ),
        (
            "1",
            '(connection.event | "na") == "continue"',
            "16:36: rule istio-system/r: match: connection.event 'continue': tcpacct counts the "
            'events "open" and "close" only',
        ),
        (
            "1",
            'connection.event == "open" || true',
            "16:10: rule istio-system/r: match: 'connection.event' is only understood in an Istio "
            'rule\'s match, as a term such as (connection.event | "na") == "open" joined by &&; in '
            "tcpacct's own format use value connection.opened or connection.closed",
        ),
    ],
)
def test_connection_event_problems(tmp_path, value, match, expected):
    path = write(tmp_path, EVENT_RULE.format(value=value, match=match))
    assert problems_of(path) == [f"{path}:{expected}"]


def test_connection_event_is_refused_in_native_metrics(tmp_path):
    path = write(
        tmp_path,
        "metrics:\n  - name: m\n    value: connection.opened\n"
        '    match: connection.event == "open"\n',
    )
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}:4:12: metric m: match: 'connection.event' is only "
        "understood in an Istio rule's match"
    )
