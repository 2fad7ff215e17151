"""gRPC status codes for refused requests: the engine's ValueError messages, mapped by field.

The engine and SamplingParams raise ValueError with the bad field first ("SamplingParams.top_p
must be ...", "prompt has 300 tokens; the limit is ..."). The client gets INVALID_ARGUMENT with
the proto field path in front of that message, or OUT_OF_RANGE for a prompt over the context.
"""

import re

import grpc

_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)")


class StatusError(Exception):
    """Ends a call with this status: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata=()):
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)


def status_for_value_error(error: ValueError) -> tuple[grpc.StatusCode, str]:
    """(code, details) for a request refused with this error."""
    message = str(error)
    if message.startswith("prompt has "):  # longer than max_model_len allows
        return grpc.StatusCode.OUT_OF_RANGE, f"prompt: {message}"
    if message.startswith("messages"):  # Chat's conversation: the message names its field
        return grpc.StatusCode.INVALID_ARGUMENT, message
    return grpc.StatusCode.INVALID_ARGUMENT, f"{_proto_field(message)}: {message}"


def _proto_field(message: str) -> str:
    match = _SAMPLING_FIELD.match(message)
    if match:
        return f"params.{match.group(1)}"
    if message.startswith("chat_template"):  # the model's template failed on Chat's messages
        return "messages"
    if message.startswith("prompt_token_ids"):
        return "token_ids"
    if message.startswith("prompt"):
        return "prompt"
    return "request"
