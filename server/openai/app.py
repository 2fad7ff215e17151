"""The FastAPI app of the OpenAI-compatible API, over the gRPC server's engine loop.

    POST /v1/completions, /v1/chat/completions    serving_completions.py, serving_chat.py
    GET  /v1/models                               the one model served
    POST /tokenize, /detokenize                   vLLM's bodies
    GET  /health                                  200 "SERVING"; 503 and LOADING, DRAINING or STALLED
    GET  /metrics                                 the server's Prometheus registry (gRPC's too)

`core` is the GrpcServer: its Admission, EngineLoop, metrics, generation defaults and health
state serve both APIs, so one drain, one max_pending and one set of histograms cover both.
With an auth token every path wants `Authorization: Bearer <token>`, as every gRPC call does.

A call's engine requests end with it: a unary call races the client's disconnect and aborts
its requests when the client goes first; a streamed one aborts them when Starlette cancels the
stream on disconnect (EventStream.__call__'s finally), so the KV blocks are freed at once.
"""

import asyncio
import hmac
import json
import time

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException

from jaxserve.request_limits import check_prompt_size
from server.config import ServerConfig
from server.errors import StatusError
from server.openai import protocol
from server.openai.engine_requests import encode_messages
from server.openai.errors import APIError, from_status_error, from_validation_error, from_value_error
from server.openai.serving_chat import ChatCall
from server.openai.serving_completions import CompletionCall

_PARSE_ON_THREAD_BYTES = 64 * 1024
_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
          "/health", "/metrics")


def build_app(core, config: ServerConfig) -> FastAPI:
    """core: a GrpcServer (started; its model loads in the background)."""
    auth = [Depends(_bearer_check(config.auth_token, core.metrics))] if config.auth_token else []
    app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=auth)
    created = int(time.time())
    limit = config.max_message_bytes
    calls = Counter("jaxserve_http_requests", "OpenAI-compatible HTTP calls by path and status",
                    ["path", "status"], registry=core.metrics.registry)

    def model_name() -> str:
        return config.served_model_name or core.engine_loop.engine.model_path

    def engine():
        """The engine, once loaded and while not draining; else 503."""
        try:
            core.admission.check_open()
        except StatusError as e:
            raise from_status_error(e) from e
        return core.engine_loop.engine

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name():
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                           f"`{model_name()}`", param="model", code="model_not_found")

    async def generate(request: Request, kind, call_class):
        engine()
        body = await _read_request(request, limit, kind)
        check_model(body.model)
        call = call_class(core, body, model_name())
        try:
            await call.open()
            if body.stream:
                return EventStream(call)  # which closes the call when the stream ends
        except BaseException:
            call.close()
            raise
        try:
            return JSONResponse(await _unless_disconnected(request, call.response()))
        finally:
            call.close()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, protocol.CompletionRequest, CompletionCall)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, protocol.ChatCompletionRequest, ChatCall)

    @app.get("/v1/models")
    async def models():
        e = engine()
        return {"object": "list", "data": [{
            "id": model_name(), "object": "model", "created": created, "owned_by": "jaxserve",
            "root": e.model_path, "parent": None, "max_model_len": e.config.max_model_len,
            "vocab_size": e.model_config.vocab_size}]}  # (beyond vLLM's card: for load tools)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        e = engine()
        body = await _read_request(request, limit, lambda raw: (
            protocol.TokenizeChatRequest if isinstance(raw, dict) and "messages" in raw
            else protocol.TokenizeCompletionRequest))
        kind = type(body)
        check_model(body.model)
        if e.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (no tokenizer.json)")
        try:
            if kind is protocol.TokenizeChatRequest:
                ids = await encode_messages(core, [m.for_template() for m in body.messages],
                                            body.add_generation_prompt)
            else:
                check_prompt_size(body.prompt, e.config.max_model_len)
                ids = await asyncio.to_thread(e.tokenizer.encode, body.prompt,
                                              body.add_special_tokens)
        except ValueError as error:
            raise from_value_error(error, {"prompt": "messages"} if kind is
                                   protocol.TokenizeChatRequest else None) from error
        strs = ([e.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
                if body.return_token_strs else None)
        return {"count": len(ids), "max_model_len": e.config.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        e = engine()
        body = await _read_request(request, limit, protocol.DetokenizeRequest)
        check_model(body.model)
        if e.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (no tokenizer.json)")
        vocab = e.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})",
                           param="tokens")
        return {"prompt": await asyncio.to_thread(e.tokenizer.decode, body.tokens)}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        state = core.health_state()
        return PlainTextResponse(state + "\n", status_code=200 if state == "SERVING" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(pydantic.ValidationError)
    async def validation_error(request: Request, error: pydantic.ValidationError):
        return await api_error(request, from_validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown path, wrong method
        return await api_error(request, APIError(error.status_code, str(error.detail),
                                                 headers=error.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):  # logged by Starlette
        return await api_error(request, APIError(500, f"internal error: {type(error).__name__}"))

    app.add_middleware(_CountCalls, counter=calls)
    return app


class EventStream(StreamingResponse):
    """A call's server-sent events; the call is closed (its unfinished requests aborted, its
    admission slots given back) however the stream ends: finished, failed or disconnected."""

    def __init__(self, call):
        super().__init__(call.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._call = call

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._call.close()


async def _read_request(request: Request, limit: int, kind):
    """The body as the protocol model `kind` (or the one `kind(parsed JSON)` picks): 413 past
    `limit` bytes (read no further), 400 when it is not JSON or not that model. A large body is
    parsed on a worker thread (pydantic's own JSON parser for a model: several times faster
    than json.loads and then validating; the thread still holds the GIL while in it)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    if len(body) > _PARSE_ON_THREAD_BYTES:
        return await asyncio.to_thread(_parse, body, kind)
    return _parse(body, kind)


def _parse(body: bytes, kind):
    """pydantic.ValidationError for a body of the wrong shape (400 by the app's handler)."""
    if isinstance(kind, type):
        try:
            return kind.model_validate_json(body)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from e
            raise
    try:
        raw = json.loads(body)
    except ValueError as e:  # (json.JSONDecodeError and UnicodeDecodeError)
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    return kind(raw).model_validate(raw)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {'at least ' if size == limit + 1 else ''}{size} "
                    f"bytes; the limit is {limit} (--max_message_bytes)",
                    code="request_too_large")


async def _unless_disconnected(request: Request, work):
    """Runs `work` (a coroutine) unless the client disconnects first, which cancels it."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "the client disconnected")  # (nobody reads this answer)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _bearer_check(token: str, metrics):
    expected = f"Bearer {token}".encode()
    refused = metrics.unauthenticated.labels(endpoint="http")

    async def check(request: Request) -> None:  # (async: on the event loop, not a thread)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time
            refused.inc()
            raise APIError(401, "missing or wrong bearer token (header 'Authorization: Bearer "
                           "<token>')", code="invalid_api_key")
    return check


class _CountCalls:
    """ASGI middleware: counts each HTTP call by path (known paths only) and status code."""

    def __init__(self, app, counter: Counter):
        self.app, self._counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self._counter.labels(path=path, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
