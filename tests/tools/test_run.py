"""The CLI runner (python -m tools.run, in a subprocess: its flags are process-global) on the
built-in model: the untrained notice, and sampling flags not given taking the model's
generation_config defaults."""

import json
import os
import shutil
import subprocess
import sys

from jaxserve.model_io.default_model import BUILTIN_MODEL, UNTRAINED_NOTICE, builtin_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = ["--max_num_seqs=4", "--max_num_batched_tokens=64", "--max_model_len=128",
          "--block_size=8", "--dtype=float32"]


def run_cli(*flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "tools.run", *LIMITS, *flags], cwd=REPO,
                            env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_builtin_model_prints_the_untrained_notice():
    out = run_cli(f"--model={BUILTIN_MODEL}", "--prompt=Hello", "--max_tokens=2")
    assert UNTRAINED_NOTICE in out
    assert "[sample 0, 2 tokens," in out


def test_sampling_flags_not_given_take_the_model_defaults(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(builtin_model_dir(), folder)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"max_new_tokens": 3, "temperature": 0.0}, f)
    given, unset = tmp_path / "given.json", tmp_path / "unset.json"
    run_cli(f"--model={folder}", "--prompt=Hello", "--ignore_eos", f"--json_out={unset}")
    run_cli(f"--model={folder}", "--prompt=Hello", "--ignore_eos", "--max_tokens=5",
            f"--json_out={given}")
    tokens = [json.loads(p.read_text())["outputs"][0]["samples"][0]["token_ids"]
              for p in (unset, given)]
    assert len(tokens[0]) == 3  # generation_config's max_new_tokens, not the flag's 32
    assert tokens[1][:3] == tokens[0] and len(tokens[1]) == 5  # greedy both times
