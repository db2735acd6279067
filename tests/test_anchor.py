"""Anchor updates against NumPy: EMA mixing (J-BOND) and hard swaps (iterative BOND)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import anchor


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=2), jnp.bfloat16)},
          "scale": [jnp.asarray(rng.normal(size=4), jnp.float32)]}


@pytest.mark.parametrize("eta", [0.0, 0.02, 0.5, 1.0])
def test_ema_update_mixes_every_leaf_and_keeps_dtypes(eta):
  a, p = _tree(0), _tree(1)
  out = jax.jit(anchor.ema_update)(a, p, eta)
  assert jax.tree.structure(out) == jax.tree.structure(a)
  for got, old, new in zip(jax.tree.leaves(out), jax.tree.leaves(a), jax.tree.leaves(p)):
    assert got.dtype == old.dtype
    expected = (1 - eta) * np.asarray(old, np.float64) + eta * np.asarray(new, np.float64)
    tol = 1e-2 if old.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol, atol=tol)
  if eta == 0.0:
    jax.tree.map(np.testing.assert_array_equal, out, a)
  if eta == 1.0:
    jax.tree.map(np.testing.assert_array_equal, out, p)


def test_ema_converges_geometrically():
  """After t updates towards a fixed θ: θ_a − θ = (1−η)^t (θ_a,0 − θ)."""
  a, p, eta = _tree(0), _tree(1), 0.1
  for _ in range(10):
    a = anchor.ema_update(a, p, eta)
  np.testing.assert_allclose(a["dense"]["kernel"] - p["dense"]["kernel"],
                             0.9 ** 10 * (_tree(0)["dense"]["kernel"] - p["dense"]["kernel"]),
                             rtol=1e-5, atol=1e-6)


def test_maybe_swap_every_k_steps_under_jit():
  a, p = _tree(0), _tree(1)
  swap = jax.jit(anchor.maybe_swap, static_argnames="every")
  for step in range(1, 10):
    out = swap(a, p, jnp.asarray(step), every=3)
    expected = p if step % 3 == 0 else a
    jax.tree.map(np.testing.assert_array_equal, out, expected)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, a)


def test_maybe_swap_casts_to_anchor_dtypes():
  a = {"w": jnp.ones(3, jnp.bfloat16)}
  p = {"w": jnp.full(3, 2.5, jnp.float32)}
  out = anchor.maybe_swap(a, p, 4, every=2)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["w"], [2.5, 2.5, 2.5])


@pytest.mark.parametrize("every", [0, -1, 2.5])
def test_maybe_swap_rejects_bad_period(every):
  with pytest.raises(ValueError, match="bond.swap_every must be an integer >= 1"):
    anchor.maybe_swap(_tree(0), _tree(1), 1, every)
