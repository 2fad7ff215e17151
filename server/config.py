"""ServerConfig: where the server listens, how much it admits, how it stops, who may call it.
RouterConfig: the same for the replica router, and which backends it routes to, and how.

Flags become one of these once, in __main__ (router.py for the router); everything below takes
it as it is. The engine's own limits are a jaxserve.EngineConfig beside it.
"""

import dataclasses

from server.routing_policy import POLICIES, PrefixAffinity


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Attributes:
      host: the address to listen on (every port below); 0.0.0.0 exposes the server.
      port: the gRPC port; 0 picks a free one (GrpcServer.port tells which); None: no gRPC (the
        HTTP API alone).
      http_port: the OpenAI-compatible HTTP API (server/openai/) on `host`, beside gRPC and
        sharing its engine loop, admission and metrics; None is off, 0 picks a free port.
      served_model_name: the model's name in the HTTP API (`model`, /v1/models); None: its path
        (the flag's default: --model as given).
      max_pending: requests admitted at once (waiting + running); past it, RESOURCE_EXHAUSTED.
      grace_period_s: on drain (SIGTERM), how long running requests may take to finish.
      tls_cert, tls_key: PEM files, the certificate chain and its private key: TLS; both or
        neither.
      auth_token: when set, every call must carry `authorization: Bearer <auth_token>` (the
        flag: JAXSERVE_AUTH_TOKEN is read when it is not given, keeping the token off the
        command line).
      metrics_port: Prometheus endpoint on `host`; None is off, 0 picks a free port.
      max_message_bytes: largest gRPC message sent or received; a unary reply that could exceed
        it is refused before generating (server/reply_size.py).
      watchdog_timeout_s: health goes NOT_SERVING when the engine loop makes no progress for
        this long with work queued (a compile in progress does not count); 0 is off.
      log_stats_interval_s: every this many seconds, one log line of the engine's throughput,
        requests, KV cache use and prefix cache hit rate when anything happened
        (server/stats_logger.py); 0 is off.
      access_log: one log line per finished call: request id, status, tokens, latency
        (server/access_log.py).
    """

    host: str = "127.0.0.1"
    port: int | None = 50051
    http_port: int | None = None
    served_model_name: str | None = None
    max_pending: int = 256
    grace_period_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    metrics_port: int | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    watchdog_timeout_s: float = 60.0
    log_stats_interval_s: float = 10.0
    access_log: bool = False

    def __post_init__(self):
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"{name} must be in [0, 65536), got {value}")
        if self.port is None and self.http_port is None:
            raise ValueError("nothing to serve: gRPC is off (port None: --nogrpc) and http_port "
                             "is unset")
        if self.served_model_name == "":
            raise ValueError("served_model_name must not be empty (leave it unset for the path)")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65536), got {self.metrics_port}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must not be empty (leave it unset for no auth)")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.watchdog_timeout_s < 0:
            raise ValueError(f"watchdog_timeout_s must be >= 0 (0 is off), got "
                             f"{self.watchdog_timeout_s}")
        if not 0 <= self.log_stats_interval_s < float("inf"):
            raise ValueError(f"log_stats_interval_s must be >= 0 (0 is off), got "
                             f"{self.log_stats_interval_s}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Attributes:
      backends: the jaxserve servers, as host:port (IPv6 as [::1]:50051).
      policy: one of routing_policy.POLICIES; prefix_affinity: that policy's settings.
      max_attempts: backends a call may try when they answer UNAVAILABLE before any message.
      health_check_interval_s, health_check_timeout_s: how often each backend's health is checked,
        and how long a check may take before the backend counts as down.
      host, port: where the router listens; port 0 picks a free one (Router.port tells which).
      auth_token: when set, every call to the router must carry `authorization: Bearer <token>`.
      backend_auth_token: the token for the router's own health checks of the backends (default:
        auth_token). Calls are forwarded with the client's `authorization`, not this.
      metrics_port: Prometheus endpoint on `host`; None is off, 0 picks a free port.
      max_message_bytes: largest gRPC message sent or received, both sides.
      grace_period_s: on stop (SIGTERM), how long running calls may take to finish.
    """

    backends: tuple[str, ...]
    policy: str = "prefix_affinity"
    prefix_affinity: PrefixAffinity = PrefixAffinity()
    max_attempts: int = 3
    health_check_interval_s: float = 1.0
    health_check_timeout_s: float = 5.0
    host: str = "127.0.0.1"
    port: int = 50050
    auth_token: str | None = None
    backend_auth_token: str | None = None
    metrics_port: int | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    grace_period_s: float = 30.0

    def __post_init__(self):
        if isinstance(self.backends, str) or not self.backends:
            raise ValueError("backends must list at least one backend, as host:port,host:port")
        for address in self.backends:
            check_address(address)
        duplicates = sorted({a for a in self.backends if self.backends.count(a) > 1})
        if duplicates:
            raise ValueError(f"backends lists {', '.join(duplicates)} more than once")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("health_check_interval_s", "health_check_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"{name} must be in [0, 65536), got {value}")
        for name in ("auth_token", "backend_auth_token"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it unset for none)")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")


def check_address(address: str) -> None:
    """ValueError unless `address` is host:port with a port in [1, 65535]."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"backends: {address!r} is not host:port with a port in [1, 65535]")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"backends: {address!r}: an IPv6 host goes in brackets, as [::1]:50051")
