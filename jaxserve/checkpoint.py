"""Weights in and out: Hugging Face safetensors (one file or sharded with an index) straight into
device arrays of the chosen dtype, and Orbax save/restore of converted weights. No pickle, ever.

A model folder holds config.json, the weights (*.safetensors, or an `orbax/` checkpoint written
by `tools/convert_checkpoint.py`) and, usually, tokenizer.json.
"""

import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from jaxserve.config import ModelConfig
from jaxserve.models import MODEL_CLASSES
from jaxserve.models.llama import hf_weight_names

logger = logging.getLogger(__name__)

ORBAX_SUBDIR = "orbax"
# Tensors a checkpoint may carry that the model recomputes instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Places each loaded array; the default puts it on the default device. Sharded loading passes
# one that slices per device.
PlaceFn = Callable[[tuple, np.ndarray, jnp.dtype], jax.Array]


def _default_place(path: tuple, array: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(array, dtype=dtype)


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


def load_safetensors(model: nnx.Module, model_dir: str, dtype, place: PlaceFn = _default_place,
                     progress: bool = True) -> None:
    """Fills the abstract model's parameters from the folder's safetensors files."""
    config: ModelConfig = model.config
    names = hf_weight_names(config)
    loaded: set[tuple] = set()
    experts: dict[tuple, list] = {}
    files = safetensors_files(model_dir)
    for path in tqdm(files, desc="loading weights", disable=not progress, unit="file"):
        try:
            handle = safe_open(path, framework="numpy")
        except Exception as e:  # the safetensors library raises its own error types
            raise ValueError(f"model: {path!r} is not a readable safetensors file: {e}") from e
        with handle as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                try:
                    array = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"model: tensor {name!r} in {path!r} could not be read "
                                     f"(truncated file?): {e}") from e
                if name in names:
                    param_path, transpose = names[name]
                    _assign(model, param_path, array.T if transpose else array, dtype, place, name,
                            transposed=transpose)
                    loaded.add(param_path)
                    continue
                expert = _expert_weight(name, config) if config.num_experts else None
                if expert is None:
                    logger.warning("model: ignoring unexpected tensor %s", name)
                    continue
                param_path, index, transpose = expert
                if index is None:
                    _assign(model, param_path, array.T, dtype, place, name, transposed=True)
                    loaded.add(param_path)
                else:
                    experts.setdefault(param_path, [None] * config.num_experts)
                    if index == "fused":
                        experts[param_path] = [array]
                    else:
                        experts[param_path][index] = array.T if transpose else array
    for param_path, parts in experts.items():
        if param_path[-1] == "gate_up_proj":  # [E, 2F, D] -> w_gate, w_up [E, D, F]
            gate, up = np.split(parts[0], 2, axis=1)
            for which, arr in (("w_gate", gate), ("w_up", up)):
                _assign(model, param_path[:-1] + (which,), arr.transpose(0, 2, 1), dtype, place, which)
                loaded.add(param_path[:-1] + (which,))
            continue
        if param_path[-1] == "down_proj":  # fused [E, D, F] -> w_down [E, F, D]
            _assign(model, param_path[:-1] + ("w_down",), parts[0].transpose(0, 2, 1), dtype, place, "down_proj")
            loaded.add(param_path[:-1] + ("w_down",))
            continue
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            raise ValueError(f"model: experts {missing} of {'.'.join(map(str, param_path))} are missing")
        _assign(model, param_path, np.stack(parts), dtype, place, ".".join(map(str, param_path)))
        loaded.add(param_path)
    expected = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing = sorted(".".join(map(str, p)) for p in expected - loaded)
    if missing:
        raise ValueError(f"model: the checkpoint in {model_dir!r} lacks {len(missing)} weights, "
                         f"e.g. {missing[:5]}")


def _assign(model, param_path, array, dtype, place, name, transposed=False):
    var = _variable_at(model, param_path)
    if tuple(var.shape) != tuple(array.shape):
        # Report shapes as the checkpoint file lays them out, not as our transposed layout.
        got, want = tuple(array.shape), tuple(var.shape)
        if transposed:
            got, want = got[::-1], want[::-1]
        raise ValueError(f"model: tensor {name!r} has shape {got}, expected {want} from "
                         "config.json")
    var.set_value(place(param_path, np.ascontiguousarray(array), dtype))


def save_orbax(model: nnx.Module, path: str) -> None:
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()


def load_orbax(model: nnx.Module, path: str) -> None:
    import orbax.checkpoint as ocp
    state = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)


def load_model(model_dir: str, dtype="bfloat16", place: PlaceFn = _default_place,
               progress: bool = True, random_weights: bool = False) -> nnx.Module:
    """Reads config.json and the weights of a model folder into a ready model.

    random_weights: skip the weights and initialize randomly (seeded) on the device instead.
    """
    config = ModelConfig.from_dir(model_dir)
    dtype = jnp.dtype(dtype)
    if random_weights:
        return MODEL_CLASSES[config.model_type](config, dtype=dtype, rngs=nnx.Rngs(0))
    model = abstract_model(config, dtype)
    orbax_dir = os.path.join(model_dir, ORBAX_SUBDIR)
    if os.path.isdir(orbax_dir):
        load_orbax(model, orbax_dir)
    else:
        load_safetensors(model, model_dir, dtype, place, progress)
    return model
