"""LoRA: low-rank adapters trained on a frozen base that ``init.from`` gives (unimm_jax/models/lora.py).

One LoRA run (module fixture) on the tiny base run of ``test_init_from.py`` is the subject of the lifecycle tests:
adapters only in checkpoints, exact resume, damaged-checkpoint fallback, merged export.
"""

import shutil

import jax
import numpy as np
import pytest

from unimm_jax import bundle, checkpointing, configuration, export, init_from, train, train_state
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.models import lora
from unimm_jax.models import params as params_lib
from unimm_jax.pipeline import Pipeline
# The base run (a module fixture, so built once per file) and the helpers of the init.from tests.
from test_init_from import base, _assert_trees_equal, _config, _host, _method_and_target  # noqa: F401

LORA = {"model.lora_rank": 4, "model.lora_alpha": 8.0}


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
  """(workdir, config, report) of a 6-step LoRA run on the base (checkpoints at steps 3 and 6)."""
  path = tmp_path_factory.mktemp("lora") / "run"
  config = _config(**LORA, **{"init.from": str(base[0])})
  return path, config, train.train_and_evaluate(config, path)


def test_lora_settings_that_cannot_run_are_named():
  with pytest.raises(configuration.ConfigError, match=r"lora_rank=4 trains adapters on a frozen base: set "
                                                      r"config.init.from=PATH"):
    _config(**LORA)
  with pytest.raises(configuration.ConfigError, match=r"'head' cannot take adapters"):
    _config(**LORA, **{"init.from": "x", "model.lora_targets": ("qkv", "head")})
  with pytest.raises(configuration.ConfigError, match=r"'query' is part of the fused q/k/v projection"):
    _config(**LORA, **{"init.from": "x", "model.lora_targets": ("query",)})
  _config(**LORA, **{"init.from": "x", "model.lora_targets": ("query", "wo"), "model.fused_qkv": False})


def test_lora_starts_at_the_base_model_and_trains_the_adapters_only(base):
  path, _ = base
  config = _config(**LORA, **{"init.from": str(path)})
  method, abstract = _method_and_target(config, path)
  weights, _ = init_from.load(path, abstract.weights)
  want = _host(weights)
  state = train_state.init_state(method, 0, weights=weights)
  tokens = input_pipeline.load_tokenizers(path, config).layout.random_tokens(np.random.default_rng(0), 4)
  network = lambda p: method.model.apply({"params": state.network_params(p)}, tokens)
  plain = train_state.make_model(_config(), method.layout)
  np.testing.assert_array_equal(network(state.params), plain.apply({"params": want}, tokens))   # B = 0

  base_shapes = {tuple(x.shape) for x in jax.tree.leaves(want) if x.ndim >= 2}
  opt_shapes = [tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert opt_shapes and not base_shapes & set(opt_shapes)           # no optimizer state for the base
  assert params_lib.param_count(state.opt_state) < 2 * params_lib.param_count(state.params) + 8

  mesh = sharding_lib.single_device_mesh()
  _, shardings = train_state.state_shardings(method, mesh, ())
  step_fn, _ = train_state.compile_steps(method, mesh, (), shardings)
  source = input_pipeline.make_source(config, "train")
  data = input_pipeline.train_iterator(input_pipeline.train_dataset(
      source, input_pipeline.load_tokenizers(path, config), batch_size=config.train.batch_size, seed=0), 0)
  adapters = _host(state.params)
  for _ in range(3):
    state, metrics = step_fn(state, {"tokens": next(data)["tokens"]})
    assert np.isfinite(float(metrics["loss"]))
  _assert_trees_equal(state.base, want)                              # the base: bit for bit
  for (key, new), old in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(adapters)):
    assert not np.array_equal(np.asarray(new), old), jax.tree_util.keystr(key)   # every adapter moved


def test_a_lora_checkpoint_holds_the_adapters_only(lora_run, base):
  path, _, report = lora_run
  manager = checkpointing.weights_manager(path)
  try:
    assert manager.all_steps() == [3, 6]
    saved = manager.item_metadata(6)["state"]
    saved = getattr(saved, "tree", saved)
  finally:
    manager.close()
  assert set(saved) == {"step", "params", "opt_state", "ema_params", "rng"}     # no base
  names = list(bundle.flatten(saved["params"]))
  assert names == list(bundle.flatten(saved["ema_params"]))
  assert len(names) == 2 * 5 * 2 and all(n.rsplit("/", 1)[1] in lora.ADAPTERS for n in names), names
  adapter_shapes = {tuple(m.shape) for m in jax.tree.leaves(saved["params"])}
  assert all(tuple(m.shape) in adapter_shapes or not m.shape for m in jax.tree.leaves(saved["opt_state"]))
  trained = params_lib.param_count(saved["params"])
  assert report["trained_param_count"] == trained < report["param_count"] / 8
  assert params_lib.param_count(saved) < 4 * trained + 8   # adapters, their EMA, two moments; step, counts, rng
  base_count = params_lib.param_count(checkpointing.restore_weights(base[0])[0])
  assert report["param_count"] == base_count


def _interrupted_copy(source, target, step):
  """``target``: the workdir ``source`` as it was after its checkpoint at ``step`` (the later ones removed)."""
  shutil.copytree(source, target)
  for later in (target / "checkpoints").iterdir():
    if later.name.isdigit() and int(later.name) > step:
      shutil.rmtree(later)
  (target / "report.json").unlink()


def test_a_resumed_lora_run_equals_the_uninterrupted_one(lora_run, tmp_path):
  path, config, full = lora_run
  assert len(full["history"]) == 6
  _interrupted_copy(path, tmp_path / "run", 3)
  resumed = train.train_and_evaluate(config, tmp_path / "run")
  assert resumed["history"] == full["history"][3:]              # bit for bit: adapters, optimizer, RNG and data
  assert resumed["val_bits_per_token"] == full["val_bits_per_token"]


def test_a_damaged_lora_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(lora_run, tmp_path):
  path, config, full = lora_run
  shutil.copytree(path, tmp_path / "run")
  (tmp_path / "run" / "report.json").unlink()
  for p in (tmp_path / "run" / "checkpoints" / "6" / "state").rglob("*"):
    if p.is_file():
      p.write_bytes(b"not a checkpoint")
  resumed = train.train_and_evaluate(config, tmp_path / "run")
  assert resumed["history"] == full["history"][3:]              # from step 3, as the run that was never damaged
  assert (tmp_path / "run" / "checkpoints" / "6.damaged").is_dir()


def test_the_merged_export_gives_the_adapted_models_logits(lora_run, base, tmp_path):
  path, config, _ = lora_run
  method, abstract = _method_and_target(config, path)
  weights, _ = init_from.load(base[0], abstract.weights)
  adapters, step = checkpointing.restore_weights(path, "ema_params")
  tokens = method.layout.random_tokens(np.random.default_rng(1), 8)
  tokens[:, ::3] = method.layout.mask_id
  adapted = method.model.apply({"params": lora.combine(weights, adapters)}, tokens)   # the network trained

  workdir_pipe = Pipeline.load(path)
  assert workdir_pipe.step == step == 6
  merged = workdir_pipe.model.apply({"params": workdir_pipe.params}, tokens)
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
  base_logits = workdir_pipe.model.apply({"params": weights}, tokens)
  assert np.abs(np.asarray(adapted) - np.asarray(base_logits)).max() > 1e-3   # the adapters changed the model

  meta = export.export(path, tmp_path / "bundle")
  assert list(meta["tensors"]) == list(bundle.flatten(weights))               # the base's names, no adapters
  bundle_pipe = Pipeline.load(tmp_path / "bundle")
  np.testing.assert_array_equal(bundle_pipe.model.apply({"params": bundle_pipe.params}, tokens), merged)
