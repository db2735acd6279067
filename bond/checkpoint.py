"""Orbax persistence of the whole `TrainState` plus JSON metadata (data position, config).

A checkpoint is complete when its step directory holds orbax's commit marker
(`commit_success.txt`, written last: before the atomic rename on local disks, as the commit itself
on object stores such as gs://). Anything else in the directory, an orbax temporary directory left
by a killed writer or a step directory without its marker (an interrupted write or copy), is
removed when the `Checkpointer` opens, so restore never sees it and the step can be saved again.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

COMMIT_MARKER = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"      # orbax's name for a step directory being written


def incomplete_entries(directory: epath.Path) -> list[epath.Path]:
  """Entries of a checkpoint directory that are not complete checkpoints (see module doc)."""
  if not directory.exists():
    return []
  return [p for p in directory.iterdir() if p.is_dir() and (
      TMP_SUFFIX in p.name or (p.name.isdigit() and not (p / COMMIT_MARKER).exists()))]


class Checkpointer:
  """Saves asynchronously, keeps the last `keep`, restores the latest complete checkpoint.

  Every process calls every method (orbax saves and restores collectively); process 0 alone
  removes incomplete entries, and the others wait for it.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    path = os.fspath(directory)
    self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
    if jax.process_index() == 0:
      for entry in incomplete_entries(self.directory):
        logging.warning("removing incomplete checkpoint %s", entry)
        entry.rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("bond_checkpoint_cleanup")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing `state` and `meta` (JSON) as step `step`; returns once the arrays are
    copied off the device, so the caller may donate them. `wait`/`close` finish the write."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def meta(self, step: int) -> dict:
    """The JSON metadata of step `step` alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings/dtypes of `abstract_state` (a pytree of arrays or
    `jax.ShapeDtypeStruct`s), so a checkpoint written on one mesh restores on another."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
