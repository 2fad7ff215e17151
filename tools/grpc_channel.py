"""A gRPC channel to a jaxserve server, with TLS and the bearer token when given (tools only)."""

import grpc


def open_channel(target: str, *, tls_ca: str = "", auth_token: str = ""
                 ) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """(channel, metadata to send with every call).

    With tls_ca (a PEM root certificate) the channel is TLS and carries the token as call
    credentials; without, the token travels as plain `authorization` metadata (loopback only).
    """
    if tls_ca:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        if auth_token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(auth_token))
        return grpc.aio.secure_channel(target, credentials), ()
    metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
    return grpc.aio.insecure_channel(target), metadata
