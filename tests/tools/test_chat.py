"""The terminal chat (tools/chat.py): turns, /reset, /exit, end of input and Ctrl-C, over the
built-in model with a chat template; and `python -m tools.chat` end to end."""

import io
import os
import signal
import subprocess
import sys

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.default_model import BUILTIN_MODEL
from tests.jaxserve.test_llm_chat import ENGINE_LIMITS, builtin_with_chat_template
from tools.chat import chat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
CLI_LIMITS = [f"--{k}={v}" for k, v in ENGINE_LIMITS.items()]


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory) -> str:
    return builtin_with_chat_template(str(tmp_path_factory.mktemp("templated")))


def scripted(lines):
    """A read_line that answers with `lines`, then end of input."""
    lines = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    return read_line


def test_turns_reset_and_end_of_input(templated_model):
    llm = LLM(templated_model, precompile=False, progress=False, **ENGINE_LIMITS)
    out = io.StringIO()
    messages = chat(llm, GREEDY, "Be brief.", scripted(["hi", "  ", "/reset", "one", "two"]), out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "two"]
    # Each reply is what LLM.chat gives for the conversation up to it.
    (first,) = llm.chat(messages[:2], GREEDY, use_tqdm=False)
    (second,) = llm.chat(messages[:4], GREEDY, use_tqdm=False)
    assert messages[2]["content"] == first.outputs[0].text
    assert messages[4]["content"] == second.outputs[0].text
    assert out.getvalue().endswith(f"{first.outputs[0].text}\n{second.outputs[0].text}\n\n")
    assert chat(llm, GREEDY, None, scripted(["/exit", "never read"]), io.StringIO()) == []


def test_a_refused_turn_is_reported_and_dropped(templated_model):
    llm = LLM(templated_model, precompile=False, progress=False, **ENGINE_LIMITS)
    out = io.StringIO()
    messages = chat(llm, GREEDY, None, scripted(["x" * 300, "short"]), out)
    assert "[refused: prompt has " in out.getvalue()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["short"]


def _cli(model: str, *flags: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tools.chat", f"--model={model}",
                             "--temperature=0", "--max_tokens=3", *CLI_LIMITS, *flags], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_cli_chats_and_ends_on_exit_and_on_ctrl_c(templated_model):
    process = _cli(templated_model)
    stdout, stderr = process.communicate("hello\n/exit\n", timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.startswith(f"chatting with {templated_model}") and stdout.count("> ") == 2

    process = _cli(templated_model)
    try:
        assert process.stdout.readline().startswith("chatting with")  # now waiting for a line
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr


def test_cli_refuses_a_model_without_a_chat_template():
    process = _cli(BUILTIN_MODEL)
    _, stderr = process.communicate("", timeout=120)
    assert process.returncode != 0 and "this model has no chat template" in stderr
