"""Run lifecycle: non-finite steps stop the run (or are skipped) without touching good checkpoints; SIGTERM saves."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from unimm_jax import checkpointing, train
from unimm_jax import sharding as sharding_lib
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nan_from_update_7(monkeypatch):
  """A learning rate that turns NaN from the 7th update on (optimizer count 6): updates, then params, go bad."""
  real = train.learning_rate_schedule

  def poisoned(config):
    base = real(config)
    return lambda count: jnp.where(count < 6, base(count), jnp.nan)
  monkeypatch.setattr(train, "learning_rate_schedule", poisoned)


def _finite(tree):
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def test_nonfinite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, nan_from_update_7):
  config = tiny_config(**{"train.steps": 12, "ckpt.every_steps": 3, "train.log_every": 4})
  with pytest.raises(FloatingPointError, match="non-finite loss, gradient or update at step 7"):
    train.train_and_evaluate(config, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path, every_steps=3, max_to_keep=5)
  assert ckpt.latest_step() == 6 and ckpt.all_steps() == [3, 6]     # step 9 (bad) was never written
  method = train.make_method(config, _layout(tmp_path, config))
  abstract, _ = train.state_shardings(method, sharding_lib.single_device_mesh(), ())
  state = ckpt.restore(abstract)
  ckpt.close()
  assert int(state.step) == 6 and _finite(state.params) and _finite(state.opt_state)


def test_skip_mode_skips_bad_steps_and_keeps_training(tmp_path, nan_from_update_7):
  config = tiny_config(**{"train.steps": 9, "ckpt.every_steps": 3, "train.log_every": 3,
                          "train.on_nonfinite": "skip"})
  report = train.train_and_evaluate(config, tmp_path)
  assert report["step"] == 9 and np.isfinite(report["history"]).all()
  assert np.isfinite(report["val_bits_per_token"]["text"])   # the parameters stayed those of step 6


def _layout(workdir, config):
  from unimm_jax.data import pipeline   # pylint: disable=g-import-not-at-top
  return pipeline.load_tokenizers(workdir, config.text.max_len).layout


def test_sigterm_saves_a_checkpoint_exits_zero_and_the_rerun_resumes(tmp_path):
  cmd = [sys.executable, "-m", "unimm_jax.main", "--config=configs/shapes.py", f"--workdir={tmp_path}",
         "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
         "--config.model.head_dim=16", "--config.model.mlp_dim=32", "--config.train.steps=80", "--config.optim.warmup_steps=5",
         "--config.train.log_every=1", "--config.data.fit_examples=300", "--config.data.train_size=2000",
         "--config.data.val_size=64", "--config.eval.batch_size=64", "--config.ckpt.every_steps=100000",
         "--config.eval.every_steps=100000", "--config.eval.num_generate=8"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  try:
    for line in proc.stderr:
      if "step 5/80" in line:
        proc.send_signal(signal.SIGTERM)
        break
      assert time.monotonic() < deadline, "no training progress"
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: checkpoint saved at step" in out
  saved = int(out.split("saved at step ")[1].split(";")[0])
  assert saved >= 5 and (tmp_path / "checkpoints" / str(saved)).exists()
  assert not (tmp_path / "report.json").exists()
  assert saved < 80, "the run finished before the signal: nothing was tested"
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)   # the same command
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from checkpoint at step {saved}" in again.stderr
  assert (tmp_path / "report.json").exists()
