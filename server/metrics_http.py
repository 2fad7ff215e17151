"""The metrics port: a small HTTP server with two paths, for Prometheus and for load balancers.

    GET /metrics   the server's Prometheus registry (prometheus_client's WSGI app)
    GET /health    200 "SERVING" only while the gRPC health is SERVING; 503 and the state otherwise
    anything else  404; a method other than GET or HEAD: 405

With an auth token every request must carry `Authorization: Bearer <token>` (the gRPC token);
without it the answer is 401, counted in jaxserve_unauthenticated_calls{endpoint="metrics"}.
It runs on threads of its own (a threading WSGI server), so a scrape never waits on the event
loop or the engine thread: the health it reports is a plain attribute read.
"""

import hmac
import socketserver
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every second would flood the log
        pass


class MetricsHttpServer:
    def __init__(self, registry: CollectorRegistry, health: Callable[[], str],
                 unauthenticated: Counter, auth_token: str | None = None):
        """health() returns the server's state: "SERVING" or another word for the 503 body."""
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._unauthenticated = unauthenticated
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: a free one); returns the port."""
        self._http = make_server(host, port, self._app, server_class=_ThreadingWSGIServer,
                                 handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()
        return self._http.server_port

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def _app(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "GET or HEAD only\n",
                          [("Allow", "GET, HEAD")])
        if self._expected is not None and not self._authorized(environ):
            self._unauthenticated.labels(endpoint="metrics").inc()
            return _plain(start_response, "401 Unauthorized",
                          "missing or wrong bearer token (Authorization: Bearer <token>)\n",
                          [("WWW-Authenticate", "Bearer")])
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/health":
            state = self._health()
            if state == "SERVING":
                return _plain(start_response, "200 OK", "SERVING\n")
            return _plain(start_response, "503 Service Unavailable", f"{state}\n")
        return _plain(start_response, "404 Not Found", "not found: the paths are /metrics and "
                      "/health\n")

    def _authorized(self, environ) -> bool:
        value = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        return hmac.compare_digest(value, self._expected)  # constant time


def _plain(start_response, status: str, body: str, headers=()):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data))), *headers])
    return [data]
