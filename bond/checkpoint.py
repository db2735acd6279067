"""Orbax persistence of the whole `TrainState` plus JSON metadata (data position, config).

Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint
interrupted mid-write is never listed by `latest_step()` and restore ignores it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save every K steps (and on demand), keep the last M, restore the latest complete one."""

  def __init__(self, directory: str, keep: int = 3):
    directory = directory if "://" in directory else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings/dtypes of `abstract_state` (a pytree of arrays or
    `jax.ShapeDtypeStruct`s), so a checkpoint written on one mesh restores on another."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("no complete checkpoint to restore")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def close(self):
    self.manager.close()
