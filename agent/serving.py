"""The node's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

Optional HTTPS (``--tls-cert``/``--tls-key``) and optional basic auth or a bearer token on
``/metrics``, in the spirit of Prometheus' exporter-toolkit. ``/healthz`` and ``/readyz``
stay open for the kubelet's probes.
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from agent.exporter import CONTENT_TYPE, encode_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class EndpointSecurity:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    basic_auth: tuple[str, str] | None = None
    bearer_token: str | None = None


def authorized(header: str | None, security: EndpointSecurity) -> bool:
    """Whether an ``Authorization`` header passes (constant-time comparisons).

    With basic auth ``("prom", "s3cret")``: ``"Basic cHJvbTpzM2NyZXQ="`` -> True,
    anything else -> False. With neither configured every request passes.
    """
    if security.basic_auth is None and security.bearer_token is None:
        return True
    if not header:
        return False
    scheme, _, credentials = header.partition(" ")
    if security.bearer_token is not None:
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), security.bearer_token.encode()
        )
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = (
            base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        )
    except (ValueError, UnicodeDecodeError):
        return False
    assert security.basic_auth is not None
    want_user, want_password = security.basic_auth
    user_ok = hmac.compare_digest(user.encode(), want_user.encode())
    password_ok = hmac.compare_digest(password.encode(), want_password.encode())
    return user_ok and password_ok


def _handler(
    registry: CollectorRegistry,
    live: Callable[[], Health],
    ready: Callable[[], Health],
    security: EndpointSecurity,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tcpacct"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if not authorized(self.headers.get("Authorization"), security):
                    self._send(401, b"unauthorized\n", "text/plain", auth=True)
                    return
                try:
                    body = encode_text(registry)
                except Exception:
                    log.exception("scrape failed")
                    self._send(500, b"scrape failed, see the agent's log\n", "text/plain")
                    return
                self._send(200, body, CONTENT_TYPE)
            elif path in ("/healthz", "/readyz"):
                health = live() if path == "/healthz" else ready()
                self._send(200 if health.ok else 503, (health.detail + "\n").encode(), "text/plain")
            elif path == "/":
                self._send(200, b"tcpacct: /metrics /healthz /readyz\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str, auth: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if auth:
                scheme = "Bearer" if security.bearer_token else 'Basic realm="tcpacct"'
                self.send_header("WWW-Authenticate", scheme)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler


class _Server(ThreadingHTTPServer):
    """One thread per connection; with TLS the handshake runs in that thread (never in
    accept(), where one silent client would stall every other scrape)."""

    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None
    handshake_timeout = 10.0

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if self.tls is not None:
            request.settimeout(self.handshake_timeout)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as error:
                log.debug("TLS handshake with %s failed: %s", client_address, error)
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves in a background thread; ``close()`` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        live: Callable[[], Health],
        ready: Callable[[], Health],
        security: EndpointSecurity = EndpointSecurity(),
    ) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _handler(registry, live, ready, security))
        if security.tls_cert is not None and security.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(security.tls_cert), str(security.tls_key))
            self._server.tls = context
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
