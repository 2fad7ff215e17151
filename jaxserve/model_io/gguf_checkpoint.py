"""GGUF checkpoints (llama.cpp's single-file format), read through the `gguf` package.

A GGUF file holds the model's configuration and tokenizer as metadata and its weights as tensors,
often quantized. This module turns the metadata into a ModelConfig and presents the tensors under
their Hugging Face names, shapes and layout, dequantized to float32 by `gguf.quants.dequantize`,
so that jaxserve.model_io.checkpoint's loader reads and shards them exactly as it reads safetensors:
`GGUFTensors` answers the same `keys()` / `get_slice(name).get_shape()` / `[index]` calls as a
safetensors file. The tokenizer is built from the metadata in jaxserve/model_io/gguf_tokenizer.py.

Two things llama.cpp's converter (convert_hf_to_gguf.py) changes on the way in are undone here:
* the Q and K rows of llama-architecture models are permuted from Hugging Face's rotate-half
  layout into llama.cpp's interleaved one (qwen2's are not);
* llama3 rope scaling is not metadata but a `rope_freqs` tensor of per-frequency divisors.
Shapes: GGUF lists a tensor's dims innermost first (ne[0] = columns); the reader's arrays are
already numpy-ordered, [rows, cols] = Hugging Face's [out, in] for a linear weight.
"""

import functools
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from jaxserve.config import ModelConfig

GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_Q = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
                          _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.IQ4_NL, _Q.IQ4_XS)
_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_IN_BLOCK = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, folded into ModelConfig.rope_scaling


def is_gguf(path: str) -> bool:
    """A .gguf file, or a folder holding exactly one .gguf file and no config.json."""
    return resolve_gguf(path) is not None


def resolve_gguf(path: str) -> str | None:
    """The GGUF file that `path` names (itself, or the only one in its folder), else None."""
    if os.path.isfile(path):
        return path if path.endswith(GGUF_SUFFIX) else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = [f for f in os.listdir(path) if f.endswith(GGUF_SUFFIX)]
    return os.path.join(path, files[0]) if len(files) == 1 else None


def open_gguf(path: str) -> GGUFReader:
    """The reader of the GGUF file `path` names. Parsing the metadata of a real model takes
    seconds, and the config, tokenizer and weights each need it, so readers are kept per file
    version (path, size, modification time): a rewritten file is read again."""
    file = resolve_gguf(path)
    if file is None:
        raise FileNotFoundError(f"model: {path!r} is not a .gguf file nor a folder with exactly one")
    stat = os.stat(file)
    return _open(os.path.realpath(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(file: str, size: int, mtime_ns: int) -> GGUFReader:
    try:
        return GGUFReader(file)
    except (ValueError, OSError) as e:
        raise ValueError(f"model: {file!r} is not a readable GGUF file: {e}") from e


def metadata(reader: GGUFReader, key: str, default=None):
    """A metadata value as Python (str, int, float, bool or list), or `default` if absent."""
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, float):  # stored as float32: 1e-5 comes back as 9.99999974e-06
        value = float(str(np.float32(value)))
    return value


def model_config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """The ModelConfig of a GGUF model; raises ValueError naming what is not supported."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF: general.architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    key = lambda name, default=None: metadata(reader, f"{arch}.{name}", default)
    if key("expert_count", 0):
        raise ValueError(f"GGUF: {arch}.expert_count = {key('expert_count')}: mixture-of-experts "
                         "GGUF models are not supported")
    for name in ("embedding_length", "feed_forward_length", "block_count", "attention.head_count"):
        if not isinstance(key(name), int) or key(name) <= 0:
            raise ValueError(f"GGUF: {arch}.{name} must be a positive integer, got {key(name)!r}")
    hidden, num_q_heads = key("embedding_length"), key("attention.head_count")
    num_kv_heads = key("attention.head_count_kv") or num_q_heads
    if num_q_heads % num_kv_heads:
        raise ValueError(f"GGUF: {arch}.attention.head_count ({num_q_heads}) must be a multiple "
                         f"of {arch}.attention.head_count_kv ({num_kv_heads})")
    head_dim = key("attention.key_length") or (key("rope.dimension_count") if arch == "llama"
                                               else None) or hidden // num_q_heads
    tensors = {t.name: t for t in reader.tensors}
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if tokens:
        vocab_size = len(tokens)
    elif key("vocab_size"):
        vocab_size = key("vocab_size")
    else:  # the embedding's rows
        vocab_size = int(tensors["token_embd.weight"].shape[-1])
    eos_ids = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):  # llama.cpp stops at each
        token_id = metadata(reader, f"tokenizer.ggml.{name}")
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    return ModelConfig(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=key("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(reader, arch, tensors),
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(eos_ids),
    )


def _rope_scaling(reader: GGUFReader, arch: str, tensors: dict):
    kind = metadata(reader, f"{arch}.rope.scaling.type")
    factor = metadata(reader, f"{arch}.rope.scaling.factor")
    if kind is None and metadata(reader, f"{arch}.rope.scale_linear"):  # older files
        kind, factor = "linear", metadata(reader, f"{arch}.rope.scale_linear")
    if _ROPE_FREQS in tensors:
        if kind not in (None, "none"):
            raise ValueError(f"GGUF: both {_ROPE_FREQS} and {arch}.rope.scaling.type {kind!r}")
        factors = dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        return (("rope_type", "freq_factors"),
                ("freq_factors", tuple(float(f) for f in np.ravel(factors))))
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind != "linear":
        raise ValueError(f"GGUF: {arch}.rope.scaling.type {kind!r} is not supported; "
                         "supported: none, linear (and llama3's rope_freqs tensor)")
    return (("rope_type", "linear"), ("factor", float(factor)))


def hf_tensor_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None if unknown."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _IN_BLOCK:
        return f"model.layers.{parts[1]}.{_IN_BLOCK[parts[2]]}.{parts[3]}"
    return None


class GGUFTensors:
    """The tensors of a GGUF model under Hugging Face names, read like a safetensors file:
    `keys()`, and `get_slice(name)` with `get_shape()` and `[index]` -> float32 numpy array in
    Hugging Face's layout (Q/K rows un-permuted). A slice reads and dequantizes only the rows it
    needs, and only the blocks of columns it needs where its column range falls on block edges."""

    def __init__(self, reader: GGUFReader, config: ModelConfig):
        self._tensors = {}  # HF name -> (ReaderTensor, heads to un-permute over or None)
        permute = config.model_type == "llama"
        for tensor in reader.tensors:
            if tensor.name == _ROPE_FREQS:
                continue
            if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
                raise ValueError(
                    f"GGUF: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not "
                    f"supported; supported: {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}")
            name = hf_tensor_name(tensor.name) or tensor.name  # unknown names pass through
            heads = None
            if permute and ".attn_q." in tensor.name:
                heads = config.num_q_heads
            elif permute and ".attn_k." in tensor.name:
                heads = config.num_kv_heads
            self._tensors[name] = (tensor, heads)

    def keys(self):
        return self._tensors.keys()

    def get_slice(self, name: str) -> "_TensorSlice":
        return _TensorSlice(*self._tensors[name])


class _TensorSlice:
    def __init__(self, tensor, heads: int | None):
        self.tensor, self.heads = tensor, heads
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
        rows = index[0]
        if self.heads is None:
            return self._read(rows, index[1:])
        # llama.cpp's permutation is within each head's rows: read whole heads, undo, cut.
        per_head = self.shape[0] // self.heads
        start, stop = rows.start // per_head * per_head, -(-rows.stop // per_head) * per_head
        part = self._read(slice(start, stop), index[1:])
        heads = part.reshape((stop - start) // per_head, per_head // 2, 2, *part.shape[1:])
        part = heads.swapaxes(1, 2).reshape(part.shape)
        return part[rows.start - start:rows.stop - start]

    def _read(self, rows: slice, rest: tuple[slice, ...]) -> np.ndarray:
        """Rows `rows` (and columns `rest`, for a 2-D tensor) as float32."""
        data, qtype = self.tensor.data, self.tensor.tensor_type
        if not rest:  # 1-D: small, and a quantized one's array is bytes, not elements
            return np.array(dequantize(data, qtype)[rows], dtype=np.float32)
        cols = rest[0]
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if block > 1 and cols.start % block == 0 and cols.stop % block == 0:
            # The columns are whole quantization blocks: dequantize those alone.
            raw = data[rows, cols.start // block * block_bytes:-(-cols.stop // block) * block_bytes]
            return np.array(dequantize(raw, qtype), dtype=np.float32)
        return np.array(dequantize(data[rows], qtype)[:, cols], dtype=np.float32)
