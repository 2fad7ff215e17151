"""Bad input is refused where it enters, with a message naming the field, and never disturbs
requests that are already running. Bad model folders fail to load with a clear error."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve import LLM, Engine, EngineConfig, SamplingParams
from tests.conftest import fixture_path, run_to_completion

with open(os.path.join(fixture_path("llama3"), "golden.json")) as f:
    GOLDEN = json.load(f)
LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
              dtype="float32")
GOOD_PROMPT = GOLDEN["prompts"][2]
GOOD_TOKENS = GOLDEN["greedy_tokens"][2]


def greedy(**kw):
    kw.setdefault("max_tokens", len(GOOD_TOKENS))
    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine():
    return Engine(fixture_path("llama3"), EngineConfig(**LIMITS), precompile=False,
                  progress=False, skip_tokenizer=True)


# (id, prompt, a function making the params, a regex the message must match)
BAD_REQUESTS = [
    ("empty-text", "", greedy, r"prompt is empty"),
    ("empty-ids", [], greedy, r"prompt is empty"),
    ("text-without-tokenizer", "hello", greedy, r"prompt.*tokenizer"),
    ("prompt-at-max-model-len", [1] * 256, greedy, r"max_model_len"),
    ("prompt-over-max-model-len", [1] * 1000, greedy, r"max_model_len"),
    ("id-over-vocab", [1, 5, 256], greedy, r"prompt_token_ids.*256"),
    ("negative-id", [1, -1, 5], greedy, r"prompt_token_ids.*-1"),
    ("float-id", [1, 2.5], greedy, r"prompt_token_ids"),
    ("bool-id", [1, True], greedy, r"prompt_token_ids"),
    ("negative-temperature", [1, 5], lambda: SamplingParams(temperature=-0.5), r"temperature"),
    ("nan-temperature", [1, 5], lambda: SamplingParams(temperature=math.nan), r"temperature"),
    ("inf-temperature", [1, 5], lambda: SamplingParams(temperature=math.inf), r"temperature"),
    ("top-p-0", [1, 5], lambda: SamplingParams(top_p=0.0), r"top_p"),
    ("top-p-1.5", [1, 5], lambda: SamplingParams(top_p=1.5), r"top_p"),
    ("nan-top-p", [1, 5], lambda: SamplingParams(top_p=math.nan), r"top_p"),
    ("negative-top-k", [1, 5], lambda: SamplingParams(top_k=-3), r"top_k"),
    ("min-p-2", [1, 5], lambda: SamplingParams(min_p=2.0), r"min_p"),
    ("negative-max-tokens", [1, 5], lambda: SamplingParams(max_tokens=-1), r"max_tokens"),
    ("zero-max-tokens", [1, 5], lambda: SamplingParams(max_tokens=0), r"max_tokens"),
    ("min-over-max-tokens", [1, 5], lambda: SamplingParams(max_tokens=4, min_tokens=5),
     r"min_tokens"),
    ("negative-min-tokens", [1, 5], lambda: SamplingParams(min_tokens=-1), r"min_tokens"),
    ("logprobs-over-max", [1, 5], lambda: greedy(logprobs=21), r"logprobs.*max_logprobs"),
    ("negative-logprobs", [1, 5], lambda: SamplingParams(logprobs=-1), r"logprobs"),
    ("n-over-max-num-seqs", [1, 5], lambda: greedy(n=9), r"SamplingParams\.n .*max_num_seqs"),
    ("n-zero", [1, 5], lambda: SamplingParams(n=0), r"SamplingParams\.n "),
    ("repetition-penalty-0", [1, 5], lambda: SamplingParams(repetition_penalty=0.0),
     r"repetition_penalty"),
    ("presence-penalty-3", [1, 5], lambda: SamplingParams(presence_penalty=3.0),
     r"presence_penalty"),
    ("negative-seed", [1, 5], lambda: SamplingParams(seed=-1), r"seed"),
    ("stop-token-over-vocab", [1, 5], lambda: greedy(stop_token_ids=[300]), r"stop_token_ids"),
    ("negative-stop-token", [1, 5], lambda: greedy(stop_token_ids=[-2]), r"stop_token_ids"),
    ("too-many-stop-tokens", [1, 5], lambda: greedy(stop_token_ids=list(range(3, 20))),
     r"stop_token_ids"),
    ("stop-string-without-tokenizer", [1, 5], lambda: greedy(stop=["x"]), r"stop"),
    ("empty-stop-string", [1, 5], lambda: SamplingParams(stop=[""]), r"stop"),
]


@pytest.mark.parametrize("prompt, make_params, message", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_a_running_request_is_unharmed(engine, prompt, make_params,
                                                                  message):
    good = engine.add_request(GOOD_PROMPT, greedy())
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, make_params())
    outs = run_to_completion(engine)
    assert list(outs) == [good]
    assert outs[good].outputs[0].token_ids == GOOD_TOKENS
    assert outs[good].outputs[0].finish_reason == "length"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_duplicate_request_id_is_refused(engine):
    engine.add_request(GOOD_PROMPT, greedy(), request_id="same")
    engine.step()
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request([1, 2, 3], greedy(), request_id="same")
    outs = run_to_completion(engine)
    assert outs["same"].outputs[0].token_ids == GOOD_TOKENS
    assert outs["same"].prompt_token_ids == GOOD_PROMPT


def test_the_longest_allowed_prompt_is_served(engine):
    prompt = [5] * 255  # max_model_len - 1: room for exactly one token
    rid = engine.add_request(prompt, greedy(max_tokens=10))
    out = run_to_completion(engine)[rid].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_generate_with_one_bad_prompt_leaves_nothing_behind():
    llm = LLM(fixture_path("llama3"), precompile=False, progress=False, skip_tokenizer=True,
              **LIMITS)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([GOOD_PROMPT, [1, 999]], greedy(), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([GOOD_PROMPT, [1, 2]], [greedy()], use_tqdm=False)
    (out,) = llm.generate([GOOD_PROMPT], greedy(), use_tqdm=False)
    assert out.outputs[0].token_ids == GOOD_TOKENS
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(fixture_path("llama3"), max_num_seq=4)


@pytest.mark.parametrize("overrides, message", [
    (dict(block_size=12), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=128, max_num_batched_tokens=64), "max_num_seqs"),
    (dict(dtype="float16"), "dtype"),
    (dict(kv_cache_memory_fraction=1.5), "kv_cache_memory_fraction"),
    (dict(max_model_len=4096), "max_model_len"),  # the model's context is 512
    (dict(num_kv_blocks=4), "num_kv_blocks"),  # 4 x 8 tokens < max_model_len 256
    (dict(enable_chunked_prefill=False), "max_num_batched_tokens"),  # 64 < 256
])
def test_bad_engine_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Engine(fixture_path("llama3"), EngineConfig(**dict(LIMITS, **overrides)),
               precompile=False, progress=False, skip_tokenizer=True)


# ----- bad model folders -----------------------------------------------------------------------

def copy_fixture(tmp_path, name="llama3"):
    path = tmp_path / name
    shutil.copytree(fixture_path(name), path)
    return path


def load(path):
    return Engine(str(path), EngineConfig(**LIMITS), precompile=False, progress=False,
                  skip_tokenizer=True)


def edit_config(path, **changes):
    with open(path / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


def test_a_good_copy_loads(tmp_path):
    """The copies below fail only because of what each test breaks."""
    engine = load(copy_fixture(tmp_path))
    rid = engine.add_request(GOOD_PROMPT, greedy())
    assert run_to_completion(engine)[rid].outputs[0].token_ids == GOOD_TOKENS


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load(tmp_path / "nowhere")


def test_missing_config_json(tmp_path):
    path = copy_fixture(tmp_path)
    os.remove(path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(path)


def test_config_json_that_is_not_json(tmp_path):
    path = copy_fixture(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load(path)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), r"model_type 'gpt2'"),
    (dict(model_type=None), r"model_type"),
    (dict(hidden_act="gelu"), r"hidden_act"),
    (dict(num_key_value_heads=3), r"num_key_value_heads"),
    (dict(vocab_size=0), r"vocab_size"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"rope"),
])
def test_bad_config_json(tmp_path, changes, message):
    path = copy_fixture(tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_missing_safetensors(tmp_path):
    path = copy_fixture(tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load(path)


def test_missing_shard_of_a_sharded_checkpoint(tmp_path):
    path = copy_fixture(tmp_path, "llama3_sharded")
    os.remove(path / "model-00004-of-00009.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00004-of-00009.safetensors"):
        load(path)


@pytest.mark.parametrize("keep", [0, 100, 0.5, -4], ids=["empty", "header-cut", "half", "last-bytes"])
def test_truncated_safetensors(tmp_path, keep):
    path = copy_fixture(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    if isinstance(keep, float):
        keep = int(len(data) * keep)
    (path / "model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(path)


def test_tensor_with_the_wrong_shape(tmp_path):
    path = copy_fixture(tmp_path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    out_dim, in_dim = tensors[name].shape
    tensors[name] = np.zeros((out_dim, in_dim + 1), np.float32)
    save_file(tensors, path / "model.safetensors")
    # The shapes are reported as the file holds them ([out, in]), not transposed.
    with pytest.raises(ValueError, match=rf"{name}.*shape \({out_dim}, {in_dim + 1}\), "
                                         rf"expected \({out_dim}, {in_dim}\)"):
        load(path)


def test_vocab_size_that_disagrees_with_the_weights(tmp_path):
    path = copy_fixture(tmp_path)
    edit_config(path, vocab_size=300)
    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head).*shape \(256, 64\), "
                                         r"expected \(300, 64\)"):
        load(path)


def test_missing_tensor(tmp_path):
    path = copy_fixture(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks.*layers\.0\.mlp\.down_proj"):
        load(path)
