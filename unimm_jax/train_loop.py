"""The parts of a training loop that the model trainer (``train.py``) and the tokenizer trainer
(``tokenizer_train.py``) share: the progress window, the non-finite check, SIGTERM handling and TensorBoard.

A loop body built from them reads::

    progress, preemption = Progress(total), Preemption()
    for step in range(start, total):
      state, metrics = step_fn(state, next(data))
      progress.add(metrics)                       # stays on the devices
      done = step + 1
      if done % log_every == 0 or done == total:
        window = progress.lap(done)               # the one host sync of a log interval; raises on non-finite steps
        logging.info("step %d/%d | loss %.4f | ... | ETA %s", done, total, window.means["loss"], ...,
                     progress.eta(done, window.steps_per_s))
      preempted = preemption.requested(done)
      if done % save_every == 0 or done == total or preempted:
        progress.fetch(done)                      # never save a state that went non-finite
        save(done)
      if preempted:
        ...                                       # close, preemption.log_saved(done, directory), return
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import storage


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def check_finite(first_step: int, metrics, skip: bool, directory,
                 fix: str = "Lower optim.learning_rate, check the data, or set train.on_nonfinite='skip' to skip "
                            "such steps.") -> int:
  """Raises FloatingPointError at the first step of ``metrics`` (steps first_step, first_step + 1, ...) whose loss,
  gradient or update was not finite (``m['nonfinite'] > 0`` or a non-finite ``m['loss']``), unless ``skip``;
  returns how many were. ``fix`` ends the message. Called before every checkpoint save, so a bad state is never
  written and the newest checkpoint on disk is the last good one."""
  bad = [first_step + i for i, m in enumerate(metrics) if m["nonfinite"] > 0 or not math.isfinite(float(m["loss"]))]
  if bad and not skip:
    raise FloatingPointError(f"non-finite loss, gradient or update at step {bad[0]}: stopping; the last good "
                             f"checkpoint in {directory} is kept. {fix}")
  return len(bad)


@dataclasses.dataclass(frozen=True)
class Window:
  """The steps since the previous progress line."""

  means: dict[str, float]   # each metric's mean over the window's steps
  steps: int
  steps_per_s: float        # training steps only: a validation inside the window restarted the clock


class Progress:
  """The metrics of the steps not yet logged, kept on the devices until :meth:`fetch` (one host sync), and the
  training time (validation excluded: call :meth:`restart_clock` after one).

  ``history`` holds every fetched step's loss (tests of exact resume compare it); ``skipped`` counts the
  non-finite steps let through with ``skip_nonfinite``.
  """

  def __init__(self, total: int, directory, *, skip_nonfinite: bool = False, fix: str | None = None):
    self.total, self.directory = total, directory
    self.skip_nonfinite, self.fix = skip_nonfinite, fix
    self.history: list[float] = []
    self.train_time = 0.0
    self.skipped = 0
    self._pending, self._fetched = [], []
    self._clock, self._steps = time.perf_counter(), 0

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)
    self._steps += 1

  def fetch(self, done: int) -> list[dict]:
    """Host-fetches the pending metrics (steps up to ``done``) and checks them (:func:`check_finite`)."""
    if not self._pending:
      return []
    fetched = jax.device_get(self._pending)
    self._pending = []
    self.history.extend(float(m["loss"]) for m in fetched)
    kw = {} if self.fix is None else {"fix": self.fix}
    self.skipped += check_finite(done - len(fetched) + 1, fetched, self.skip_nonfinite, self.directory, **kw)
    self._fetched.extend(fetched)
    return fetched

  def lap(self, done: int) -> Window:
    """Ends the window at step ``done``: fetches what is pending, adds its time to ``train_time``."""
    self.fetch(done)
    now = time.perf_counter()
    elapsed, self._clock = now - self._clock, now
    self.train_time += elapsed
    window = Window(means={k: float(np.mean([m[k] for m in self._fetched])) for k in self._fetched[0]},
                    steps=self._steps, steps_per_s=self._steps / elapsed)
    self._fetched, self._steps = [], 0
    return window

  def restart_clock(self) -> None:
    """After a validation: its time is not training time."""
    self._clock = time.perf_counter()

  def eta(self, done: int, steps_per_s: float) -> str:
    return format_duration((self.total - done) / steps_per_s)


class Preemption:
  """SIGTERM (what a spot / preemptible VM gets) asks for a checkpoint at the next step boundary, then exit.

  One process: a signal handler sets a flag. Several: JAX's preemption sync point, so every process stops at the
  same step (the distributed runtime catches the signal itself).
  """

  def __init__(self):
    import signal  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self._flag, self._multi = False, jax.process_count() > 1
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    """Asked at every step: across processes the sync point is one agreed step, whatever the save interval."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:   # no preemption service in this runtime
        return False
    return self._flag

  @staticmethod
  def log_saved(step: int, directory) -> None:
    logging.warning("preempted (SIGTERM): saved a checkpoint at step %d in %s; rerun the same command to resume",
                    step, directory)

  def close(self) -> None:
    if self._previous is not None:
      import signal  # pylint: disable=g-import-not-at-top
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Writer:
  """TensorBoard events from process 0 (tensorboardX; ``gs://`` through epath, see storage.py); a no-op elsewhere."""

  def __init__(self, workdir):
    self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      storage.register_tensorboard_backends()
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
