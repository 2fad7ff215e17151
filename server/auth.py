"""Bearer-token authentication: a server interceptor that checks every call's metadata.

A call without `authorization: Bearer <token>` (or with another token) ends with
UNAUTHENTICATED before its handler runs, and is counted (`on_refused`). Health checks and reflection are calls too: probes
must send the header (grpc_health_probe -rpc-header, grpcurl -H).
"""

import hmac
from typing import Callable

import grpc


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_refused: Callable[[], None] = lambda: None):
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        self._on_refused()
        return _refusing_handler(handler)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == "authorization":
                value = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(value, self._expected)  # constant time
        return False


async def _refuse(request_or_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape and serializers that aborts with UNAUTHENTICATED."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
                (handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
