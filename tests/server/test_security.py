"""Bearer-token auth on every call, and TLS."""

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tests.server.conftest import greedy

TOKEN = "s3cret-token"


def test_wrong_or_missing_bearer_token_is_unauthenticated(make_server):
    server = make_server(auth_token=TOKEN)
    stub = server.stub()
    request = pb.GenerateRequest(text="hi", params=greedy(2))
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
        for call in (lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata),
                     lambda: list(stub.Generate(request, timeout=10, metadata=metadata)),
                     lambda: health_pb2_grpc.HealthStub(server.channel()).Check(
                         health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.Complete(request, timeout=30, metadata=good).usage.output_tokens == 2
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=good).vocab_size > 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_token(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = make_server(tls_cert=str(cert), tls_key=str(key), auth_token=TOKEN)
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()),
        grpc.access_token_call_credentials(TOKEN))  # sends "authorization: Bearer <token>"
    stub = pb_grpc.JaxServeStub(grpc.secure_channel(server.target, credentials))
    request = pb.GenerateRequest(text="hi", params=greedy(2))
    assert stub.Complete(request, timeout=30).usage.output_tokens == 2
    with pytest.raises(grpc.RpcError) as error:  # plaintext to a TLS port
        server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
