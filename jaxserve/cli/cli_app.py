"""How every jaxserve command runs (`jaxserve serve|run|chat|bench|client`, or `python -m ...`):
absl's app.run, with a user's mistake told in one line and the flags that matter in --help.

    run(main, "run")      parses the flags, then calls main(argv)

- A bad flag (unknown, a value absl cannot parse), or a UsageError / UserError raised by main:
  one line `jaxserve run: error: ...` on stderr and exit status 2. No traceback, no help dump.
- --help (-h, --helpshort): the command's docstring and its flags by section: the command's own,
  the model and engine flags, the sampling flags, ... (absl's own --help would show only the
  main module's). --helpfull: absl's list of every flag, its logging flags included.
- JAX's and XLA's start-up noise ("Unable to initialize backend 'tpu'", C++ INFO lines) is
  silenced unless asked for: --verbosity given, or JAX_LOGGING_LEVEL / TF_CPP_MIN_LOG_LEVEL set.
"""

import logging
import os
import re
import sys
import textwrap
from typing import Callable

from absl import app, flags

from jaxserve.cli.dataclass_flags import name_flags

FLAGS = flags.FLAGS

HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort")
# Module -> its heading in --help; other modules' flags are listed under their module's name.
SECTIONS = {"jaxserve.cli.flags": "model and engine flags (EngineConfig)",
            "jaxserve.cli.sampling_flags": "sampling flags (SamplingParams; a flag not given takes "
                                       "the model's generation default, if it has one)",
            "tools.workload_flags": "workload flags",
            "tools.run": "flags shared with jaxserve run"}
EXIT_USAGE = 2
# What absl adds to the help of enum and repeatable flags (the head line says it instead).
_ABSL_HELP_ADDITIONS = r"^<[^>]*>: |;\s*repeat this option to specify a list of values$"


class UserError(Exception):
    """A mistake in what the user asked for (a flag value, a model path, a port in use): its
    message is printed as one line and the command exits with status 2."""


def fail(prog: str, message: object) -> None:
    """Prints `prog: error: message` on one line to stderr (a config field named as its flag)
    and exits with status 2."""
    text = name_flags(" ".join(str(message).split()))
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def quiet_jax_logs() -> None:
    """Silences JAX's backend probing ("Unable to initialize backend 'tpu'", logged at INFO) and
    XLA's C++ INFO lines, unless --verbosity was given or JAX/XLA's own log settings are set."""
    if "verbosity" in FLAGS and FLAGS["verbosity"].present:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # read when XLA first logs
    if "JAX_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("jax").setLevel(logging.WARNING)


def _module_key(module_name: str) -> str:
    return sys.argv[0] if module_name == "__main__" else module_name  # as absl keys it


def _render_flag(flag) -> str:
    if flag.boolean:
        head = f"--[no]{flag.name}"
    elif getattr(flag.parser, "enum_values", None):
        head = f"--{flag.name}={'|'.join(flag.parser.enum_values)}"
    else:
        head = f"--{flag.name}"
    default = flag.default
    if isinstance(default, bool):
        default = str(default).lower()
    elif isinstance(default, list):
        default = ",".join(map(str, default)) or None
    head += "" if default in (None, "") else f" (default: {default})"
    if isinstance(flag, flags.MultiFlag):
        head += " (repeatable)"
    text = re.sub(_ABSL_HELP_ADDITIONS, "", flag.help or "")
    body = textwrap.fill(text, width=96, initial_indent="      ", subsequent_indent="      ")
    return f"  {head}\n{body}"


def help_text(prog: str, main_module: str) -> str:
    """The command's docstring, then its flags: its own first, then each other module's."""
    doc = (sys.modules[main_module].__doc__ or "").strip() if main_module in sys.modules else ""
    by_module = FLAGS.flags_by_module_dict()
    main_key = _module_key(main_module)
    order = [main_key] + [m for m in by_module if m != main_key]
    parts = [f"usage: {prog} [flags]", doc] if doc else [f"usage: {prog} [flags]"]
    for module in order:
        if module not in by_module or module.startswith("absl.") or module == "absl":
            continue
        title = f"{prog} flags" if module == main_key else SECTIONS.get(module, f"{module} flags")
        lines = [_render_flag(f) for f in by_module[module]  # in the order defined
                 if f.help is not None and not f.name.startswith("help")]
        if lines:
            parts.append(f"{title}:\n" + "\n".join(lines))
    parts.append("absl's own flags (logging: --verbosity, --logtostderr, ...): --helpfull")
    return "\n\n".join(parts) + "\n"


def run(main: Callable[[list[str]], int | None], command: str,
        argv: list[str] | None = None) -> None:
    """Runs main(argv) as absl's app.run does, with one-line user errors and the --help above.
    command: the subcommand's name (errors read `jaxserve <command>: error: ...`)."""
    prog = f"jaxserve {command}"
    argv = list(sys.argv if argv is None else argv)

    def parse(args: list[str]) -> list[str]:
        flag_args = args[1:args.index("--")] if "--" in args else args[1:]
        if any(a in HELP_ARGS for a in flag_args):
            sys.stdout.write(help_text(prog, main.__module__))
            sys.exit(0)
        try:
            return FLAGS(args)
        except flags.Error as e:
            fail(prog, e)

    def checked_main(args: list[str]):
        quiet_jax_logs()
        try:
            return main(args)
        except (app.UsageError, UserError) as e:
            fail(prog, e)
        except KeyboardInterrupt:  # Ctrl-C where the command does not handle it: no traceback
            print(file=sys.stderr)
            sys.exit(130)

    app.run(checked_main, argv=argv, flags_parser=parse)
