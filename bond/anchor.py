"""Anchor policies of iterative BOND and J-BOND: the base whose Best-of-N the policy distils.

The anchor starts at π_ref and then follows the policy, either as an exponential moving
average of its parameters (J-BOND, BOND Algorithm 2) or by a hard swap every K steps
(iterative BOND, BOND Algorithm 1). Both are pure functions of parameter pytrees.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def ema_update(anchor_params: Params, params: Params, eta: float | jax.Array) -> Params:
  """θ_anchor ← (1−η)·θ_anchor + η·θ (BOND §5, Algorithm 2 step 6); any pytree, dtypes kept.

  Mixed in at least f32. A bf16 anchor would round away updates smaller than its resolution
  (η = 0.02 in the paper), so keep anchors in f32.
  """
  def mix(a, p):
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    return ((1.0 - eta) * a.astype(dtype) + eta * p.astype(dtype)).astype(a.dtype)
  return jax.tree.map(mix, anchor_params, params)


def maybe_swap(anchor_params: Params, params: Params, step: int | jax.Array, every: int) -> Params:
  """Iterative BOND (BOND §4, Algorithm 1): θ_anchor ← θ whenever step % every == 0.

  `step` counts completed updates, so the anchor becomes the policy after updates K, 2K, ...;
  jittable (`lax.cond` on a traced step). Swapped params take the anchor's dtypes.
  """
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"bond.swap_every must be an integer >= 1, got {every!r}")

  def as_anchor():
    return jax.tree.map(lambda a, p: p.astype(a.dtype), anchor_params, params)
  return jax.lax.cond(jnp.asarray(step) % every == 0, as_anchor, lambda: anchor_params)
