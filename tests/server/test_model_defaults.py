"""SamplingParams fields a gRPC request leaves unset take the model's generation_config
defaults; fields it sets win."""

import json
import os
import shutil

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.model_io.generation_defaults import GenerationDefaults
from server import proto_convert
from server.gen.jaxserve.v1 import jaxserve_pb2 as pb
from tests.conftest import fixture_path
from tests.server.conftest import ENGINE_LIMITS

DEFAULTS = GenerationDefaults(temperature=0.0, top_p=0.9, max_tokens=3)


def test_unset_proto_fields_take_the_model_defaults():
    assert proto_convert.sampling_params_from_proto(pb.SamplingParams(), DEFAULTS) == \
        SamplingParams(temperature=0.0, top_p=0.9, max_tokens=3)
    # Set fields win, a zero included (proto3 optional: present, not defaulted).
    params = pb.SamplingParams(temperature=0.5, max_tokens=7, top_k=0, seed=1)
    assert proto_convert.sampling_params_from_proto(params, DEFAULTS) == \
        SamplingParams(temperature=0.5, top_p=0.9, max_tokens=7, seed=1)
    # No model defaults: SamplingParams' own.
    assert proto_convert.sampling_params_from_proto(pb.SamplingParams()) == SamplingParams()


def test_the_server_reads_the_model_defaults_when_it_loads(make_server, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(fixture_path("llama3"), folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 3}, f)
    server = make_server(lambda: Engine(str(folder), EngineConfig(**ENGINE_LIMITS),
                                        precompile=False, progress=False))
    with open(os.path.join(fixture_path("llama3"), "golden.json")) as f:
        golden = json.load(f)
    prompt = pb.TokenIds(ids=golden["prompts"][1])
    stub = server.stub()
    unset = stub.Complete(pb.GenerateRequest(token_ids=prompt, params=pb.SamplingParams()),
                          timeout=60)
    assert list(unset.samples[0].token_ids) == golden["greedy_tokens"][1][:3]  # greedy, 3
    longer = stub.Complete(pb.GenerateRequest(token_ids=prompt,
                                              params=pb.SamplingParams(max_tokens=5)), timeout=60)
    assert list(longer.samples[0].token_ids) == golden["greedy_tokens"][1][:5]  # still greedy
