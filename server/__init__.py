"""jaxserve's gRPC server: the jaxserve.v1 API over the engine, with health, reflection,
admission control, graceful drain, TLS, bearer-token auth and Prometheus metrics.

The path of a call: grpc_server.py (the grpc.aio server, auth.py's interceptor, health,
reflection) -> servicer.py (admission.py, proto_convert.py, errors.py) -> engine_loop.py (the
thread that owns the Engine) -> back as RequestOutputs -> servicer.py (metrics.py) -> client.
`python -m server` (__main__.py) turns flags into config.py's ServerConfig and an EngineConfig.

The replica router (`python -m server.router`, router.py) serves the same API in front of
several servers: backend_pool.py watches their health and load, routing_policy.py picks one.
"""
