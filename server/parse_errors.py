"""Request bytes that do not parse: INVALID_ARGUMENT with a plain message, for every method.

grpc.aio runs a method's request deserializer before its handler; when the deserializer raises
(protobuf's DecodeError: truncated bytes, garbage, invalid UTF-8 in a string field) the call
ends with UNKNOWN ("Unexpected <class 'DecodeError'>"). This interceptor wraps each
unary-request handler's deserializer so that a parse failure becomes an `Unparsable` value, and
wraps the handler so that it answers that value with INVALID_ARGUMENT before any work is done.

It sits after the auth interceptor: a call without a token still gets UNAUTHENTICATED.
Methods with streamed requests (server reflection) are left as they are.
"""

import dataclasses
import inspect

import grpc


@dataclasses.dataclass(frozen=True)
class Unparsable:
    """What the wrapped deserializer returns for bytes it cannot parse."""

    method: str
    error: str


def _details(bad: Unparsable) -> str:
    return (f"request: the bytes sent to {bad.method} do not parse as its request message "
            f"({bad.error})")


class ParseErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _wrapped(handler, handler_call_details.method)


def _wrapped(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer

    def safe_deserialize(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or a UnicodeDecodeError from a string field
            return Unparsable(method, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    if handler.response_streaming:
        behavior = handler.unary_stream
        if inspect.isasyncgenfunction(behavior):
            async def checked(request, context):
                if isinstance(request, Unparsable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
                async for response in behavior(request, context):
                    yield response
        else:  # a coroutine that writes with context.write (grpc's health Watch)
            async def checked(request, context):
                if isinstance(request, Unparsable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
                return await behavior(request, context)
        return grpc.unary_stream_rpc_method_handler(
            checked, request_deserializer=safe_deserialize,
            response_serializer=handler.response_serializer)

    behavior = handler.unary_unary

    async def checked_unary(request, context):
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return grpc.unary_unary_rpc_method_handler(
        checked_unary, request_deserializer=safe_deserialize,
        response_serializer=handler.response_serializer)
