"""The HTTP endpoint on 127.0.0.1: /metrics /healthz /readyz, basic auth, bearer, TLS."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.registry import CollectorRegistry

from agent.accounting import FamilySnapshot
from agent.exporter import CONTENT_TYPE, TcpacctCollector
from agent.serving import EndpointSecurity, Health, MetricsServer, authorized

CLIENT_TIMEOUT = 10  # seconds; a bound on a hang, not a timing assertion

METRICS_BODY = (
    b"# HELP istio_tcp_sent_bytes_total Sent.\n"
    b"# TYPE istio_tcp_sent_bytes_total counter\n"
    b'istio_tcp_sent_bytes_total{reporter="source"} 42\n'
)


class OneFamily:
    def families(self) -> list[FamilySnapshot]:
        return [FamilySnapshot("istio_tcp_sent_bytes_total", "Sent.", ("reporter",),
                               {("source",): 42})]


class Broken:
    def families(self) -> list[FamilySnapshot]:
        raise RuntimeError("map read failed")


@dataclass
class Probe:
    health: Health

    def __call__(self) -> Health:
        return self.health


@dataclass
class Running:
    server: MetricsServer
    live: Probe
    ready: Probe

    @property
    def port(self) -> int:
        return self.server.port


def serve(security: EndpointSecurity | None = None, source=None) -> Running:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpacctCollector(source or OneFamily()))
    live, ready = Probe(Health(True, "ok")), Probe(Health(False, "starting"))
    server = MetricsServer("127.0.0.1", 0, registry, live=live, ready=ready,
                           security=security or EndpointSecurity())
    server.start()
    return Running(server, live, ready)


def close_all(servers: list[Running]) -> None:
    """Close in parallel: each ``close()`` waits for serve_forever's 0.5 s poll."""
    threads = [threading.Thread(target=r.server.close) for r in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT)


@pytest.fixture(scope="module")
def servers(pki: Pki) -> Iterator[dict[str, Running]]:
    started: dict[str, Running] = {}
    try:
        started["plain"] = serve()
        started["broken"] = serve(source=Broken())
        started["basic"] = serve(BASIC)
        started["bearer"] = serve(BEARER)
        tls = EndpointSecurity(tls_cert=pki.cert, tls_key=pki.key, basic_auth=("prom", "pw"))
        started["tls"] = serve(tls)
        started["tls_idle"] = serve(tls)
        yield started
    finally:
        close_all(list(started.values()))


@pytest.fixture
def running(servers: dict[str, Running]) -> Iterator[Running]:
    r = servers["plain"]
    yield r
    r.live.health, r.ready.health = Health(True, "ok"), Health(False, "starting")


def get(port: int, path: str, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT,
                                                 context=context)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- plain HTTP ---------------------------------------------------------------------------------


def test_metrics(running: Running) -> None:
    status, headers, body = get(running.port, "/metrics")
    assert (status, headers["Content-Type"], body) == (200, CONTENT_TYPE, METRICS_BODY)
    assert headers["Content-Length"] == str(len(METRICS_BODY))


def test_metrics_with_a_query_string(running: Running) -> None:
    assert get(running.port, "/metrics?name[]=x")[2] == METRICS_BODY


def test_healthz_and_readyz_follow_their_probes(running: Running) -> None:
    assert get(running.port, "/healthz")[::2] == (200, b"ok\n")
    assert get(running.port, "/readyz")[::2] == (503, b"starting\n")
    running.ready.health = Health(True, "polled 3 times")
    running.live.health = Health(False, "no poll for 60 s")
    assert get(running.port, "/readyz")[::2] == (200, b"polled 3 times\n")
    assert get(running.port, "/healthz")[::2] == (503, b"no poll for 60 s\n")


def test_index_and_unknown_paths(running: Running) -> None:
    assert get(running.port, "/")[::2] == (200, b"tcpacct: /metrics /healthz /readyz\n")
    assert get(running.port, "/nope")[::2] == (404, b"not found\n")


def test_failing_scrape_is_a_500_not_a_dead_server(servers: dict[str, Running]) -> None:
    port = servers["broken"].port
    assert get(port, "/metrics")[::2] == (500, b"scrape failed, see the agent's log\n")
    assert get(port, "/healthz")[0] == 200


def test_close_releases_the_port() -> None:
    r = serve()
    port = r.port
    r.server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)


# -- authorization --------------------------------------------------------------------------------

BASIC = EndpointSecurity(basic_auth=("prom", "s3cret"))
BEARER = EndpointSecurity(bearer_token="t0ken")


@pytest.mark.parametrize(
    ("header", "security", "allowed"),
    [
        (None, EndpointSecurity(), True),
        ("anything", EndpointSecurity(), True),
        ("Basic cHJvbTpzM2NyZXQ=", BASIC, True),  # prom:s3cret
        ("basic cHJvbTpzM2NyZXQ=", BASIC, True),  # the scheme is case-insensitive
        (basic("prom", "wrong"), BASIC, False),
        (basic("other", "s3cret"), BASIC, False),
        (basic("prom", "s3cret:x"), BASIC, False),
        ("Basic not-base64!", BASIC, False),
        ("Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), BASIC, False),
        ("Bearer cHJvbTpzM2NyZXQ=", BASIC, False),
        (None, BASIC, False),
        ("", BASIC, False),
        ("Bearer t0ken", BEARER, True),
        ("bearer t0ken", BEARER, True),
        ("Bearer t0ken2", BEARER, False),
        ("Bearer ", BEARER, False),
        (basic("prom", "t0ken"), BEARER, False),
        (None, BEARER, False),
    ],
)
def test_authorized(header: str | None, security: EndpointSecurity, allowed: bool) -> None:
    assert authorized(header, security) is allowed


def test_basic_auth_over_http(servers: dict[str, Running]) -> None:
    port = servers["basic"].port
    status, headers, body = get(port, "/metrics")
    assert (status, headers["WWW-Authenticate"], body) == (
        401, 'Basic realm="tcpacct"', b"unauthorized\n"
    )
    assert get(port, "/metrics", {"Authorization": basic("prom", "nope")})[0] == 401
    assert get(port, "/metrics", {"Authorization": basic("prom", "s3cret")})[::2] == (
        200, METRICS_BODY
    )
    assert get(port, "/healthz")[0] == 200  # probes stay open
    assert get(port, "/readyz")[0] == 503


def test_bearer_token_over_http(servers: dict[str, Running]) -> None:
    port = servers["bearer"].port
    status, headers, _ = get(port, "/metrics", {"Authorization": "Bearer nope"})
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert get(port, "/metrics", {"Authorization": "Bearer t0ken"})[::2] == (200, METRICS_BODY)


# -- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tcpacct test CA"))
        .issuer_name(_name("tcpacct test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_server(servers: dict[str, Running]) -> Running:
    return servers["tls"]


def test_https_client_trusting_the_ca_is_served(pki: Pki, tls_server: Running) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    assert get(tls_server.port, "/metrics", {"Authorization": basic("prom", "pw")}, context)[
        ::2
    ] == (200, METRICS_BODY)
    assert get(tls_server.port, "/metrics", {}, context)[0] == 401
    assert get(tls_server.port, "/healthz", {}, context)[::2] == (200, b"ok\n")


def test_https_client_without_the_ca_is_refused(tls_server: Running) -> None:
    context = ssl.create_default_context()  # system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        get(tls_server.port, "/healthz", {}, context)


def test_plain_http_client_gets_no_answer_from_a_tls_endpoint(
    pki: Pki, tls_server: Running
) -> None:
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        get(tls_server.port, "/healthz")
    context = ssl.create_default_context(cafile=str(pki.ca))
    assert get(tls_server.port, "/healthz", {}, context)[0] == 200  # still serving


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_refuses_versions_before_1_2(pki: Pki, tls_server: Running) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client would take TLS 1.0/1.1
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(tls_server.port, "/healthz", {}, context)


def test_idle_tcp_client_does_not_stall_a_tls_endpoint(
    pki: Pki, servers: dict[str, Running]
) -> None:
    port = servers["tls_idle"].port
    context = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT):
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=1, context=context)
        try:
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200
        finally:
            connection.close()


def test_ipv6_loopback_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    registry = CollectorRegistry(auto_describe=False)
    healthy = Probe(Health(True, "ok"))
    try:
        server = MetricsServer("::1", 0, registry, live=healthy, ready=healthy)
    except OSError as error:
        pytest.skip(f"no ::1 here: {error}")
    server.start()
    try:
        connection = http.client.HTTPConnection("::1", server.port, timeout=CLIENT_TIMEOUT)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok\n"
        connection.close()
    finally:
        server.close()
