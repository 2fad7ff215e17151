"""Mixture-of-experts dispatch: grouped matmuls over the experts a token was routed to, with the
experts split over the `expert` axis and each expert's hidden columns over `tensor`.

Per device: the token-expert assignments [T * k] are sorted by expert, those of the device's own
experts first and grouped, the rest after them; `lax.ragged_dot` runs one matmul per local expert
over its group (rows past the groups come out zero); the results are unsorted, weighted by the
router and summed per token. One psum over expert x tensor then adds the experts of the other
devices and the other column blocks. No token is ever dropped: the sorted buffer has room for
every assignment, so there is no capacity factor.

Tokens stay where they are (replicated over expert), so there is no all-to-all: each device reads
every token but multiplies only its own experts' rows. That trades the all-to-all's two exchanges
for one all-reduce of [T, D] — the same one the dense MLP pays — and is the right trade while T
is a step's batch (hundreds to a few thousand tokens), not a training batch.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sharding.mesh import TOKEN_AXES


def grouped_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array,
                    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                    first_expert=0) -> jax.Array:
    """SwiGLU experts of the local block [first_expert, first_expert + E_local) on one device.

    x [T, D]; expert_ids [T, k] int (global ids); expert_weights [T, k]; w_gate/w_up
    [E_local, D, F], w_down [E_local, F, D] -> [T, D], the weighted sum over the token's local
    experts (zero contribution from experts elsewhere).
    """
    num_tokens, top_k = expert_ids.shape
    num_local = w_gate.shape[0]
    local = expert_ids.reshape(-1) - first_expert  # [T * k]
    key = jnp.where((local >= 0) & (local < num_local), local, num_local)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    rows = x[order // top_k]  # [T * k, D], grouped by local expert, the others last
    gate = lax.ragged_dot(rows, w_gate, group_sizes)
    up = lax.ragged_dot(rows, w_up, group_sizes)
    out = lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [T * k, D]
    out = jnp.zeros_like(out).at[order].set(out).reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", out, expert_weights.astype(out.dtype))


def routed_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array,
                   w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                   mesh: Mesh | None) -> jax.Array:
    """`grouped_experts` over the whole expert stack; with a mesh, split over expert x tensor
    (tokens over data x sequence) with one psum. Shapes as in `grouped_experts`, E global."""
    if mesh is None:
        return grouped_experts(x, expert_ids, expert_weights, w_gate, w_up, w_down)

    def body(x, ids, weights, w_gate, w_up, w_down):
        first = lax.axis_index("expert") * w_gate.shape[0]
        partial = grouped_experts(x, ids, weights, w_gate, w_up, w_down, first_expert=first)
        return lax.psum(partial, ("expert", "tensor"))

    tokens = P(TOKEN_AXES, None)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(tokens, tokens, tokens, P("expert", None, "tensor"), P("expert", None, "tensor"),
                  P("expert", "tensor", None)),
        out_specs=tokens,
    )(x, expert_ids, expert_weights, w_gate, w_up, w_down)


def expert_load(expert_ids: jax.Array, num_experts: int, valid: jax.Array) -> jax.Array:
    """Tokens routed to each expert: expert_ids [T, k], valid [T] bool -> [num_experts] int32."""
    hits = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32) * valid[:, None, None]
    return jnp.sum(hits, axis=(0, 1))
