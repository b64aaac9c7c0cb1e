"""``init.from``: a run starts from the parameters of a training workdir or an export bundle, read straight into
its shardings, names and shapes checked first.

One tiny base run (module fixture, also imported by ``test_lora.py``) is the source of every test.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from unimm_jax import bundle, checkpointing, configuration, export, init_from, train, train_state
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.models import params as params_lib
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  return tiny_config(**{"data.val_size": 64, "data.train_size": 1000, "data.fit_examples": 300, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(workdir, report) of a 6-step run: the weights every test starts from."""
  path = tmp_path_factory.mktemp("base") / "run"
  return path, train.train_and_evaluate(_config(), path)


def _method_and_target(config, workdir):
  """(step inputs, abstract train state on one device) of ``config`` with the tokenizers saved in ``workdir``."""
  layout = input_pipeline.load_tokenizers(workdir, config).layout
  method = train_state.make_step_inputs(config, layout)
  abstract, _ = train_state.state_shardings(method, sharding_lib.single_device_mesh(), ())
  return method, abstract


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def test_init_from_a_workdir_starts_at_its_ema_weights_with_a_fresh_optimizer(base):
  path, _ = base
  method, abstract = _method_and_target(_config(), path)
  weights, source = init_from.load(path, abstract.weights)
  count = params_lib.param_count(weights)
  assert source.describe() == (f"init.from={path}: the EMA weights of step 6 of a training workdir; "
                               f"{len(bundle.flatten(weights))} tensors, {count:,} parameters")
  want, _ = checkpointing.restore_weights(path, "ema_params")
  want = _host(want)
  state = train_state.init_state(method, 1, weights=weights)   # another seed: nothing random is left in the weights
  _assert_trees_equal(state.params, want)
  _assert_trees_equal(state.ema_params, want)
  assert int(state.step) == 0
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.opt_state))   # moments and counts at zero


def test_a_run_from_a_workdir_validates_at_step_0_as_its_source_did_then_trains(base, tmp_path):
  path, base_report = base
  report = train.train_and_evaluate(_config(**{"train.steps": 3, "init.from": str(path)}), tmp_path)
  # The same weights on the same validation set with the same key: the source's last figure, bit for bit.
  assert report["val_bits_per_token_initial"] == base_report["val_bits_per_token"]
  assert report["val_bits_per_token"] != base_report["val_bits_per_token"] and np.isfinite(report["history"]).all()
  for name in ("text_tokenizer.json", "image_tokenizer.json"):   # the source's vocabulary, not a refit
    assert (tmp_path / "tokenizers" / name).read_text() == (path / "tokenizers" / name).read_text()
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["init"]["from"] == str(path)


@pytest.mark.parametrize("fmt,dtype", [("safetensors", "float32"), ("orbax", "float32"), ("safetensors", "bfloat16"),
                                       ("orbax", "bfloat16")])
def test_init_from_a_bundle_loads_its_weights_into_the_runs_shardings_and_dtype(base, tmp_path, fmt, dtype):
  path, _ = base
  export.export(path, tmp_path / "bundle", fmt=fmt, dtype=dtype)
  _, abstract = _method_and_target(_config(), path)
  weights, source = init_from.load(tmp_path / "bundle", abstract.weights)
  assert source.kind == "bundle" and source.step == 6 and f"export bundle ({fmt}) of step 6" in source.describe()
  want, _ = checkpointing.restore_weights(path, "ema_params")
  want = jax.tree.map(lambda x: np.asarray(np.asarray(x, dtype=jax.numpy.dtype(dtype)), np.float32), want)
  _assert_trees_equal(weights, want)
  for got, target in zip(jax.tree.leaves(weights), jax.tree.leaves(abstract.weights)):
    assert got.dtype == target.dtype == np.float32 and got.sharding == target.sharding


SHARDED_LOAD = r'''
import sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_train import tiny_config
from unimm_jax import checkpointing, init_from, sharding as sharding_lib, train_state
from unimm_jax.data import input_pipeline
base, bundles = sys.argv[1], sys.argv[2:]
config = tiny_config(**{"mesh.shape": (1, 4, 1)})
mesh, rules = sharding_lib.make_mesh(config.mesh.shape), sharding_lib.rules_of(config)
method = train_state.make_step_inputs(config, input_pipeline.load_tokenizers(base, config).layout)
abstract, _ = train_state.state_shardings(method, mesh, rules)
want, _ = checkpointing.restore_weights(base, "ema_params")
split = 0
for path in [base] + bundles:
  weights, _ = init_from.load(path, abstract.weights)
  for got, target, full in zip(jax.tree.leaves(weights), jax.tree.leaves(abstract.weights), jax.tree.leaves(want)):
    assert got.sharding == target.sharding, (path, got.sharding, target.sharding)
    split += not got.sharding.is_fully_replicated
    for shard in got.addressable_shards:   # each device holds its own slice of the source, nothing else
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
print("split arrays:", split)

# LoRA steps on the 4-device mesh: the losses of one device.
config = tiny_config(**{"mesh.shape": (1, 4, 1), "model.lora_rank": 4, "init.from": base})
toks = input_pipeline.load_tokenizers(base, config)
data = input_pipeline.train_iterator(input_pipeline.train_dataset(
    input_pipeline.make_source(config, "train"), toks, batch_size=config.train.batch_size, seed=0), 0)
batches = [next(data)["tokens"] for _ in range(2)]
losses = []
for m in (sharding_lib.single_device_mesh(), mesh):
  method = train_state.make_step_inputs(config, toks.layout)
  abstract, shardings = train_state.state_shardings(method, m, rules)
  state = train_state.init_state(method, 0, m, rules, init_from.load(base, abstract.weights)[0])
  step_fn, _ = train_state.compile_steps(method, m, rules, shardings)
  losses.append([])
  for tokens in batches:
    state, metrics = step_fn(state, {"tokens": sharding_lib.global_batch(tokens, sharding_lib.batch_sharding(m))})
    losses[-1].append(float(metrics["loss"]))
np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
print("lora losses:", losses)
'''


def test_init_from_and_lora_on_an_fsdp_mesh_of_4_devices(base, tmp_path):
  path, _ = base
  for fmt in ("safetensors", "orbax"):
    export.export(path, tmp_path / fmt, fmt=fmt)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(path), str(tmp_path / "safetensors"),
                         str(tmp_path / "orbax")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert int(proc.stdout.split("split arrays:")[1].split()[0]) > 0   # embed is split over fsdp: real shards
  assert "lora losses:" in proc.stdout


def test_a_shape_mismatch_is_one_line_naming_the_tensor_before_anything_trains(base, tmp_path):
  path, _ = base
  config = _config(**{"model.mlp_dim": 48, "init.from": str(path)})
  want = f"init.from={path}: block_0/mlp/wi_0/kernel has shape (32, 64) there, the config makes (32, 48)"
  with pytest.raises(configuration.ConfigError, match=re.escape(want)) as err:
    train.train_and_evaluate(config, tmp_path)
  assert str(err.value) == want
  assert not checkpointing.has_checkpoints(tmp_path)


def test_a_stacked_model_from_an_unstacked_source_names_the_difference(base, tmp_path):
  path, _ = base
  _, abstract = _method_and_target(_config(**{"model.scan_layers": True}), path)
  with pytest.raises(configuration.ConfigError, match=r"has no tensor blocks/.* config.model.scan_layers differs"):
    init_from.load(path, abstract.weights)


def test_the_cli_says_in_one_line_that_a_path_holds_no_weights(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = subprocess.run([sys.executable, "-m", "unimm_jax.main", "--config=configs/shapes.py",
                         f"--workdir={tmp_path / 'run'}", f"--config.init.from={tmp_path / 'empty'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: init.from={tmp_path / 'empty'}: neither a training workdir (config.json, checkpoints/) nor an export "
      "bundle (model.json); give a workdir or bundle holding the parameters to start from")


