"""The loop parts both trainers share (unimm_jax/train_loop.py): the progress window and the non-finite check."""

import math

import numpy as np
import pytest

from unimm_jax import train_loop


def _metrics(loss, nonfinite=0.0):
  return {"loss": np.float32(loss), "nonfinite": np.float32(nonfinite)}


def test_a_window_averages_every_step_since_the_last_line_even_those_fetched_for_a_save():
  progress = train_loop.Progress(total=10, directory="ckpt")
  for step, loss in enumerate([1.0, 2.0, 3.0], start=1):
    progress.add(_metrics(loss))
    if step == 2:
      assert [m["loss"] for m in progress.fetch(step)] == [1.0, 2.0]   # a save between two log lines
  window = progress.lap(3)
  assert window.steps == 3 and window.means["loss"] == pytest.approx(2.0) and window.steps_per_s > 0
  progress.add(_metrics(5.0))
  assert progress.lap(4).means["loss"] == 5.0 and progress.history == [1.0, 2.0, 3.0, 5.0]
  assert progress.train_time > 0 and progress.fetch(4) == []


def test_the_first_non_finite_step_is_named_with_the_fix_or_counted_when_skipped():
  progress = train_loop.Progress(total=10, directory="/runs/a/checkpoints", fix="Lower the rate.")
  for m in (_metrics(1.0), _metrics(1.0), _metrics(1.0, nonfinite=1.0), _metrics(math.nan)):
    progress.add(m)
  with pytest.raises(FloatingPointError, match=r"non-finite loss, gradient or update at step 7: stopping; the last "
                                               r"good checkpoint in /runs/a/checkpoints is kept. Lower the rate.$"):
    progress.fetch(8)   # steps 5..8
  skipping = train_loop.Progress(total=10, directory="d", skip_nonfinite=True)
  for m in (_metrics(1.0, nonfinite=1.0), _metrics(math.nan), _metrics(1.0)):
    skipping.add(m)
  skipping.fetch(3)
  assert skipping.skipped == 2 and len(skipping.history) == 3


def test_format_duration():
  assert [train_loop.format_duration(s) for s in (-3, 59.9, 61, 3599, 3600, 36000 + 61)] == [
      "0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "10h01m"]
