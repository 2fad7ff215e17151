"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every way a call is refused becomes one APIError, raised where the bad value is found and
answered by the app's handler:

    bad JSON, a field of the wrong shape, an unknown field     400 invalid_request_error, param
    a bad value (SamplingParams, the engine), prompt too long  400, param the request's field
    no chat template, bad messages                             400, param "messages"
    missing or wrong bearer token                              401 invalid_api_key
    a model name not served                                    404 model_not_found
    a body over max_message_bytes                              413 request_too_large
    max_pending requests in flight                             429 with Retry-After (seconds)
    loading, draining                                          503 with Retry-After
    the engine failed this request                             500 server_error
"""

import math
import re

import grpc
import pydantic

from server.errors import StatusError

_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "requests",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Ends an HTTP call with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.headers = code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                          "param": self.param, "code": self.code}}


def check_supported(request) -> None:
    """APIError 400 for the first field this server does not implement (set to other than its
    neutral value), and for stream_options without stream: a completion or chat request."""
    unsupported = request.unsupported_fields()
    if unsupported:
        raise APIError(400, f"{unsupported[0]} is not supported by this server",
                       param=unsupported[0])
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only allowed with stream: true",
                       param="stream_options")


def from_validation_error(error: pydantic.ValidationError) -> APIError:
    """400 naming the first bad field as a dotted path (messages.0.role)."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if param is None:  # the body as a whole: not a JSON object
        return APIError(400, f"the request body must be a JSON object: {first['msg']}")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return APIError(400, f"{param}: field required", param=param)
    return APIError(400, f"{param}: {first['msg']} (got {_short(first.get('input'))})",
                    param=param)


def from_value_error(error: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """400 for a request SamplingParams or the engine refused; the message names the field,
    translated to the request's own name by `renames` (e.g. prompt -> messages for chat)."""
    message = str(error)
    renames = renames or {}
    match = _SAMPLING_FIELD.match(message)
    if match:  # "SamplingParams.top_p must be ..." -> "top_p must be ..."
        field = match.group(1)
        param = renames.get(field, field)
        return APIError(400, param + message[match.end():], param=param)
    if message.startswith("prompt has ") or (message.startswith("prompt is ")
                                             and "bytes" in message):  # too long, or too large
        param = renames.get("prompt", "prompt")
        text = message if param == "prompt" else f"{param}: {message}"
        return APIError(400, text, param=param, code="context_length_exceeded")
    for prefix, field in (("messages", "messages"), ("chat_template", "messages"),
                          ("prompt_token_ids", "prompt"), ("prompt", "prompt")):
        if message.startswith(prefix):
            param = renames.get(field, field)
            if prefix != param:
                message = f"{param}: {message.removeprefix(prefix).lstrip(': ')}"
            return APIError(400, message, param=param)
    return APIError(400, message)


def from_status_error(error: StatusError) -> APIError:
    """Admission's refusals (RESOURCE_EXHAUSTED, UNAVAILABLE) as 429 and 503."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_ms = dict(error.trailing_metadata).get("retry-after-ms", "1000")
        seconds = max(1, math.ceil(int(retry_ms) / 1000))  # Retry-After is whole seconds
        return APIError(429, error.details, code="rate_limit_exceeded",
                        headers={"Retry-After": str(seconds)})
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, error.details, headers={"Retry-After": "1"})
    return APIError(500, error.details)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
