"""Parallelism: one mesh (`data`, `fsdp`, `tensor`), one logical-axis rules table.

Params and activations carry logical axis names (`bond.models.gemma`); `RULES` maps them to mesh
axes, so the same code runs on 1 CPU device, 8 fake devices and a TPU pod (MaxText style). A mesh
axis that does not divide a dimension is dropped for that dimension (replicated) instead of
failing, which keeps tiny toy models shardable on any mesh.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bond.models import gemma

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis -> mesh axis (or axes); absent names are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("length", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over all (global) devices; -1 for `data` takes what fsdp*tensor leave."""
  devices = list(devices if devices is not None else jax.devices())
  for name, size in (("mesh.fsdp", fsdp), ("mesh.tensor", tensor)):
    if size < 1:
      raise ValueError(f"{name} must be >= 1, got {size}")
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"mesh.fsdp * mesh.tensor = {fsdp * tensor} must divide the "
                       f"{len(devices)} devices")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} must equal the number of "
                     f"devices ({len(devices)})")
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drop mesh axes that do not divide their dimension (replicate that dimension instead)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  return P(*(axes if dim % _axis_size(mesh, axes) == 0 else None
             for dim, axes in zip(shape, spec)))


def logical_to_mesh(logical_spec: P, rules=RULES) -> P:
  return nn.logical_to_mesh_axes(tuple(logical_spec), rules)


def param_shardings(config: gemma.GemmaConfig, mesh: Mesh, rules=RULES):
  """NamedSharding pytree for the params of `config` (no allocation)."""
  shapes, logical = gemma.param_shapes_and_axes(config)
  return jax.tree.map(
      lambda s, spec: NamedSharding(mesh, fit_spec(s.shape, logical_to_mesh(spec, rules), mesh)),
      shapes, logical, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data*fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch slices -> global arrays sharded on the batch axis (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}


def maybe_initialize_distributed() -> bool:
  """Initialise `jax.distributed` when the environment says this is a multi-process run.

  TPU VM pods are auto-detected by JAX; locally `launch/local.py` sets BOND_COORDINATOR,
  BOND_NUM_PROCESSES and BOND_PROCESS_ID.
  """
  if os.environ.get("BOND_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["BOND_COORDINATOR"],
        num_processes=int(os.environ["BOND_NUM_PROCESSES"]),
        process_id=int(os.environ["BOND_PROCESS_ID"]))
    return True
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("BOND_MULTIHOST"):
    jax.distributed.initialize()
    return True
  return False
