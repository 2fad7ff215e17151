"""Chat in the terminal (`jaxserve chat`, or python -m tools.chat): the model's chat template,
replies streamed as they are sampled.

    jaxserve chat                                  # SmolLM2, if its wheel is installed
    jaxserve chat --model=/ckpt/Meta-Llama-3-8B-Instruct --system="Be brief." --temperature=0.7

Each line typed is a user turn; the whole conversation so far is the next prompt (the prefix
cache keeps the earlier turns' KV blocks, so mostly the new turn is prefilled). `/reset` starts
over, `/exit` or end of input (Ctrl-D) ends, and so does Ctrl-C, mid-reply too (the request is
aborted). The engine and sampling flags are those of every jaxserve command (a sampling flag not
given takes the model's generation default); --max_tokens defaults to 512 here, a reply's length.
--system and --precompile are tools/run.py's.
"""

import dataclasses
import sys
from typing import Callable, TextIO

from absl import app

from jaxserve import LLM, SamplingParams
from jaxserve.cli import cli_app
from jaxserve.model_io.default_model import resolve_model_path
from jaxserve.cli.flags import FLAGS, engine_config_from_flags
from jaxserve.model_io.generation_defaults import GenerationDefaults
from jaxserve.cli.sampling_flags import sampling_params_from_flags
import tools.run  # noqa: F401  (--system, --precompile)

COMMANDS = "/reset starts over; /exit, Ctrl-D or Ctrl-C ends"


def chat(llm: LLM, params: SamplingParams, system: str | None = None,
         read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict]:
    """Runs the conversation until /exit or end of input (EOFError from read_line); returns
    its messages. A turn the engine refuses (e.g. past max_model_len) is reported and dropped."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            out.write("\n")
            return messages
        command = line.strip()
        if command in ("/exit", "/quit"):
            return messages
        if command == "/reset":
            messages = list(start)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in llm.chat_stream(messages, params):
                out.write(delta)
                out.flush()
                reply.append(delta)
        except ValueError as e:
            out.write(f"[refused: {e}]\n")
            messages.pop()
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:  # the flags alone, before anything loads
        sampling_params_from_flags()
        engine_config = engine_config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    try:  # a bad checkpoint, a mesh that does not fit, a limit past the model's: named
        params = sampling_params_from_flags(
            GenerationDefaults.from_model(resolve_model_path(FLAGS.model)))
        llm = LLM(FLAGS.model, precompile=FLAGS.precompile, disaggregate=FLAGS.disaggregate,
                  **dataclasses.asdict(engine_config))
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    if llm.tokenizer is None or llm.tokenizer.chat_template.template is None:
        raise app.UsageError(f"{FLAGS.model}: this model has no chat template (tokenizer_config"
                             ".json or GGUF metadata); tools.run generates from plain prompts")
    print(f"chatting with {FLAGS.model} ({COMMANDS})", flush=True)
    try:
        chat(llm, params, FLAGS.system)
    except KeyboardInterrupt:
        print()
    return 0


def cli(argv: list[str] | None = None) -> None:
    """`jaxserve chat`: main() under jaxserve/cli/cli_app.py's flag parsing and error handling."""
    FLAGS.set_default("max_tokens", 512)  # a reply, not SamplingParams' 16 tokens
    cli_app.run(main, "chat", argv)


if __name__ == "__main__":
    cli()
