"""Sharded loading: every device reads only its own slices of each checkpoint tensor (the
HF -> ours transposes applied to the slices), and the result equals whole-tensor loading."""

import os
import shutil

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

import jaxserve.model_io.checkpoint as checkpoint
from jaxserve.model_io.checkpoint import ORBAX_SUBDIR, load_model, save_orbax
from sharding.mesh import MeshShape, make_mesh
from tests.conftest import fixture_path
from tests.sharding.conftest import need_devices


def flat(model) -> dict[tuple, object]:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_values(sharded, whole):
    assert sharded.keys() == whole.keys()
    for path in whole:
        np.testing.assert_array_equal(np.asarray(sharded[path]), np.asarray(whole[path]),
                                      err_msg=str(path))


class CountingReads:
    """Wraps safe_open: records the size of every slice read; whole-tensor reads fail."""

    def __init__(self, monkeypatch):
        self.reads: list[tuple[str, tuple]] = []
        real = checkpoint.safe_open
        counter = self

        class Slice:
            def __init__(self, inner, name):
                self.inner, self.name = inner, name

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, index):
                part = self.inner[index]
                counter.reads.append((self.name, part.shape))
                return part

        class Handle:
            def __init__(self, *args, **kwargs):
                self.inner = real(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return Slice(self.inner.get_slice(name), name)

            def get_tensor(self, name):
                raise AssertionError(f"whole-tensor read of {name}")

        monkeypatch.setattr(checkpoint, "safe_open", Handle)

    @property
    def elements(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.reads)


@pytest.mark.parametrize("fixture,shape", [
    ("llama3", MeshShape(tensor=4, data=2)),  # KV heads replicated, q heads split
    ("llama3_sharded", MeshShape(tensor=2)),  # a checkpoint of 9 files
    ("mixtral", MeshShape(expert=2, tensor=2)),  # per-expert tensors stacked, then split
    ("qwen2", MeshShape(tensor=4)),  # tied embeddings, QKV biases
])
def test_each_shard_is_read_once_and_alone(fixture, shape, monkeypatch):
    need_devices(shape.num_devices)
    whole = flat(load_model(fixture_path(fixture), "float32", progress=False))
    counter = CountingReads(monkeypatch)
    model = load_model(fixture_path(fixture), "float32", mesh=make_mesh(shape), progress=False)
    sharded = flat(model)
    assert_same_values(sharded, whole)
    # Every parameter element is read exactly once, whatever the number of devices holding it:
    # replicated shards are read once and copied, split ones read slice by slice.
    assert counter.elements == sum(v.size for v in whole.values())
    # No read is larger than the shard it fills.
    shard_sizes = {}
    for path, array in sharded.items():
        shard_sizes[path] = array.addressable_shards[0].data.size
    largest_shard = max(shard_sizes.values())
    assert max(int(np.prod(s)) for _, s in counter.reads) <= largest_shard
    q = [s for name, s in counter.reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert q == [(64 // shape.tensor, 64)] * shape.tensor  # [out, in] rows of the file


def test_fused_expert_tensors_load_sliced(tmp_path):
    """The newer HF layout (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]) read
    per shard gives the same stacked weights as the per-expert layout."""
    need_devices(4)
    folder = tmp_path / "fused"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(fixture_path("mixtral"), name), folder)
    tensors = load_file(os.path.join(fixture_path("mixtral"), "model.safetensors"))
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        expert = lambda e, w: tensors[f"{prefix}.{e}.{w}.weight"]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([expert(e, "w1"), expert(e, "w3")]) for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack(
            [expert(e, "w2") for e in range(4)])
    save_file(fused, str(folder / "model.safetensors"))
    whole = flat(load_model(fixture_path("mixtral"), "float32", progress=False))
    mesh = make_mesh(MeshShape(expert=2, tensor=2))
    assert_same_values(flat(load_model(str(folder), "float32", mesh=mesh, progress=False)), whole)


def test_orbax_restores_each_device_its_shards(tmp_path):
    need_devices(4)
    model = load_model(fixture_path("llama3"), "float32", progress=False)
    folder = tmp_path / "converted"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(fixture_path("llama3"), name), folder)
    save_orbax(model, str(folder / ORBAX_SUBDIR))
    mesh = make_mesh(MeshShape(tensor=2, data=2))
    restored = flat(load_model(str(folder), "float32", mesh=mesh, progress=False))
    assert_same_values(restored, flat(model))
    embedding = restored[("embed_tokens", "embedding")]
    assert embedding.sharding.spec == PartitionSpec("tensor", None)
    assert embedding.sharding.mesh == mesh


def test_a_mesh_of_one_device_is_the_same_path():
    model = load_model(fixture_path("mixtral"), "float32",
                       mesh=make_mesh(MeshShape()), progress=False)
    assert_same_values(flat(model), flat(load_model(fixture_path("mixtral"), "float32",
                                                    progress=False)))
