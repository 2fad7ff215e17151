"""The device mesh: four named axes and the checks that a model fits them.

    data      splits the tokens of each step (batch parallelism); weights and KV cache replicated
    sequence  splits the tokens too, and runs ring attention for long whole-prompt prefills
    expert    splits the experts of a mixture-of-experts model
    tensor    splits attention heads, MLP columns/rows, vocabulary and KV heads (Megatron)

The device array is laid out data-major and tensor-minor, so the axis with the most traffic (two
all-reduces per layer) runs over neighbouring devices (one host, one NVLink island) and the data
axis, which needs almost none, is the one that spans hosts.

Axis types are Auto on purpose: the step is compiled with explicit in/out shardings for weights,
caches and inputs, GSPMD propagates them through the matmuls, and the parts where the layout is
not a plain matmul (attention over the paged cache, expert dispatch, ring attention) run under
`shard_map` with their collectives written out. With Explicit axes (jax.make_mesh's default in
0.11) every op would have to type-check its sharding: a row-parallel matmul would need an
out_sharding at each call site inside Flax's Linear, for no gain here.

This package never imports `jaxserve`: callers pass plain numbers.
"""

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "sequence", "expert", "tensor")  # major to minor in the device array
# The tokens of a step (dimension 0 of every activation) are split over these axes.
TOKEN_AXES = ("data", "sequence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
    """Devices per mesh axis; their product is the number of devices the engine uses."""

    data: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1

    def __post_init__(self):
        for axis in AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{axis}_parallel must be a positive integer, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.data * self.tensor * self.sequence * self.expert

    @property
    def num_token_shards(self) -> int:
        return self.data * self.sequence

    @classmethod
    def of(cls, config) -> "MeshShape":
        """From anything with tensor_parallel, sequence_parallel, expert_parallel, data_parallel."""
        return cls(data=config.data_parallel, tensor=config.tensor_parallel,
                   sequence=config.sequence_parallel, expert=config.expert_parallel)

    def describe(self) -> str:
        return " x ".join(f"{axis} {getattr(self, axis)}" for axis in AXES)


def validate(shape: MeshShape, *, num_devices: int, num_q_heads: int, num_kv_heads: int,
             vocab_size: int, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
    """Raises ValueError, naming the numbers, when the model cannot be split over `shape`.

    KV heads need not divide: with fewer KV heads than tensor devices, or a count that does not
    divide, the KV cache and the K/V projections are replicated over `tensor` instead. Nor need
    the vocabulary, when the hidden size divides (the embedding is then split over hidden).
    """
    if shape.num_devices > num_devices:
        raise ValueError(
            f"parallelism {shape.describe()} needs {shape.num_devices} devices; "
            f"{num_devices} are available")
    tp = shape.tensor
    for what, count in (("num_attention_heads", num_q_heads),
                        ("intermediate_size", intermediate_size)):
        if count % tp:
            raise ValueError(f"tensor_parallel ({tp}) must divide the model's {what} ({count})")
    if vocab_size % tp and hidden_size % tp:
        raise ValueError(f"tensor_parallel ({tp}) must divide the model's vocab_size "
                         f"({vocab_size}) or its hidden_size ({hidden_size})")
    if shape.expert > 1 and not num_experts:
        raise ValueError(f"expert_parallel ({shape.expert}) needs a mixture-of-experts model; "
                         "this one has no experts")
    if num_experts and num_experts % shape.expert:
        raise ValueError(f"expert_parallel ({shape.expert}) must divide the model's number of "
                         f"experts ({num_experts})")


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    """A mesh over the first shape.num_devices devices (all processes'), axes Auto."""
    devices = list(jax.devices() if devices is None else devices)
    if shape.num_devices > len(devices):
        raise ValueError(f"parallelism {shape.describe()} needs {shape.num_devices} devices; "
                         f"{len(devices)} are available")
    sizes = tuple(getattr(shape, axis) for axis in AXES)
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices[:shape.num_devices])


def axis_size(mesh: Mesh, axes) -> int:
    """Devices along one axis name or a tuple of them."""
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, mesh: Mesh | None, spec: PartitionSpec) -> jax.Array:
    """with_sharding_constraint when there is a mesh; the identity on the mesh-less path."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def token_spec(*rest) -> PartitionSpec:
    """The spec of an activation whose dimension 0 is tokens: PartitionSpec(TOKEN_AXES, *rest)."""
    return PartitionSpec(TOKEN_AXES, *rest)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
