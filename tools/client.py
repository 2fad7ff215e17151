"""Stream one prompt's completion from a jaxserve server to the terminal (`jaxserve client`, or
python -m tools.client).

    jaxserve serve &                                    # or in another terminal
    jaxserve client --prompt="Once upon a time" --max_tokens=64 --temperature=0.8 --seed=1

Text goes to stdout as it arrives; the finish reason, usage and timings go to stderr.
"""

import asyncio
import sys
import time

import grpc
from absl import app, flags

from jaxserve.cli import cli_app
from jaxserve.cli.sampling_flags import given_sampling_fields
from jaxserve.sampling_params import SamplingParams
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tools.grpc_channel import open_channel

flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server.")
flags.DEFINE_string("prompt", "Once upon a time", "The prompt text.")
# The sampling flags (jaxserve/cli/sampling_flags.py) given are sent; the server applies the model's
# defaults, then SamplingParams', to the fields not sent.
flags.DEFINE_string("auth_token", "", "Bearer token, if the server wants one.")
flags.DEFINE_string("tls_ca", "", "PEM root certificate: connect with TLS.")
flags.DEFINE_float("timeout_s", 300.0, "Deadline of the call.")

FLAGS = flags.FLAGS


async def stream() -> int:
    channel, metadata = open_channel(FLAGS.target, tls_ca=FLAGS.tls_ca, auth_token=FLAGS.auth_token)
    params = pb.SamplingParams(**given_sampling_fields())
    request = pb.GenerateRequest(text=FLAGS.prompt, params=params)
    start, first, last = time.perf_counter(), None, None
    async with channel:
        try:
            async for response in pb_grpc.JaxServeStub(channel).Generate(
                    request, timeout=FLAGS.timeout_s, metadata=metadata):
                for sample in response.samples:
                    if sample.token_ids and first is None:
                        first = time.perf_counter()
                    sys.stdout.write(sample.text)
                sys.stdout.flush()
                last = response
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - start
    usage = last.usage
    ttft = f"TTFT {1e3 * (first - start):.1f} ms, " if first is not None else ""
    print(f"\n[{pb.FinishReason.Name(last.samples[-1].finish_reason)}] prompt "
          f"{usage.prompt_tokens} tokens ({usage.cached_tokens} cached), output "
          f"{usage.output_tokens} tokens; {ttft}{usage.output_tokens / elapsed:.1f} tokens/s",
          file=sys.stderr)
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:  # checked here, before any call: --max_tokens=0 and such name themselves
        SamplingParams(**given_sampling_fields())
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    return asyncio.run(stream())


def cli(argv: list[str] | None = None) -> None:
    """`jaxserve client`: main() under jaxserve/cli/cli_app.py's flag parsing and error handling."""
    cli_app.run(main, "client", argv)


if __name__ == "__main__":
    cli()
