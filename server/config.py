"""ServerConfig: where the server listens, how much it admits, how it stops, who may call it.

Flags become one of these once, in __main__; everything below takes it as it is. The engine's
own limits are a jaxserve.EngineConfig beside it.
"""

import dataclasses

@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Attributes:
      host, port: where gRPC listens; port 0 picks a free one (GrpcServer.port tells which).
      max_pending: requests admitted at once (waiting + running); past it, RESOURCE_EXHAUSTED.
      grace_period_s: on drain (SIGTERM), how long running requests may take to finish.
      tls_cert, tls_key: PEM files; both or neither.
      auth_token: when set, every call must carry `authorization: Bearer <auth_token>`.
      metrics_port: Prometheus endpoint on `host`; None is off, 0 picks a free port.
      max_message_bytes: largest gRPC message sent or received.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_pending: int = 256
    grace_period_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    metrics_port: int | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
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
