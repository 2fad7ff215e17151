"""`python -m server`: serve one model over gRPC.

    python -m server                                  # SmolLM2 (--model=smollm2), 127.0.0.1:50051
    python -m server --model=/ckpt/llama-3-8b --max_num_seqs=64 --metrics_port=9090

Flags become an EngineConfig and a ServerConfig here, once. SIGTERM (or Ctrl-C) drains: new
calls get UNAVAILABLE, health turns NOT_SERVING, running requests get --grace_period_s to
finish, the rest are aborted, then the process exits 0.
"""

import asyncio
import os
import signal
import sys
from typing import Callable

from absl import app, flags, logging

from jaxserve.config import EngineConfig
from jaxserve.default_model import BUILTIN_MODEL, UNTRAINED_NOTICE
from jaxserve.engine import Engine
from server.config import ServerConfig
from server.grpc_server import GrpcServer
from jaxserve.flags import (FLAGS, engine_class_from_flags, engine_config_from_flags,
                            initialize_distributed_from_flags)
from sharding import distributed

_SERVER = ServerConfig()

# --model and the engine limits (--max_num_seqs, --max_num_batched_tokens, --max_model_len,
# --block_size, --num_kv_blocks, --dtype, --attention_backend, --enable_prefix_caching,
# --enable_chunked_prefill, --tensor_parallel, ..., the multi-host flags) are jaxserve/flags.py's,
# shared with the CLI runner.
flags.DEFINE_string("host", _SERVER.host, "Address to listen on; 0.0.0.0 exposes the server.")
flags.DEFINE_integer("port", _SERVER.port, "gRPC port; 0 picks a free one (logged).")
flags.DEFINE_boolean("precompile", True, "Compile every step shape before serving (slower start, "
                     "no compile pauses later).")
flags.DEFINE_boolean("random_weights", False, "Initialize the model randomly from --model's "
                     "config.json instead of loading weights (to benchmark a model shape).")
flags.DEFINE_string("compilation_cache_dir", "", "Persistent JAX compilation cache; a restart "
                    "with the same model and limits then skips compiling.")
# Server.
flags.DEFINE_integer("max_pending", _SERVER.max_pending, "Requests admitted at once (waiting + "
                     "running); past it calls get RESOURCE_EXHAUSTED with a retry-after-ms hint.")
flags.DEFINE_float("grace_period_s", _SERVER.grace_period_s,
                   "On SIGTERM, how long running requests may take to finish.")
flags.DEFINE_string("tls_cert", "", "PEM certificate chain; with --tls_key serves TLS.")
flags.DEFINE_string("tls_key", "", "PEM private key.")
flags.DEFINE_string("auth_token", "", "When set, every call must carry 'authorization: Bearer "
                    "<token>'. The environment variable JAXSERVE_AUTH_TOKEN is read when this flag "
                    "is empty (it keeps the token off the command line).")
flags.DEFINE_integer("metrics_port", 0, "Prometheus /metrics port on --host; 0: off.")
flags.DEFINE_integer("max_message_bytes", _SERVER.max_message_bytes,
                     "Largest gRPC message sent or received; a unary reply that could exceed it "
                     "is refused before generating.")
flags.DEFINE_float("watchdog_timeout_s", _SERVER.watchdog_timeout_s,
                   "Health goes NOT_SERVING when the engine loop makes no progress for this long "
                   "with work queued (compiles excepted); 0: off.")


def configs_from_flags() -> tuple[EngineConfig, ServerConfig]:
    """The two configs the flags describe; ValueError names the bad flag."""
    engine_config = engine_config_from_flags()
    server_config = ServerConfig(
        host=FLAGS.host, port=FLAGS.port, max_pending=FLAGS.max_pending,
        grace_period_s=FLAGS.grace_period_s, tls_cert=FLAGS.tls_cert or None,
        tls_key=FLAGS.tls_key or None,
        auth_token=FLAGS.auth_token or os.environ.get("JAXSERVE_AUTH_TOKEN") or None,
        metrics_port=FLAGS.metrics_port or None, max_message_bytes=FLAGS.max_message_bytes,
        watchdog_timeout_s=FLAGS.watchdog_timeout_s)
    return engine_config, server_config


async def serve(engine_factory: Callable[[], Engine], server_config: ServerConfig) -> int:
    """Serves until SIGTERM/SIGINT, then drains and stops; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a stop during start-up is honored too
        loop.add_signal_handler(sig, stop.set)
    server = GrpcServer(engine_factory, server_config)
    await server.start()
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        logging.error("loading the model failed: %r", load.exception())
        code = 1
    else:
        await stopping
        logging.info("stop requested")
    await server.drain()
    await server.stop()
    load.cancel()
    if isinstance(server.engine, Engine):  # (a DisaggregatedEngine runs in one process)
        server.engine.runner.release_followers()  # multi-host: lets the other processes exit
    busy = server.unfinished_threads()
    if busy:
        # Stopped while the model loads or compiles (or a step never returned): the thread is
        # inside XLA and cannot be stopped, and interpreter shutdown under it would crash
        # (SIGSEGV/SIGABRT). Leave at once, the logs flushed first.
        logging.warning("exiting while %s still runs", ", ".join(busy))
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed_from_flags()
    try:
        engine_config, server_config = configs_from_flags()
        engine_class = engine_class_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if FLAGS.compilation_cache_dir:
        import jax
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    if FLAGS.model == BUILTIN_MODEL:
        logging.warning(UNTRAINED_NOTICE)
    model, precompile, random_weights = FLAGS.model, FLAGS.precompile, FLAGS.random_weights
    if not distributed.is_leader():
        # Multi-host: process 0 serves gRPC and schedules; every other process holds its shards
        # of the model and runs process 0's steps until it stops.
        Engine(model, engine_config, precompile=precompile, random_weights=random_weights,
               skip_tokenizer=True).runner.follow()
        sys.exit(0)
    sys.exit(asyncio.run(serve(
        lambda: engine_class(model, engine_config, precompile=precompile,
                             random_weights=random_weights),
        server_config)))


if __name__ == "__main__":
    app.run(main)
