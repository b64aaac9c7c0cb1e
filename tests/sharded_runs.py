"""Runs for tests/test_sharding.py, each in its own process (fake CPU devices must be set before JAX starts).

    python tests/sharded_runs.py DEVICES losses OUT.json          # 3 steps on several meshes, plus param specs
    python tests/sharded_runs.py DEVICES restore OUT.json CKPTDIR # save on (2,4,1), restore on (1,4,2) and 1 device
    python tests/sharded_runs.py DEVICES main OUT.json WORKDIR STEPS [PORT NPROC PID]  # the main job's training

Each writes its results as JSON to OUT.json (the test asserts on them).
"""

import json
import os
import sys

DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from unimm_jax import checkpointing, train, train_state  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimm_jax.sequence import SequenceLayout  # pylint: disable=g-import-not-at-top,wrong-import-position

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]
LAYOUT = SequenceLayout.two_segment(text_vocab=40, image_vocab=64, text_len=8, image_grid=(4, 4))


def tiny_method(**overrides):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"model.head_dim": 8, "model.num_heads": 4, "model.mlp_dim": 64, **overrides})
  return config, train_state.make_step_inputs(config, LAYOUT)


def batches(n, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(0, LAYOUT.text_vocab, (n, batch, 8))
  image = rng.integers(0, LAYOUT.image_vocab, (n, batch, 16))
  return [LAYOUT.pack({"text": t, "image": i}).astype(np.int32) for t, i in zip(text, image)]


def setup(mesh_shape, method, config, devices=None):
  mesh = (sharding_lib.single_device_mesh() if mesh_shape is None
          else sharding_lib.make_mesh(mesh_shape, devices))
  rules = sharding_lib.rules_of(config)
  abstract, shardings = train_state.state_shardings(method, mesh, rules)
  step_fn, _ = train_state.compile_steps(method, mesh, rules, shardings)
  return mesh, rules, abstract, shardings, step_fn


def run_steps(state, step_fn, mesh, tokens_list):
  losses = []
  for tokens in tokens_list:
    state, metrics = step_fn(state, {"tokens": sharding_lib.global_array(tokens, sharding_lib.batch_sharding(mesh))})
    losses.append(float(metrics["loss"]))
  return state, losses


def losses(out):
  config, method = tiny_method()
  data = batches(3)
  result = {"losses": {}, "specs": {}}
  for shape in [None] + MESHES:
    mesh, rules, _, _, step_fn = setup(shape, method, config)
    state = train_state.init_state(method, 0, mesh, rules)
    if shape == (2, 2, 2):
      p = state.params
      for name, arr in [("token_embedding", p["token_embedding"]), ("qkv", p["block_0"]["attn"]["qkv"]["kernel"]),
                        ("out", p["block_0"]["attn"]["out"]["kernel"]), ("wi_0", p["block_0"]["mlp"]["wi_0"]["kernel"]),
                        ("wo", p["block_0"]["mlp"]["wo"]["kernel"]), ("head", p["head"]["kernel"]),
                        ("mu_wi_0", state.opt_state[1][0].mu["block_0"]["mlp"]["wi_0"]["kernel"]),
                        ("ema_wi_0", state.ema_params["block_0"]["mlp"]["wi_0"]["kernel"])]:
        result["specs"][name] = [list(a) if isinstance(a, tuple) else a for a in arr.sharding.spec]
        result["specs"][name + "_shard_shape"] = list(arr.addressable_shards[0].data.shape)
    _, result["losses"][str(shape)] = run_steps(state, step_fn, mesh, data)
  # Scanned layers (stacked parameters) on a mesh: same losses as the loop of the same stacked weights.
  config_s, method_s = tiny_method(**{"model.scan_layers": True, "model.remat": "full"})
  mesh, rules, _, _, step_fn = setup((2, 4, 1), method_s, config_s)
  state = train_state.init_state(method_s, 0, mesh, rules)
  result["scan_query_spec"] = [a for a in state.params["blocks"]["attn"]["qkv"]["kernel"].sharding.spec]
  _, result["losses"]["scan(2, 4, 1)"] = run_steps(state, step_fn, mesh, data)
  mesh, rules, _, _, step_fn = setup(None, method_s, config_s)
  _, result["losses"]["scan None"] = run_steps(train_state.init_state(method_s, 0, mesh, rules), step_fn, mesh, data)
  # train.concurrent_chunks on a mesh whose data and fsdp axes split the batch: the same losses as one device.
  config_c, method_c = tiny_method(**{"train.concurrent_chunks": 2})
  mesh, rules, _, _, step_fn = setup((2, 4, 1), method_c, config_c)
  _, result["losses"]["chunks(2, 4, 1)"] = run_steps(train_state.init_state(method_c, 0, mesh, rules), step_fn,
                                                   mesh, data)
  json.dump(result, open(out, "w"))


def restore(out, directory):
  config, method = tiny_method()
  data = batches(3)
  mesh, rules, _, _, step_fn = setup((2, 4, 1), method, config)
  state, first = run_steps(train_state.init_state(method, 0, mesh, rules), step_fn, mesh, data[:2])
  ckpt = checkpointing.Checkpointer(directory, every_steps=1, max_to_keep=2, async_save=True)
  ckpt.save(2, state, force=True)
  ckpt.wait()
  saved = jax.tree.map(np.asarray, state)
  _, uninterrupted = run_steps(state, step_fn, mesh, data[2:])
  result = {"uninterrupted": first + uninterrupted, "restored": {}}
  for shape in [(1, 4, 2), None]:
    mesh, rules, abstract, _, step_fn = setup(shape, method, config)
    back = ckpt.restore(abstract)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), back, saved)
    spec = back.params["block_0"]["mlp"]["wi_0"]["kernel"].sharding.spec
    _, next_loss = run_steps(back, step_fn, mesh, data[2:])
    result["restored"][str(shape)] = {"identical": all(jax.tree.leaves(same)), "next_loss": next_loss[0],
                                      "wi_0_spec": [a for a in spec]}
  ckpt.close()
  json.dump(result, open(out, "w"))


def main_job(out, workdir, steps, port=None, nproc=1, pid=0):
  if port is not None:
    sharding_lib.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, timeout_s=120)
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"train.steps": steps, "ckpt.every_steps": 3, "eval.batch_size": 32,
                          "data.val_size": 64})
  report = train.train_and_evaluate(config, workdir)
  result = {"history": report["history"], "process_index": jax.process_index(),
            "process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "val": report.get("val_bits_per_token"),
            "preempted": bool(report.get("preempted")), "step": report["step"]}
  json.dump(result, open(out, "w"))


if __name__ == "__main__":
  what, out, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
  if what == "losses":
    losses(out)
  elif what == "restore":
    restore(out, rest[0])
  elif what == "main":
    extra = [int(x) for x in rest[2:]]
    main_job(out, rest[0], int(rest[1]), *extra)
  else:
    raise SystemExit(f"unknown run {what!r}")
