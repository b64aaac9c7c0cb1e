"""Nothing a user has changes: what the code before segments computed (fixtures recorded at abac63c by
``tests/fixtures/record_legacy*.py``) is what this code computes.

- ``configs/shapes.py`` at seed 0: the same parameter tree and the same first 50 training losses (rtol 1e-5), on
  the main job's two CPU devices.
- A workdir and an export bundle written before segments load, and give the same images, captions and scores
  for the same seeds.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, FIXTURES)

FIRST_LOSSES = r'''
import json, os, sys, tempfile
sys.path.insert(0, os.path.join(sys.argv[1], "configs"))
import shapes
from unimm_jax import configuration
config = shapes.get_config()
configuration.prepare_host(config)
import jax
from unimm_jax import sharding as sharding_lib, train_state
from unimm_jax.data import input_pipeline
mesh, rules = sharding_lib.make_mesh(config.mesh.shape), sharding_lib.rules_of(config)
with tempfile.TemporaryDirectory() as tmp:
  source = input_pipeline.make_source(config, "train")
  toks = input_pipeline.fit_or_load_tokenizers(config, tmp, source)
  it = input_pipeline.train_iterator(input_pipeline.train_dataset(source, toks, batch_size=config.train.batch_size,
                                                      seed=config.seed), config.data.num_threads)
  inputs = train_state.make_step_inputs(config, toks.layout, toks.image.code_features())
  abstract, shardings = train_state.state_shardings(inputs, mesh, rules)
  state = train_state.init_state(inputs, config.seed, mesh, rules)
  step_fn, _ = train_state.compile_steps(inputs, mesh, rules, shardings)
  batch_sh = sharding_lib.batch_sharding(mesh)
  losses = []
  for _ in range(50):
    state, metrics = step_fn(state, {"tokens": sharding_lib.global_batch(next(it)["tokens"], batch_sh)})
    losses.append(float(metrics["loss"]))
tree = {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.params)}
print(json.dumps({"losses": losses, "param_shapes": tree, "devices": jax.device_count()}))
'''


def test_shapes_config_has_the_same_parameters_and_first_50_losses():
  want = json.load(open(os.path.join(FIXTURES, "shapes_first_losses.json")))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", FIRST_LOSSES, os.path.dirname(HERE)], capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["devices"] == want["devices"] == 2
  assert got["param_shapes"] == want["param_shapes"]
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
  """The legacy run copied out (loading must not need to write into the repository)."""
  path = tmp_path_factory.mktemp("legacy")
  shutil.copytree(os.path.join(FIXTURES, "legacy_run"), path / "run")
  return path / "run", dict(np.load(os.path.join(FIXTURES, "legacy_run", "outputs.npz")))


@pytest.mark.parametrize("kind", ["workdir", "bundle"])
def test_a_legacy_workdir_and_bundle_give_the_same_outputs(legacy, kind):
  from record_legacy_run import calls  # pylint: disable=import-outside-toplevel
  from unimm_jax.pipeline import Pipeline  # pylint: disable=import-outside-toplevel
  path, want = legacy
  # A padded batch of 4 rows, not the default 64: each example's output depends only on its own key.
  got = calls(Pipeline.load(path / kind, batch_size=4))
  for name, value in got.items():
    expected = want[f"{kind}/{name}"]
    if name.startswith("score"):
      np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(value), expected, err_msg=name)
