"""`jaxserve serve` (or python -m server): serve one model over gRPC, and the OpenAI-compatible
HTTP API beside it.

    jaxserve serve                                 # SmolLM2 (--model=smollm2), 127.0.0.1:50051
    jaxserve serve --model=/ckpt/llama-3-8b --max_num_seqs=64 --metrics_port=9090
    jaxserve serve --http_port=8000                # and http://127.0.0.1:8000/v1
    jaxserve serve --http_port=8000 --nogrpc       # the HTTP API alone
    jaxserve serve --access_log --log_stats_interval_s=5     # a line per request, stats every 5 s

Flags become an EngineConfig and a ServerConfig here, once; the model, the mesh and the ports
are checked before anything binds. SIGTERM (or Ctrl-C) drains: new
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
from jaxserve.model_io.default_model import BUILTIN_MODEL, UNTRAINED_NOTICE
from jaxserve.engine.engine import Engine
from server.config import ServerConfig
from server.grpc_server import GrpcServer
from server.openai.http_server import HttpServer
from jaxserve.cli import cli_app
from jaxserve.cli.dataclass_flags import define_flags
from jaxserve.cli.flags import (FLAGS, check_model_against_flags, engine_class_from_flags,
                                engine_config_from_flags, initialize_distributed_from_flags)
from server.listen_check import check_can_listen
from server.stats_logger import StatsLogger
from sharding import distributed

# --model, the engine flags (one per EngineConfig field) and the multi-host flags are
# jaxserve/cli/flags.py's, shared with every jaxserve command. The server flags: one per ServerConfig
# field (--host, --port, --http_port, --max_pending, --grace_period_s, --tls_cert, --auth_token,
# --metrics_port, --watchdog_timeout_s, --log_stats_interval_s, --access_log, ...), with its
# default and the help of its docstring (jaxserve/cli/dataclass_flags.py).
SERVER = define_flags(ServerConfig, "server")
flags.DEFINE_boolean("grpc", True, "Serve gRPC on --port; --nogrpc serves the HTTP API alone "
                     "(with --http_port).")
flags.DEFINE_boolean("precompile", True, "Compile every step shape before serving (slower start, "
                     "no compile pauses later).")
flags.DEFINE_boolean("random_weights", False, "Initialize the model randomly from --model's "
                     "config.json instead of loading weights (to benchmark a model shape).")
flags.DEFINE_string("compilation_cache_dir", "", "Persistent JAX compilation cache; a restart "
                    "with the same model and limits then skips compiling.")


def configs_from_flags() -> tuple[EngineConfig, ServerConfig]:
    """The two configs the flags describe; ValueError names the bad flag."""
    engine_config = engine_config_from_flags()
    # The token may come from JAXSERVE_AUTH_TOKEN instead (it keeps it off the command line).
    server_config = SERVER.build(
        port=FLAGS.port if FLAGS.grpc else None,
        served_model_name=FLAGS.served_model_name or FLAGS.model,
        tls_cert=FLAGS.tls_cert or None, tls_key=FLAGS.tls_key or None,
        auth_token=FLAGS.auth_token or os.environ.get("JAXSERVE_AUTH_TOKEN") or None)
    return engine_config, server_config


def check_before_start(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """What would otherwise fail on the load thread or at bind, checked first so that it is one
    line: the model, the engine limits and mesh against it, and the ports (ValueError or
    FileNotFoundError naming what is wrong)."""
    check_model_against_flags(engine_config)
    ports = ((server_config.port, "port"), (server_config.http_port, "http_port"),
             (server_config.metrics_port, "metrics_port"))
    taken = {}
    for port, flag in ports:  # (0 picks a free port each time: never shared)
        if port and port in taken:
            raise ValueError(f"--{flag}={port} is --{taken[port]}'s too; give each its own port")
        taken.setdefault(port, flag)
    for port, flag in ports:
        check_can_listen(server_config.host, port, flag)
    for path, flag in ((server_config.tls_cert, "tls_cert"), (server_config.tls_key, "tls_key")):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag}: no such file: {path!r}")


async def serve(engine_factory: Callable[[], Engine], server_config: ServerConfig) -> int:
    """Serves until SIGTERM/SIGINT, then drains and stops; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a stop during start-up is honored too
        loop.add_signal_handler(sig, stop.set)
    server = GrpcServer(engine_factory, server_config)
    await server.start()
    http = HttpServer(server) if server_config.http_port is not None else None
    if http is not None:
        try:
            await http.start()
        except OSError:  # --http_port in use
            await server.stop()
            raise
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    stats = None
    if server_config.log_stats_interval_s:  # the periodic serving line (server/stats_logger.py)
        stats = asyncio.create_task(StatsLogger(
            lambda: server.engine_loop.stats if server.engine_loop else None,
            server_config.log_stats_interval_s).run())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        logging.error("loading the model failed: %r", load.exception())
        code = 1
    else:
        await stopping
        logging.info("stop requested")
    await server.drain()
    if http is not None:
        await http.stop()
    await server.stop()
    load.cancel()
    if stats is not None:
        stats.cancel()
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
    try:
        engine_config, server_config = configs_from_flags()
        engine_class = engine_class_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    initialize_distributed_from_flags()
    try:
        if distributed.is_leader():  # (the others serve nothing)
            check_before_start(engine_config, server_config)
        else:
            check_model_against_flags(engine_config)
    except (ValueError, FileNotFoundError) as e:
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


def cli(argv: list[str] | None = None) -> None:
    """`jaxserve serve`: main() under jaxserve/cli/cli_app.py's flag parsing and error handling."""
    cli_app.run(main, "serve", argv)


if __name__ == "__main__":
    cli()
