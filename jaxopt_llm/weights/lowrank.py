"""`LowRankWeight`: a kernel factored as u (K, r) @ v (r, N), run as two thin matmuls.

The factors may themselves be any weight representation (e.g. quantized), since the
product is computed with `linear` twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxopt_llm.weights.base import WeightLeaf, specs_of
from jaxopt_llm.weights.dispatch import linear, materialize


@struct.dataclass
class LowRankWeight(WeightLeaf):
    """A kernel (K, N) stored as u (K, r) @ v (r, N); each factor may itself be a typed leaf.

    `linear` runs two thin matmuls, linear(linear(x, u), v), never the (K, N) product.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LowRankWeight(u=jnp.ones((6, 2)), v=jnp.ones((2, 4)))
        >>> w.shape, w.rank, w.linear(jnp.ones((1, 6))).tolist()
        ((6, 4), 2, [[12.0, 12.0, 12.0, 12.0]])
    """
    u: Any  # (K, r)
    v: Any  # (r, N)

    @property
    def rank(self) -> int:
        """The rank r (rows of v)."""
        return int(self.v.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape (K, N)."""
        return int(self.u.shape[0]), int(self.v.shape[-1])

    def materialize(self) -> jax.Array:
        u, v = materialize(self.u), materialize(self.v)
        return jnp.matmul(u, v.astype(u.dtype))

    def linear(self, x: jax.Array) -> jax.Array:
        return linear(linear(x, self.u), self.v)

    def partition_specs(self, rows: str | None, cols: str | None, mesh: Mesh) -> LowRankWeight:
        """Column-parallel shards v's N and replicates u (x·u is computed redundantly, then ·v
        is local: no collective); row-parallel shards u's K and replicates v (x·u gives
        partial sums: one all-reduce of the (…, r) activation, smaller than a dense
        row-parallel layer's (…, N) one)."""
        return LowRankWeight(u=specs_of(self.u, rows, None, mesh),
                             v=specs_of(self.v, None, cols, mesh))
