"""Converts a Hugging Face checkpoint folder into an Orbax one that jaxserve loads directly.

    python -m tools.convert_checkpoint --model=/ckpt/llama-3-8b --out=/ckpt/llama-3-8b-orbax

The output folder holds config.json (and generation_config.json, tokenizer.json when present)
beside `orbax/`, the converted parameters in the chosen dtype.
"""

import os
import shutil

from absl import app, flags

from jaxserve.model_io.checkpoint import ORBAX_SUBDIR, load_model, save_orbax
from jaxserve.model_io.default_model import resolve_model_path
from jaxserve.cli.flags import FLAGS  # --model and --dtype, defined once for every tool

flags.DEFINE_string("out", None, "Output folder (must not exist yet).", required=True)

_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def convert(model_dir: str, out_dir: str, dtype: str) -> None:
    """model_dir: a Hugging Face checkpoint folder (config.json beside the weights)."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir!r}: convert_checkpoint takes a Hugging Face "
                         "checkpoint folder (config.json and *.safetensors)")
    if os.path.exists(out_dir):
        raise FileExistsError(f"--out {out_dir!r} already exists")
    model = load_model(model_dir, dtype)
    os.makedirs(out_dir)
    for name in _SIDE_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    save_orbax(model, os.path.join(out_dir, ORBAX_SUBDIR))


def main(argv):
    del argv
    try:
        convert(resolve_model_path(FLAGS.model), FLAGS.out, FLAGS.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise app.UsageError(str(e)) from e
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
