"""Run lifecycle: non-finite steps stop the run (or are skipped) without touching good checkpoints; SIGTERM saves."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from unimm_jax import checkpointing, train, train_state
from unimm_jax import sharding as sharding_lib
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nan_from_update_7(monkeypatch):
  """A learning rate that turns NaN from the 7th update on (optimizer count 6): updates, then params, go bad."""
  real = train_state.learning_rate_schedule

  def poisoned(config):
    base = real(config)
    return lambda count: jnp.where(count < 6, base(count), jnp.nan)
  monkeypatch.setattr(train_state, "learning_rate_schedule", poisoned)


def _finite(tree):
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def test_nonfinite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, nan_from_update_7):
  config = tiny_config(**{"train.steps": 12, "ckpt.every_steps": 3, "train.log_every": 4})
  with pytest.raises(FloatingPointError, match="non-finite loss, gradient or update at step 7"):
    train.train_and_evaluate(config, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path, every_steps=3, max_to_keep=5)
  assert ckpt.latest_step() == 6 and ckpt.all_steps() == [3, 6]     # step 9 (bad) was never written
  method = train_state.make_step_inputs(config, _layout(tmp_path, config))
  abstract, _ = train_state.state_shardings(method, sharding_lib.single_device_mesh(), ())
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
  from unimm_jax.data import input_pipeline   # pylint: disable=g-import-not-at-top
  return input_pipeline.load_tokenizers(workdir, config).layout


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


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(tmp_path):
  config = tiny_config(**{"train.steps": 6, "ckpt.every_steps": 3})
  train.train_and_evaluate(config, tmp_path)
  state_files = [p for p in (tmp_path / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
  for p in state_files:
    p.write_bytes(b"not a checkpoint")
  report = train.train_and_evaluate(tiny_config(**{"train.steps": 9, "ckpt.every_steps": 3}), tmp_path)
  assert report["step"] == 9 and len(report["history"]) == 6          # resumed from step 3, not 6
  assert (tmp_path / "checkpoints" / "6.damaged").is_dir()           # kept for inspection, not deleted
  assert checkpointing.Checkpointer(tmp_path, every_steps=3, max_to_keep=5).latest_step() == 9


def test_resuming_with_another_model_size_names_the_fields_before_building_anything(tmp_path):
  train.train_and_evaluate(tiny_config(**{"train.steps": 3}), tmp_path)
  wider = tiny_config(**{"train.steps": 6, "model.d_model": 48, "model.num_layers": 3})
  with pytest.raises(Exception, match=r"config.model.d_model: 48 here, 32 in the checkpoint") as err:
    train.train_and_evaluate(wider, tmp_path)
  assert "config.model.num_layers: 3 here, 2 in the checkpoint" in str(err.value)


def test_an_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(OSError, match="cannot write to the workdir"):
    train.train_and_evaluate(tiny_config(), blocker / "run")


def test_sigkill_then_the_same_command_continues_bit_for_bit(tmp_path):
  worker = os.path.join(REPO, "tests", "sharded_runs.py")
  run = lambda workdir, out: [sys.executable, worker, "1", "main", str(tmp_path / out), str(tmp_path / workdir), "30"]
  subprocess.run(run("a", "a.json"), check=True, capture_output=True, timeout=300)
  want = json.loads((tmp_path / "a.json").read_text())["history"]
  proc = subprocess.Popen(run("b", "b.json"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  try:
    while not (tmp_path / "b" / "checkpoints" / "6").exists():   # committed steps appear by an atomic rename
      assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint at step 6"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert not (tmp_path / "b.json").exists()                         # it really died before the end
  subprocess.run(run("b", "b.json"), check=True, capture_output=True, timeout=300)
  got = json.loads((tmp_path / "b.json").read_text())["history"]
  assert 0 < len(got) <= 24
  assert got == want[len(want) - len(got):]                         # the same float32 losses, bit for bit


def test_a_save_cut_off_half_way_is_ignored_and_reported(tmp_path, caplog):
  train.train_and_evaluate(tiny_config(**{"train.steps": 3}), tmp_path)
  partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234"   # what a save killed mid-write leaves
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half").write_bytes(b"\0" * 10)
  with caplog.at_level("WARNING"):
    report = train.train_and_evaluate(tiny_config(**{"train.steps": 6}), tmp_path)
  assert report["step"] == 6 and len(report["history"]) == 3          # resumed from step 3
  assert "6.orbax-checkpoint-tmp-1234" in caplog.text and partial.exists()   # reported, left in place


def test_a_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  import errno
  import orbax.checkpoint as ocp
  config = tiny_config(**{"train.steps": 6, "ckpt.every_steps": 3})
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 6:
      raise OSError(errno.ENOSPC, "No space left on device")   # simulated: this sandbox cannot fill a disk
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(OSError, match=r"saving checkpoint 6 .* failed .*No space left.* previous checkpoints are "
                                    r"intact: \[3\]"):
    train.train_and_evaluate(config, tmp_path)
  monkeypatch.undo()
  assert checkpointing.Checkpointer(tmp_path, every_steps=3, max_to_keep=5).latest_step() == 3
