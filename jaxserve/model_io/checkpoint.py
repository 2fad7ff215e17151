"""Weights in and out: Hugging Face safetensors (one file or sharded with an index) and GGUF files
straight into device arrays of the chosen dtype, and Orbax save/restore of converted weights.
No pickle, ever.

A model folder holds config.json, the weights (*.safetensors, or an `orbax/` checkpoint written
by `tools/convert_checkpoint.py`) and, usually, tokenizer.json. A GGUF file holds all of it
(jaxserve/model_io/gguf_checkpoint.py presents its tensors the way a safetensors file does, so both are
read and sharded by the same code).
"""

import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from tqdm.auto import tqdm

from jaxserve.model_io import gguf_checkpoint
from jaxserve.config import ModelConfig
from jaxserve.models import MODEL_CLASSES
from jaxserve.models.llama import hf_weight_names
from sharding.partition_rules import param_rules, spec_for
from sharding.placement import put_sharded

logger = logging.getLogger(__name__)

ORBAX_SUBDIR = "orbax"
# Tensors a checkpoint may carry that the model recomputes instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Where each parameter goes: None puts it whole on the default device; a function of the
# parameter's path returning a Sharding builds it shard by shard (sharding.partition_rules).
ShardingFn = Callable[[tuple], jax.sharding.Sharding] | None


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """One of our parameters as the checkpoint stores it: its shape in our layout and a reader of
    any slice of it (index in our layout -> np.ndarray), so a device's shard is read alone."""

    shape: tuple[int, ...]
    read: Callable[[tuple[slice, ...]], np.ndarray]


def abstract_model(config: ModelConfig, dtype) -> nnx.Module:
    """The model with shapes but no values (nothing allocated)."""
    cls = MODEL_CLASSES[config.model_type]
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def _variable_at(model: nnx.Module, path: tuple) -> nnx.Variable:
    obj = model
    for key in path:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return obj


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model: no *.safetensors files in {model_dir!r}")
    paths = [os.path.join(model_dir, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: {path!r} is listed in the index but missing")
    return paths


def _expert_weight(name: str, config: ModelConfig):
    """Mixtral expert tensors -> (path, expert index or None, transpose) of our stacked params."""
    parts = name.split(".")
    if ".block_sparse_moe." not in name and ".mlp.experts." not in name and ".mlp.gate." not in name:
        return None
    layer = int(parts[2])
    ours = ("layers", layer, "mlp")
    if parts[-2] == "gate" and parts[-3] in ("block_sparse_moe", "mlp"):
        return ours + ("router", "kernel"), None, True
    if "experts" in parts:
        tail = parts[parts.index("experts") + 1:]
        if tail[0].isdigit():  # experts.{e}.w1.weight: one expert, [out, in]
            which = {"w1": "w_gate", "w3": "w_up", "w2": "w_down",
                     "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}[tail[1]]
            return ours + (which,), int(tail[0]), True
        # Fused form: experts.gate_up_proj [E, 2F, D] or experts.down_proj [E, D, F].
        return ours + (tail[0],), "fused", False
    return None


def _view(handle, path: str, name: str, want: tuple, perm: tuple[int, ...],
          half: tuple[int, int] | None = None) -> TensorSource:
    """Our parameter (shape `want`) as checkpoint tensor `name` transposed by `perm`
    (ours = file.transpose(perm)); `half` = (file axis, 0 or 1) takes one half of that axis."""
    file_shape = tuple(handle.get_slice(name).get_shape())
    expected = [None] * len(perm)
    for i, a in enumerate(perm):
        expected[a] = want[i]
    if half is not None:
        expected[half[0]] *= 2
    if file_shape != tuple(expected):
        # Report shapes as the checkpoint file lays them out, not as our transposed layout.
        raise ValueError(f"model: tensor {name!r} has shape {file_shape}, expected "
                         f"{tuple(expected)} from the model's config")

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, want))
        file_index = [None] * len(perm)
        for i, a in enumerate(perm):
            file_index[a] = index[i]
        if half is not None:
            axis, which = half
            offset = which * file_shape[axis] // 2
            part = file_index[axis]
            file_index[axis] = slice(part.start + offset, part.stop + offset)
        try:
            part = handle.get_slice(name)[tuple(file_index)]
        except Exception as e:  # the safetensors library raises its own error types
            raise ValueError(f"model: tensor {name!r} in {path!r} could not be read "
                             f"(truncated file?): {e}") from e
        return np.ascontiguousarray(np.asarray(part).transpose(perm))

    return TensorSource(tuple(want), read)


def _stacked(parts: list[TensorSource]) -> TensorSource:
    """Per-expert sources [in, out] as one [E, in, out] source."""
    shape = (len(parts),) + parts[0].shape

    def read(index: tuple[slice, ...]) -> np.ndarray:
        experts = range(*index[0].indices(len(parts)))
        return np.stack([parts[e].read(index[1:]) for e in experts])

    return TensorSource(shape, read)


def _materialize(source: TensorSource, dtype, sharding) -> jax.Array:
    if sharding is None:
        full = tuple(slice(None) for _ in source.shape)
        return jnp.asarray(source.read(full), dtype=dtype)
    return put_sharded(source.shape, dtype, sharding, source.read)


def load_safetensors(model: nnx.Module, model_dir: str, dtype, sharding_for: ShardingFn = None,
                     progress: bool = True) -> None:
    """Fills the abstract model's parameters from the folder's safetensors files.

    Every parameter is read slice by slice (safetensors' get_slice): with `sharding_for`, each
    device's shard is read, converted and placed on its own, so host memory peaks near one shard
    rather than one tensor or the whole model. The Hugging Face -> ours transposes apply to the
    slices (a shard of our [in, out] kernel is the transposed [out, in] slice of the file).
    """
    with contextlib.ExitStack() as stack:
        where: dict[str, tuple] = {}  # tensor name -> (open file, its path)
        for path in safetensors_files(model_dir):
            try:
                handle = stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # the safetensors library raises its own error types
                raise ValueError(f"model: {path!r} is not a readable safetensors file: {e}") from e
            for name in handle.keys():
                where[name] = (handle, path)
        load_tensors(model, where, model_dir, dtype, sharding_for, progress)


def load_gguf(model: nnx.Module, path: str, dtype, sharding_for: ShardingFn = None,
              progress: bool = True) -> None:
    """Fills the abstract model's parameters from a GGUF file, each read, dequantized and placed
    slice by slice as load_safetensors does (jaxserve/model_io/gguf_checkpoint.py)."""
    handle = gguf_checkpoint.GGUFTensors(gguf_checkpoint.open_gguf(path), model.config)
    load_tensors(model, {name: (handle, path) for name in handle.keys()}, path, dtype,
                 sharding_for, progress)


def load_tensors(model: nnx.Module, where: dict[str, tuple], model_dir: str, dtype,
                 sharding_for: ShardingFn = None, progress: bool = True) -> None:
    """Fills the abstract model's parameters from Hugging Face-named tensors: `where` maps each
    name to (a handle with safetensors' get_slice interface, the file it is in)."""
    config: ModelConfig = model.config
    names = hf_weight_names(config)
    sources: dict[tuple, TensorSource] = {}
    experts: dict[tuple, list] = {}
    want = lambda param_path: tuple(_variable_at(model, param_path).shape)
    for name, (handle, path) in where.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in names:
            param_path, transpose = names[name]
            shape = want(param_path)
            sources[param_path] = _view(handle, path, name, shape,
                                        (1, 0) if transpose else tuple(range(len(shape))))
            continue
        expert = _expert_weight(name, config) if config.num_experts else None
        if expert is None:
            logger.warning("model: ignoring unexpected tensor %s", name)
            continue
        param_path, index, transpose = expert
        if index is None:  # the router, [E, D] in the file
            sources[param_path] = _view(handle, path, name, want(param_path), (1, 0))
        elif index == "fused" and param_path[-1] == "gate_up_proj":
            # [E, 2F, D] -> w_gate = first F rows, w_up = the rest, each as [E, D, F].
            for which_half, which in enumerate(("w_gate", "w_up")):
                ours = param_path[:-1] + (which,)
                sources[ours] = _view(handle, path, name, want(ours), (0, 2, 1),
                                      half=(1, which_half))
        elif index == "fused":  # down_proj [E, D, F] -> w_down [E, F, D]
            ours = param_path[:-1] + ("w_down",)
            sources[ours] = _view(handle, path, name, want(ours), (0, 2, 1))
        else:  # experts.{e}.w1.weight: one expert's [out, in]
            experts.setdefault(param_path, [None] * config.num_experts)
            per_expert = want(param_path)[1:]
            experts[param_path][index] = _view(handle, path, name, per_expert,
                                               (1, 0) if transpose else (0, 1))
    for param_path, parts in experts.items():
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            raise ValueError(f"model: experts {missing} of {'.'.join(map(str, param_path))} "
                             "are missing")
        sources[param_path] = _stacked(parts)
    expected = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing = sorted(".".join(map(str, p)) for p in expected - set(sources))
    if missing:
        raise ValueError(f"model: the checkpoint in {model_dir!r} lacks {len(missing)} weights, "
                         f"e.g. {missing[:5]}")
    for param_path, source in tqdm(sorted(sources.items(), key=lambda kv: str(kv[0])),
                                   desc="loading weights", disable=not progress, unit="tensor"):
        sharding = sharding_for(param_path) if sharding_for else None
        _variable_at(model, param_path).set_value(_materialize(source, dtype, sharding))


def save_orbax(model: nnx.Module, path: str) -> None:
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()


def load_orbax(model: nnx.Module, path: str, sharding_for: ShardingFn = None) -> None:
    """Restores converted weights; with `sharding_for`, each device restores only its shards."""
    import orbax.checkpoint as ocp
    state = nnx.state(model, nnx.Param)

    def target(keypath, v):
        path = tuple(k.key for k in keypath)
        return jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=sharding_for(path) if sharding_for else None)

    target = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)


def param_sharding_fn(config: ModelConfig, mesh: Mesh) -> Callable[[tuple], NamedSharding]:
    """Parameter path -> its NamedSharding on `mesh` under the partition rules."""
    rules = param_rules(num_kv_heads=config.num_kv_heads, vocab_size=config.vocab_size,
                        tensor_parallel=mesh.shape["tensor"])
    return lambda path: NamedSharding(mesh, spec_for("/".join(map(str, path)), rules))


def load_model(model_dir: str, dtype="bfloat16", mesh: Mesh | None = None,
               progress: bool = True, random_weights: bool = False) -> nnx.Module:
    """Reads config.json and the weights of a model folder (or a GGUF file) into a ready model.

    mesh: place every parameter sharded on it by the partition rules, each device reading only
      its own slices; None puts the whole model on the default device.
    random_weights: skip the weights and initialize randomly (seeded) on the device instead
      on the mesh's first device (then placed on the mesh, if any, as a whole).
    """
    config = ModelConfig.from_dir(model_dir)
    dtype = jnp.dtype(dtype)
    sharding_for = param_sharding_fn(config, mesh) if mesh is not None else None
    if random_weights:
        # Built on the mesh's first device (another engine may have filled the default one).
        device = mesh.devices.flat[0] if mesh is not None else None
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            model = MODEL_CLASSES[config.model_type](config, dtype=dtype, rngs=nnx.Rngs(0))
        if sharding_for:
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                var.set_value(jax.device_put(var.get_value(), sharding_for(path)))
        return model
    model = abstract_model(config, dtype)
    orbax_dir = os.path.join(model_dir, ORBAX_SUBDIR)
    if gguf_checkpoint.is_gguf(model_dir):
        load_gguf(model, model_dir, dtype, sharding_for, progress)
    elif os.path.isdir(orbax_dir):
        load_orbax(model, orbax_dir, sharding_for)
    else:
        load_safetensors(model, model_dir, dtype, sharding_for, progress)
    return model
