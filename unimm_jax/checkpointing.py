"""Orbax checkpoints of a training run: model, optimizer, EMA, step, RNG and the data iterator position.

``WORKDIR/checkpoints/<step>/`` holds two items: ``state`` (the :class:`~unimm_jax.train_state.TrainState` pytree,
written by every process collectively) and ``data`` (the grain iterator state, a few integers). Saves are
asynchronous where the config asks for it: the train loop goes on while the arrays are written. A restore is
done onto an abstract target (shapes, dtypes and shardings of the state the run would initialise), so the arrays
come back with the current run's sharding whatever the mesh that wrote them.
"""

from __future__ import annotations

import logging as std_logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class _LibraryInfoFilter(std_logging.Filter):
  """Drops Orbax's per-save INFO chatter (dozens of lines a save); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


class Checkpointer:
  """Save / restore / latest step for one workdir."""

  def __init__(self, workdir, *, every_steps: int, max_to_keep: int, async_save: bool = True):
    quiet_library_logs()
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )

  def incomplete(self) -> list[str]:
    """Names in the checkpoint directory that are not committed steps: saves killed half-way (Orbax's temporary
    directories) and quarantined ones. Never restored; left in place for the user to inspect."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if not p.name.isdigit())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, meta: dict | None = None, *, force: bool = False) -> bool:
    """Saves if ``step`` is on the save interval (or ``force``); returns whether a save started.

    ``meta`` is a small JSON dict (run bookkeeping such as cumulative wall time), restored by :meth:`restore_meta`.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except OSError as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step, error: OSError) -> OSError:
    good = [s for s in self.all_steps() if s != step]
    return OSError(error.errno, f"saving checkpoint {step} in {self.directory} failed ({error}); a full disk or "
                   f"lost permissions? The previous checkpoints are intact: {good or 'none'}")

  def restore_meta(self, step: int | None = None) -> dict:
    """The ``meta`` dict saved with ``step`` (default: latest); {} if it has none."""
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "meta").exists():
      return {}
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores ``step`` (default: latest) onto ``abstract_state``'s shapes, dtypes and shardings.

    The data iterator, if given, is moved in place to the saved position. Returns the restored state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored["state"]

  def quarantine(self, step: int) -> epath.Path:
    """Moves an unreadable step aside to ``<step>.damaged`` (kept for inspection, never deleted) and forgets it."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.damaged"
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f"{step}.damaged{n}"
    source.rename(target)
    self._manager.reload()
    return target

  def restore_newest_good(self, abstract_state, data_iterator=None):
    """(state, step) of the newest checkpoint that restores; damaged newer ones are reported and quarantined.

    A save killed half-way never becomes a step (Orbax writes to a temporary directory and renames it when
    complete); this handles the other case, a committed step whose files were damaged afterwards.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, data_iterator, step=step), step
      except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore raise many types)
        moved = self.quarantine(step)
        logging.error("checkpoint %d in %s cannot be restored (%s: %s); moved it to %s and trying an older one",
                      step, self.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                      moved.name)
    raise FileNotFoundError(f"no checkpoint in {self.directory} can be restored (damaged ones were moved to "
                            "*.damaged); use a new --workdir to start over")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (an error of a background save surfaces here)."""
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise self._save_error(self._manager.latest_step(), e) from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def has_checkpoints(workdir) -> bool:
  """Whether ``WORKDIR/checkpoints`` holds at least one committed step (cheap: no Orbax manager)."""
  directory = epath.Path(workdir) / "checkpoints"
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def saved_weights_metadata(manager: ocp.CheckpointManager, step: int, which: str = "ema_params"):
  """The ``which`` subtree of a step's saved train state, as Orbax array metadata (``.shape``, ``.dtype``)."""
  tree = manager.item_metadata(step)["state"]
  tree = getattr(tree, "tree", tree)
  return tree[which]


def weights_manager(workdir) -> ocp.CheckpointManager:
  """A read-only CheckpointManager of ``WORKDIR/checkpoints`` that builds nothing of training (close it)."""
  quiet_library_logs()
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints", options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def restore_weights(workdir, which: str = "ema_params", step: int | None = None, device=None,
                    target=None) -> tuple[Any, int]:
  """(one set of weights of a training checkpoint, its step), restored onto one device (``device``, or every
  array with the sharding ``device`` when it is one), or onto ``target``.

  Reads only the ``which`` subtree (``ema_params`` or ``params``) of the saved train state, by its own metadata:
  no optimizer is built and no optimizer state is read, so inference needs nothing of training. ``target``
  (a tree of ``jax.ShapeDtypeStruct`` with shardings, the saved tree's names and shapes) restores each array
  straight into its sharding and dtype, each host reading only its shards (``init.from``). FileNotFoundError
  without a checkpoint.
  """
  directory = epath.Path(workdir) / "checkpoints"
  manager = weights_manager(workdir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (steps: {manager.all_steps()})")
    if target is None:
      tree = saved_weights_metadata(manager, step, which)
      sharding = device if isinstance(device, jax.sharding.Sharding) else \
          jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    target = {which: target}
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
    return restored["state"][which], int(step)
  finally:
    manager.close()
