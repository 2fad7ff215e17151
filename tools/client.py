"""Streams one prompt's completion from a jaxserve server to the terminal.

    python -m server &                                  # in another terminal
    python -m tools.client --prompt="Once upon a time" --max_tokens=64 --temperature=0.8

Text goes to stdout as it arrives; the finish reason, usage and timings go to stderr.
"""

import asyncio
import sys
import time

import grpc
from absl import app, flags

from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from server.gen.jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tools.grpc_channel import open_channel

flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server.")
flags.DEFINE_string("prompt", "Once upon a time", "The prompt text.")
# Sampling flags not given are not sent: the server applies the model's defaults to them.
flags.DEFINE_integer("max_tokens", 64, "Tokens to generate (not given: the server's default).")
flags.DEFINE_float("temperature", 0.0, "0 is greedy (not given: the model's default).")
flags.DEFINE_float("top_p", 1.0, "1 is off (not given: the model's default).")
flags.DEFINE_integer("top_k", 0, "0 is off (not given: the model's default).")
flags.DEFINE_integer("seed", None, "Sampling seed.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_string("auth_token", "", "Bearer token, if the server wants one.")
flags.DEFINE_string("tls_ca", "", "PEM root certificate: connect with TLS.")
flags.DEFINE_float("timeout_s", 300.0, "Deadline of the call.")

FLAGS = flags.FLAGS


async def stream() -> int:
    channel, metadata = open_channel(FLAGS.target, tls_ca=FLAGS.tls_ca, auth_token=FLAGS.auth_token)
    given = {name: FLAGS[name].value for name in ("max_tokens", "temperature", "top_p", "top_k")
             if FLAGS[name].present}
    params = pb.SamplingParams(stop=FLAGS.stop, **given)
    if FLAGS.seed is not None:
        params.seed = FLAGS.seed
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
    sys.exit(asyncio.run(stream()))


if __name__ == "__main__":
    app.run(main)
