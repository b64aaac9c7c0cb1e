"""Sharding on 8 fake CPU devices (each run in its own process: see tests/sharded_runs.py), meshes, multi-host."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from unimm_jax import sharding as sharding_lib

WORKER = os.path.join(os.path.dirname(__file__), "sharded_runs.py")


def _run(devices, *args, timeout=300):
  proc = subprocess.run([sys.executable, WORKER, str(devices), *map(str, args)], capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("losses") / "out.json"
  _run(8, "losses", out)
  return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(1, 4, 2)", "(2, 2, 2)"])
def test_three_steps_on_a_mesh_match_one_device(loss_runs, mesh):
  single = loss_runs["losses"]["None"]
  assert len(single) == 3 and np.isfinite(single).all() and len(set(single)) == 3   # three different batches
  np.testing.assert_allclose(loss_runs["losses"][mesh], single, rtol=2e-5, atol=2e-6)


def test_parameters_are_sharded_as_the_rules_say(loss_runs):
  specs = loss_runs["specs"]   # mesh (2, 2, 2); rules: embed -> fsdp, mlp/heads/vocab -> tensor
  assert specs["token_embedding"] == ["tensor", "fsdp"]            # (vocab, embed)
  assert specs["qkv"] == ["fsdp", None, "tensor", None]             # (embed, q|k|v, heads, kv)
  assert specs["out"] == ["tensor", None, "fsdp"]                   # (heads, kv, embed)
  assert specs["wi_0"] == ["fsdp", "tensor"] and specs["wo"] == ["tensor", "fsdp"]
  assert specs["head"] == ["fsdp", "tensor"]                        # (embed, vocab)
  assert specs["mu_wi_0"] == specs["wi_0"] and specs["ema_wi_0"] == specs["wi_0"]   # AdamW moments and EMA too
  assert specs["wi_0_shard_shape"] == [16, 32]                      # (32, 64) split 2 x 2: really a quarter each


def test_scanned_layers_shard_and_train_like_the_single_device_run(loss_runs):
  assert loss_runs["scan_query_spec"] == [None, "fsdp", None, "tensor", None]   # (layers, embed, q|k|v, heads, kv)
  np.testing.assert_allclose(loss_runs["losses"]["scan(2, 4, 1)"], loss_runs["losses"]["scan None"], rtol=2e-5,
                             atol=2e-6)


def test_concurrent_chunks_on_a_mesh_train_like_one_device(loss_runs):
  np.testing.assert_allclose(loss_runs["losses"]["chunks(2, 4, 1)"], loss_runs["losses"]["None"], rtol=2e-5,
                             atol=2e-6)


def test_checkpoint_restores_onto_another_mesh_and_one_device(tmp_path):
  out = tmp_path / "out.json"
  _run(8, "restore", out, tmp_path / "ckpt")
  result = json.loads(out.read_text())
  want = result["uninterrupted"][2]
  for mesh, got in result["restored"].items():
    assert got["identical"], mesh
    np.testing.assert_allclose(got["next_loss"], want, rtol=2e-5, atol=2e-6)
  assert result["restored"]["(1, 4, 2)"]["wi_0_spec"] == ["fsdp", "tensor"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, steps, out_dir):
  port = _free_port()
  logs = [out_dir / f"log{i}_{steps}" for i in range(2)]   # files, not pipes: an unread pipe can fill and block
  procs = [subprocess.Popen([sys.executable, WORKER, "4", "main", str(out_dir / f"p{i}.json"), str(workdir),
                             str(steps), str(port), "2", str(i)], stdout=subprocess.DEVNULL,
                            stderr=open(logs[i], "w")) for i in range(2)]
  results = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=300)
      assert p.returncode == 0, log.read_text()[-4000:]
  finally:
    for p in procs:
      p.kill()
  for i in range(2):
    results.append(json.loads((out_dir / f"p{i}.json").read_text()))
  return results


@pytest.mark.exclusive
def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
  single = tmp_path / "single.json"
  _run(8, "main", single, tmp_path / "one", 5)
  want = json.loads(single.read_text())["history"]
  # A workdir trained on 8 devices loads and samples here, on this test's one device.
  from unimm_jax.pipeline import Pipeline   # pylint: disable=g-import-not-at-top
  pipe = Pipeline.load(tmp_path / "one")
  assert pipe.text_to_image(["a small red circle at the top left"], steps=2).shape == (1, 24, 24, 3)
  first = _two_processes(tmp_path / "two", 3, tmp_path)
  assert [r["process_count"] for r in first] == [2, 2] and first[0]["devices"] == 8
  assert first[0]["local_devices"] == 4
  np.testing.assert_allclose(first[0]["history"], want[:3], rtol=2e-5, atol=2e-6)
  assert first[0]["history"] == first[1]["history"]
  resumed = _two_processes(tmp_path / "two", 5, tmp_path)       # resumes from the step-3 checkpoint
  np.testing.assert_allclose(resumed[0]["history"], want[3:], rtol=2e-5, atol=2e-6)
  # Each process kept its own data position, and read only its half of each global batch of 16.
  data = tmp_path / "two" / "checkpoints" / "5" / "data"
  states = {p.name: json.loads(p.read_text()) for p in data.glob("process_*-of-2.json")}
  assert set(states) == {"process_0-of-2.json", "process_1-of-2.json"}
  assert all(s["next_index"] == 5 for s in states.values())   # 5 local batches of 8 rows each


def test_mesh_shape_errors_before_anything_compiles():
  assert sharding_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(sharding_lib.MeshError, match="does not fit 8 devices"):
    sharding_lib.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(sharding_lib.MeshError, match="has 4 devices but there are 8"):
    sharding_lib.resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(sharding_lib.MeshError, match="at most one"):
    sharding_lib.resolve_mesh_shape((-1, -1, 1), 8)


def test_dry_run_of_the_large_config_prints_the_hand_computed_memory(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "unimm_jax.main", "--config=configs/large_v5e32.py",
                         f"--workdir={tmp_path}", "--dry_run", "--dry_run_devices=32"], capture_output=True,
                        text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  # By hand: d 2048, 24 layers, 16 heads x 128, MLP 5632; vocabulary: 257 text ids, the image range from 384 (the
  # next multiple of sequence.id_align=128) to 16768, MASK 16768: 16769 rows padded to 16896; 256 text positions,
  # 16 image rows and 16 columns.
  d, layers, vocab = 2048, 24, 16896
  per_layer = 2 * d + 3 * d * 16 * 128 + 16 * 128 * d + 3 * d * 5632
  params = vocab * d + 2 * d + 256 * d + 16 * d + 16 * d + layers * per_layer + d + d * vocab
  assert f"dry run: {params:,} parameters" in out and params > 1e9
  # Full FSDP over 32 chips splits every array 32 ways; AdamW's two counts and step + rng are replicated.
  assert f"params      {params * 4 // 32:>16,} bytes" in out
  assert f"opt_state   {params * 8 // 32 + 8:>16,} bytes" in out
  assert f"total       {params * 16 // 32 + 8 + 12:>16,} bytes" in out
  assert "mesh: data 1 x fsdp 32 x tensor 1 = 32 devices" in out
  assert out.count(" per device (") == 10 and "(24, 64, 5632)" in out
  assert not list(tmp_path.iterdir())            # nothing written, nothing trained


def test_dry_run_with_a_mesh_that_does_not_fit_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "unimm_jax.main", "--config=configs/shapes.py",
                         f"--workdir={tmp_path}", "--dry_run", "--dry_run_devices=6", "--config.mesh.shape=(4,-1,1)"],
                        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 2 and "does not fit 6 devices" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.exclusive
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, "4", "main", str(tmp_path / f"p{i}.json"), str(tmp_path / "w"),
                             "3000", str(port), "2", str(i)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / f"err{i}", "w")) for i in range(2)]   # a file: a pipe can fill
  try:
    deadline = time.monotonic() + 240
    while not (tmp_path / "w" / "checkpoints" / "3").exists():   # training is under way
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no progress"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)                         # only one host is told, as on a real slice
    for p in procs:
      p.wait(timeout=240)
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], (tmp_path / "err1").read_text()[-3000:]
  results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
  assert all(r["preempted"] for r in results) and results[0]["step"] == results[1]["step"] < 3000
  assert (tmp_path / "w" / "checkpoints" / str(results[0]["step"])).exists()
