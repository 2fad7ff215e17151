"""Checkpoint loading: sharded safetensors, Orbax round trip, conversion tool, dtypes."""

import importlib
import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxserve.model_io.checkpoint import ORBAX_SUBDIR, load_model, save_orbax
from tests.conftest import build_engine, fixture_path, run_to_completion

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT_TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def flat_params(model):
    """{'layers.0.attn.q_proj.kernel': np.ndarray, ...} of a model's parameters."""
    return {".".join(map(str, path)): np.asarray(var.get_value() if hasattr(var, "get_value")
                                                 else var.value)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def llama3_f32():
    return flat_params(load_model(fixture_path("llama3"), "float32", progress=False))


def folder_with_config(path, source="llama3"):
    """A model folder holding only the fixture's config files."""
    os.makedirs(path, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(fixture_path(source), name), path)
    return str(path)


def test_loaded_params_are_the_checkpoint_tensors(llama3_f32):
    tensors = load_file(os.path.join(fixture_path("llama3"), "model.safetensors"))
    q = tensors["model.layers.1.self_attn.q_proj.weight"]  # HF: [out, in]
    ours = [v for k, v in llama3_f32.items() if "layers.1." in k and "q_proj" in k]
    assert len(ours) == 1
    np.testing.assert_array_equal(ours[0], q.T)  # ours: [in, out]
    embed = [v for k, v in llama3_f32.items() if "embed" in k]
    assert len(embed) == 1
    np.testing.assert_array_equal(embed[0], tensors["model.embed_tokens.weight"])


def test_sharded_checkpoint_equals_the_single_file(llama3_f32):
    with open(os.path.join(fixture_path("llama3_sharded"), "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # really sharded
    sharded = flat_params(load_model(fixture_path("llama3_sharded"), "float32", progress=False))
    assert_same_params(sharded, llama3_f32)


def test_orbax_round_trip(tmp_path, llama3_f32):
    model = load_model(fixture_path("llama3"), "float32", progress=False)
    folder = folder_with_config(tmp_path / "converted")
    save_orbax(model, os.path.join(folder, ORBAX_SUBDIR))
    assert not [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    restored = flat_params(load_model(folder, "float32", progress=False))
    assert_same_params(restored, llama3_f32)

    # And an engine over the converted folder generates the golden greedy tokens.
    with open(os.path.join(fixture_path("llama3"), "golden.json")) as f:
        golden = json.load(f)
    from jaxserve import Engine, EngineConfig, SamplingParams
    engine = Engine(folder, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                         max_model_len=256, block_size=8, dtype="float32"),
                    precompile=False, progress=False, skip_tokenizer=True)
    rid = engine.add_request(golden["prompts"][2],
                             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert run_to_completion(engine)[rid].outputs[0].token_ids == golden["greedy_tokens"][2]


def test_orbax_f32_checkpoint_loads_as_bf16(tmp_path, llama3_f32):
    model = load_model(fixture_path("llama3"), "float32", progress=False)
    folder = folder_with_config(tmp_path / "converted")
    save_orbax(model, os.path.join(folder, ORBAX_SUBDIR))
    restored = flat_params(load_model(folder, "bfloat16", progress=False))
    expected = {k: v.astype(jnp.bfloat16) for k, v in llama3_f32.items()}
    assert_same_params(restored, expected)


@pytest.mark.skipif(not os.path.isfile(CONVERT_TOOL), reason="no tools/convert_checkpoint.py")
def test_convert_checkpoint_tool(tmp_path, llama3_f32):
    tool = importlib.import_module("tools.convert_checkpoint")
    dst = str(tmp_path / "converted")
    tool.convert(fixture_path("llama3"), dst, "float32")
    assert os.path.isdir(os.path.join(dst, ORBAX_SUBDIR))
    assert {"config.json", "generation_config.json"} <= set(os.listdir(dst))
    assert not [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    assert_same_params(flat_params(load_model(dst, "float32", progress=False)), llama3_f32)

    dst_bf16 = str(tmp_path / "converted_bf16")
    tool.convert(fixture_path("llama3_sharded"), dst_bf16, "bfloat16")
    expected = {k: v.astype(jnp.bfloat16) for k, v in llama3_f32.items()}
    assert_same_params(flat_params(load_model(dst_bf16, "bfloat16", progress=False)), expected)

    with pytest.raises(FileExistsError, match="converted"):
        tool.convert(fixture_path("llama3"), dst, "float32")


def test_bf16_loading_gives_bf16_params(llama3_f32):
    params = flat_params(load_model(fixture_path("llama3"), "bfloat16", progress=False))
    assert params.keys() == llama3_f32.keys()
    for name, value in params.items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(value, llama3_f32[name].astype(jnp.bfloat16), err_msg=name)


def test_bf16_engine_runs():
    engine = build_engine("llama3", dtype="bfloat16")
    assert all(c.dtype == jnp.bfloat16 for pair in engine.runner.kv_caches for c in pair)
    from jaxserve import SamplingParams
    rid = engine.add_request([1, 5, 9], SamplingParams(temperature=0.0, max_tokens=4,
                                                       ignore_eos=True))
    out = run_to_completion(engine)[rid].outputs[0]
    assert len(out.token_ids) == 4 and all(0 <= t < 256 for t in out.token_ids)


def test_inv_freq_and_unknown_tensors_are_skipped(tmp_path, llama3_f32, caplog):
    folder = folder_with_config(tmp_path / "extra")
    tensors = load_file(os.path.join(fixture_path("llama3"), "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["model.something_else.weight"] = np.ones(3, np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="jaxserve.model_io.checkpoint"):
        params = flat_params(load_model(folder, "float32", progress=False))
    assert_same_params(params, llama3_f32)
    assert "model.something_else.weight" in caplog.text
    assert "inv_freq" not in caplog.text
