"""The exposition: exact names, escaping, exact integers, and output Prometheus can parse."""

from __future__ import annotations

import math

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.accounting import Accountant, FamilySnapshot
from agent.exporter import (
    CONTENT_TYPE,
    SelfMetric,
    TcpacctCollector,
    encode_text,
    escape_help,
    escape_label_value,
    format_value,
)
from agent.metrics.catalogue import load_catalogue
from tests.support.fakes import FakeEnricher, poll, sample


class FixedSeries:
    """A SeriesSource with fixed families; counts how often it was read."""

    def __init__(self, families: list[FamilySnapshot]) -> None:
        self._families = families
        self.reads = 0

    def families(self) -> list[FamilySnapshot]:
        self.reads += 1
        return self._families


def registry_of(*families: FamilySnapshot, self_metrics=()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TcpacctCollector(FixedSeries(list(families)), lambda: self_metrics))
    return registry


SENT = FamilySnapshot(
    "istio_tcp_sent_bytes_total",
    "Bytes sent by the server to the client of TCP connections (responses).",
    ("reporter", "source_workload"),
    {("source", "curl"): 7, ("destination", "nginx"): 2**53 + 1},
)
MONGO = FamilySnapshot(
    "istio_mongo_received_bytes",
    "Mongo received bytes.",
    ("source_service", "source_version", "destination_version"),
    {("ratings-v2", "v2", "v1"): 1234},
)


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain", "plain"),
        ('say "hi"', 'say \\"hi\\"'),
        ("C:\\path", "C:\\\\path"),
        ("two\nlines", "two\\nlines"),
        ('a"b\\c\n', 'a\\"b\\\\c\\n'),
        ("\\n", "\\\\n"),  # a backslash then n is not a newline
        ("żółw ☃", "żółw ☃"),
        ("tab\there", "tab\there"),
    ],
)
def test_escape_label_value(value: str, escaped: str) -> None:
    assert escape_label_value(value) == escaped


def test_escape_help_keeps_quotes() -> None:
    assert escape_help('say "hi"\\\n') == 'say "hi"\\\\\\n'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (5, "5"),
        (2**64 - 1, "18446744073709551615"),  # an int is never rounded through a float
        (3.0, "3"),
        (0.25, "0.25"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
        (1e20, "1e+20"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_encode_text_exact_output() -> None:
    registry = registry_of(
        SENT,
        MONGO,
        self_metrics=[
            SelfMetric("tcpacct_backend_info", "Kernel hooks in use.", "gauge",
                       [({"backend": "tracepoint"}, 1)]),
            SelfMetric("tcpacct_polls_total", "Polls.", "counter", [({}, 3)]),
        ],
    )
    assert encode_text(registry).decode() == (
        "# HELP istio_tcp_sent_bytes_total Bytes sent by the server to the client of TCP "
        "connections (responses).\n"
        "# TYPE istio_tcp_sent_bytes_total counter\n"
        'istio_tcp_sent_bytes_total{reporter="source",source_workload="curl"} 7\n'
        'istio_tcp_sent_bytes_total{reporter="destination",source_workload="nginx"} '
        "9007199254740993\n"
        "# HELP istio_mongo_received_bytes Mongo received bytes.\n"
        "# TYPE istio_mongo_received_bytes counter\n"
        'istio_mongo_received_bytes{source_service="ratings-v2",source_version="v2",'
        'destination_version="v1"} 1234\n'
        "# HELP tcpacct_backend_info Kernel hooks in use.\n"
        "# TYPE tcpacct_backend_info gauge\n"
        'tcpacct_backend_info{backend="tracepoint"} 1\n'
        "# HELP tcpacct_polls_total Polls.\n"
        "# TYPE tcpacct_polls_total counter\n"
        "tcpacct_polls_total 3\n"
    )


def test_encode_text_escapes_label_values_and_prometheus_reads_them_back() -> None:
    awkward = 'we"ird\\na\nme żółw'
    family = FamilySnapshot("istio_tcp_received_bytes_total", 'help with "quotes"\nand more',
                            ("source_workload",), {(awkward,): 42})
    text = encode_text(registry_of(family)).decode()
    assert (
        'istio_tcp_received_bytes_total{source_workload="we\\"ird\\\\na\\nme żółw"} 42\n' in text
    )
    assert "# HELP istio_tcp_received_bytes_total help with \"quotes\"\\nand more\n" in text
    parsed = list(text_string_to_metric_families(text))
    assert len(parsed) == 1
    assert parsed[0].documentation == 'help with "quotes"\nand more'
    assert [(s.labels, s.value) for s in parsed[0].samples] == [
        ({"source_workload": awkward}, 42)
    ]


def test_output_is_utf8() -> None:
    family = FamilySnapshot("m_total", "h", ("w",), {("żółw",): 1})
    assert 'm_total{w="żółw"} 1'.encode() in encode_text(registry_of(family))


def test_encode_text_is_valid_for_the_prometheus_parser() -> None:
    text = encode_text(registry_of(SENT, MONGO)).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    # the parser names counter families without "_total"; the samples keep the exposed name
    assert sorted(parsed) == ["istio_mongo_received_bytes", "istio_tcp_sent_bytes"]
    assert parsed["istio_tcp_sent_bytes"].type == "counter"
    assert sorted((s.name, tuple(s.labels.items()), s.value)
                  for s in parsed["istio_tcp_sent_bytes"].samples) == [
        ("istio_tcp_sent_bytes_total", (("reporter", "destination"),
                                        ("source_workload", "nginx")), 2**53 + 1),
        ("istio_tcp_sent_bytes_total", (("reporter", "source"), ("source_workload", "curl")), 7),
    ]
    assert parsed["istio_mongo_received_bytes"].type == "counter"


def test_names_are_exposed_exactly_in_help_type_and_sample_lines() -> None:
    lines = encode_text(registry_of(SENT, MONGO)).decode().splitlines()
    names = {line.split(" ")[2] for line in lines if line.startswith("#")}
    names |= {line.split("{")[0] for line in lines if not line.startswith("#")}
    assert names == {"istio_tcp_sent_bytes_total", "istio_mongo_received_bytes"}


def test_family_without_samples_still_has_help_and_type() -> None:
    family = FamilySnapshot("istio_tcp_connections_closed_total", "TCP connections closed.",
                            ("reporter",), {})
    assert encode_text(registry_of(family)).decode() == (
        "# HELP istio_tcp_connections_closed_total TCP connections closed.\n"
        "# TYPE istio_tcp_connections_closed_total counter\n"
    )


def test_empty_registry_is_a_single_newline() -> None:
    assert encode_text(CollectorRegistry()) == b"\n"


def test_registration_reads_nothing_and_every_scrape_reads_fresh() -> None:
    series = FixedSeries([SENT])
    registry = CollectorRegistry(auto_describe=True)
    collector = TcpacctCollector(series)
    registry.register(collector)
    assert list(collector.describe()) == []
    assert series.reads == 0
    encode_text(registry)
    encode_text(registry)
    assert series.reads == 2


def test_standard_client_python_metrics_keep_their_usual_names() -> None:
    registry = CollectorRegistry()
    Counter("requests", "Requests.", registry=registry).inc(2)
    Gauge("temperature", "Degrees.", registry=registry).set(21.5)
    Histogram("latency_seconds", "Latency.", buckets=(0.1,), registry=registry).observe(0.05)
    text = encode_text(registry).decode()
    assert "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total 2\n" in (
        text
    )
    assert "# TYPE temperature gauge\ntemperature 21.5\n" in text
    assert 'latency_seconds_bucket{le="0.1"} 1\n' in text
    assert 'latency_seconds_bucket{le="+Inf"} 1\n' in text
    assert "latency_seconds_count 1\n" in text
    assert "_created" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["latency_seconds"].type == "histogram"
    assert math.isclose(families["latency_seconds"].samples[-1].value, 0.05)


def test_collector_over_a_real_accountant_with_the_builtin_catalogue() -> None:
    accountant = Accountant(load_catalogue([]), FakeEnricher())
    accountant.apply(poll(live=[sample(1, sent=1000, received=7)]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpacctCollector(accountant))
    text = encode_text(registry).decode()
    values = {
        f.name: [(s.labels["reporter"], s.labels["source_workload"], s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }
    assert values == {
        "istio_tcp_sent_bytes": [("source", "app", 7)],
        "istio_tcp_received_bytes": [("source", "app", 1000)],
        "istio_tcp_connections_opened": [("source", "app", 1)],
        "istio_tcp_connections_closed": [("source", "app", 0)],
    }
    assert text.count("# TYPE istio_tcp_") == 4
    assert "# TYPE istio_tcp_received_bytes_total counter\n" in text


def test_content_type_is_the_0_0_4_text_format() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
