"""`jaxserve`: one command for every front, a subcommand each (pyproject's console script).

    jaxserve serve [flags]          the gRPC server                   (python -m server)
    jaxserve run [flags]            generate for prompts, throughput  (python -m tools.run)
    jaxserve chat [flags]           chat in the terminal              (python -m tools.chat)
    jaxserve client [flags]         stream one completion from a server (python -m tools.client)
    jaxserve bench [serving|throughput] [flags]   benchmarks          (python -m tools.benchmark_*)
    jaxserve router [flags]         one endpoint over several servers (python -m server.router)

`jaxserve <command> --help` lists the command's flags: its own, the model and engine flags, the
sampling flags. Only the chosen command's module is imported, so only its flags exist.
"""

import importlib
import sys

from jaxserve.cli import cli_app

# command -> (module, one line for the usage)
COMMANDS = {
    "serve": ("server.__main__", "serve a model over gRPC"),
    "run": ("tools.run", "generate text for prompts and print a throughput summary"),
    "chat": ("tools.chat", "chat with a model in the terminal"),
    "client": ("tools.client", "stream one prompt's completion from a server"),
    "bench": ("tools.benchmark_serving", "serving benchmark (`bench throughput`: the engine's "
              "batch throughput)"),
    "router": ("server.router", "one jaxserve.v1 endpoint over several servers"),
}
BENCHMARKS = {"serving": "tools.benchmark_serving", "throughput": "tools.benchmark_throughput"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: jaxserve <command> [flags]   (jaxserve <command> --help: its flags)\n\n"
            "commands:\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        sys.stderr.write(usage())
        sys.exit(cli_app.EXIT_USAGE)
    if argv[1] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        sys.exit(0)
    command, rest = argv[1], argv[2:]
    if command not in COMMANDS:
        cli_app.fail("jaxserve", f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    module_name = COMMANDS[command][0]
    if command == "bench" and rest and rest[0] in BENCHMARKS:
        module_name, rest = BENCHMARKS[rest[0]], rest[1:]
    module = importlib.import_module(module_name)
    args = [f"jaxserve {command}", *rest]
    if hasattr(module, "cli"):  # a command that sets its own defaults first
        module.cli(args)
    else:
        cli_app.run(module.main, command, args)


if __name__ == "__main__":
    main()
