"""`LowRankWeight`: a kernel factored as u (K, r) @ v (r, N), run as two thin matmuls.

The factors may themselves be any weight representation (e.g. quantized), since the
product is computed with `linear` twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm.weights.dispatch import linear, materialize, param_bytes, register_linear


@struct.dataclass
class LowRankWeight:
    u: Any  # (K, r)
    v: Any  # (r, N)

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.v.shape[-1])

    def materialize(self) -> jax.Array:
        u, v = materialize(self.u), materialize(self.v)
        return jnp.matmul(u, v.astype(u.dtype))


register_linear(
    LowRankWeight,
    linear_fn=lambda x, w: linear(linear(x, w.u), w.v),
    nbytes_fn=lambda w: param_bytes(w.u) + param_bytes(w.v),
)
