"""Importing and exporting LLaDA-class backbones (``python -m unimm_jax.convert``), checked against a tiny
checkpoint written in the upstream's exact layout and the upstream's forward pass in numpy (llada_upstream.py)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import llada_upstream as up  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ids(cfg, batch=3, seq=16, seed=1):
  """Random token ids with about a third MASK (the model's inputs while it denoises)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 27, (batch, seq))
  ids[rng.random((batch, seq)) < 0.35] = cfg["mask_token_id"]
  ids[:, 0] = 100    # <|startoftext|>
  return ids.astype(np.int32)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  cfg = up.tiny_upstream_config()
  tensors = up.random_tensors(cfg)
  src = tmp_path_factory.mktemp("llada") / "hf"
  up.write_checkpoint(src, cfg, tensors)
  return src, cfg, tensors


@pytest.fixture(scope="module")
def imported(upstream, tmp_path_factory):
  from unimm_jax import convert
  src, _, _ = upstream
  out = tmp_path_factory.mktemp("bundle") / "llada"
  meta = convert.import_checkpoint("llada", src, out, seq_len=16)
  return out, meta


def test_imported_logits_match_the_upstream_forward(upstream, imported):
  from unimm_jax import Pipeline
  _, cfg, tensors = upstream
  out, meta = imported
  pipe = Pipeline.load(out)
  ids = _ids(cfg)
  ours = np.asarray(pipe.model.apply({"params": pipe.params}, ids))
  ref = up.reference_logits(cfg, tensors, ids)
  assert ours.shape == ref.shape == (3, 16, 120)
  assert np.abs(ref).max() > 1.0     # logits large enough that a wrong convention would show
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # What was recorded: the architecture in unimm_jax's terms, and the upstream's config and dtypes.
  model = meta["config"]["model"]
  assert (model["rope_layout"], model["embedding_scale"], model["norm_eps"], model["restrict_output"]) == \
      ("sequence", 1.0, 1e-5, False)
  assert meta["config"]["sequence"]["mask_id"] == 102 and pipe.layout.mask_id == 102 and pipe.layout.size == 120
  assert meta["source"]["config"] == cfg
  assert set(meta["source"]["tensor_dtypes"].values()) == {"BF16"}
  # The upstream tokenizer travels with the bundle: its own ids, its pad token.
  text = pipe.tokenizers.text
  assert text.kind == "hf" and text.pad_id == 101 and text.vocab_size == 120
  assert list(text.encode("the red circle", 5)) == [1, 3, 6, 101, 101]


def test_scanned_unfused_target_config_gives_the_same_logits(upstream, tmp_path):
  """The same checkpoint into another layout of the parameters (a stack over layers, separate q/k/v)."""
  from unimm_jax import Pipeline, configuration, convert
  src, cfg, tensors = upstream
  config = convert.llada.apply_backbone(configuration.base_config(), cfg, 16)
  config.model.scan_layers, config.model.fused_qkv = True, False
  convert.import_checkpoint("llada", src, tmp_path / "b", config)
  pipe = Pipeline.load(tmp_path / "b")
  assert "blocks" in pipe.params and pipe.params["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
  ids = _ids(cfg, seed=2)
  np.testing.assert_allclose(np.asarray(pipe.model.apply({"params": pipe.params}, ids)),
                             up.reference_logits(cfg, tensors, ids), atol=1e-4, rtol=0)


def test_a_target_config_with_masked_heads_is_refused_before_anything_is_written(upstream, tmp_path):
  """LLaDA's attention has no per-head masks: a target config with directional or cross-modal heads would import
  weights that compute something else, so the import names both fields and writes nothing."""
  from unimm_jax import configuration, convert
  src, cfg, _ = upstream
  config = convert.llada.apply_backbone(configuration.base_config(), cfg, 16)
  config.model.directional_heads, config.model.cross_modal_heads = 1, 1
  with pytest.raises(convert.ConvertError, match="directional_heads=1.*cross_modal_heads=1"):
    convert.import_checkpoint("llada", src, tmp_path / "b", config)
  assert not (tmp_path / "b").exists()


def test_import_export_import_is_bit_exact(upstream, imported, tmp_path):
  from unimm_jax import Pipeline, convert
  from unimm_jax import safetensors_io as st
  src, cfg, tensors = upstream
  out, _ = imported
  hf = tmp_path / "hf_back"
  files = convert.export_checkpoint("llada", out, hf, max_shard_bytes=40_000)   # several shards and an index
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
  assert json.loads((hf / "config.json").read_text()) == cfg
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (hf / name).read_text() == (src / name).read_text()
  back = st.CheckpointReader(hf)
  assert back.names() == sorted(tensors)
  for name, x in tensors.items():
    y = back.read(name)
    assert y.dtype == x.dtype and y.shape == x.shape, name
    assert y.tobytes() == x.tobytes(), name
  again = convert.import_checkpoint("llada", hf, tmp_path / "again", seq_len=16)
  first, second = Pipeline.load(out).params, Pipeline.load(tmp_path / "again").params
  import jax
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert again["tensors"] == json.loads((out / "model.json").read_text())["tensors"]


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("damage, message", [
    ("config", "config.json n_layers=2 but config.model.num_layers=3"),
    ("missing_shard", "missing shard"),
    ("shape", "model.transformer.blocks.1.ff_proj.weight has shape [40, 32], the config makes [48, 32]"),
    ("dtype", "model.transformer.ln_f.weight has dtype int64, expected a float"),
    ("unknown", "unknown tensor model.transformer.blocks.0.extra.weight"),
])
def test_a_bad_checkpoint_stops_the_import_with_one_line_and_writes_nothing(upstream, tmp_path, damage, message):
  src, cfg, tensors = upstream
  bad = tmp_path / "bad"
  tensors = dict(tensors)
  cli_config = []
  if damage == "config":
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import json\nfrom unimm_jax import configuration\nfrom unimm_jax.convert import llada\n"
        f"def get_config():\n  c = llada.apply_backbone(configuration.base_config(), {json.dumps(cfg)!r} and "
        f"json.loads({json.dumps(json.dumps(cfg))}), 16)\n  c.model.num_layers = 3\n  return c\n")
    cli_config = [f"--config={cfg_file}"]
    up.write_checkpoint(bad, cfg, tensors)
  elif damage == "missing_shard":
    up.write_checkpoint(bad, cfg, tensors)
    (bad / "model-00002-of-00002.safetensors").unlink()
  else:
    if damage == "shape":
      tensors["model.transformer.blocks.1.ff_proj.weight"] = tensors["model.transformer.blocks.1.ff_proj.weight"][:40]
    elif damage == "dtype":
      tensors["model.transformer.ln_f.weight"] = np.ones(32, np.int64)
    else:
      tensors["model.transformer.blocks.0.extra.weight"] = tensors["model.transformer.ln_f.weight"]
    up.write_checkpoint(bad, cfg, tensors)
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "-m", "unimm_jax.convert", "import", "--format=llada", f"--src={bad}",
                        f"--out={out}", "--seq_len=16", *cli_config], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2, run.stderr[-2000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], run.stderr[-2000:]
  assert not out.exists() and not (tmp_path / "out.partial").exists()


SHARDED = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import llada_upstream as up
from unimm_jax import configuration, convert, sharding
from unimm_jax.models import transformer
src = sys.argv[2]
cfg = json.load(open(os.path.join(src, "config.json")))
config = convert.llada.apply_backbone(configuration.base_config(), cfg, 16)
config.mesh.shape = (2, 2, 2)
imported = convert.import_params("llada", src, config)
layout = imported.tokenizers.layout
params = {k: v for k, v in imported.params.items()}
specs = {k: str(v.sharding.spec) for k, v in params.items()}
model = transformer.from_config(config, layout)
tree = __import__("unimm_jax.bundle", fromlist=["x"]).unflatten(params)
ids = np.asarray(json.loads(sys.argv[3]), np.int32)
batch = jax.device_put(ids, sharding.batch_sharding(imported.mesh))
with sharding.scope(imported.mesh, sharding.rules_of(config)):
  logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(tree, batch)
json.dump({"logits": np.asarray(logits).tolist(), "specs": specs,
           "devices": len(params["token_embedding"].sharding.device_set)}, open(sys.argv[4], "w"))
'''


def test_import_onto_eight_devices_places_shards_and_matches_the_reference(upstream, tmp_path):
  src, cfg, tensors = upstream
  ids = _ids(cfg, batch=4, seed=3)
  script = tmp_path / "sharded.py"
  script.write_text(SHARDED)
  out = tmp_path / "out.json"
  run = subprocess.run([sys.executable, str(script), os.path.dirname(__file__), str(src), json.dumps(ids.tolist()),
                        str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 8
  assert "tensor" in result["specs"]["block_0/attn/qkv/kernel"] and "fsdp" in result["specs"]["token_embedding"]
  np.testing.assert_allclose(np.asarray(result["logits"]), up.reference_logits(cfg, tensors, ids), atol=1e-4, rtol=0)


def _prompt_and_answer(upstream, directory):
  """The imported model over [prompt (8) | answer (8)], and a batch of 3 prompts without MASK."""
  from unimm_jax import Pipeline, configuration, convert
  src, cfg, _ = upstream
  config = convert.llada.apply_backbone(configuration.base_config(), cfg, 16)
  config.sequence.segments = (("prompt", "text", 8), ("answer", "text", 8))
  config.diffusion.tasks = {"answer": 1.0}
  config.diffusion.task_roles = {"answer": "prompt:clean answer:noised"}
  convert.import_checkpoint("llada", src, directory, config)
  prompt = _ids(cfg, batch=3, seq=8, seed=4)
  prompt[prompt == cfg["mask_token_id"]] = 5      # a prompt holds no MASK
  return Pipeline.load(directory), prompt


LOW_CONFIDENCE = dict(temperature=0.0, confidence_noise=0.0, reveal_schedule="uniform", as_ids=True)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_semi_autoregressive_low_confidence_decoding_equals_the_upstream_generate(upstream, tmp_path, cfg_scale):
  """LLaDA's decoding on the imported model: a prompt segment given, the answer generated in blocks of 4, 2 steps a
  block, low-confidence remasking (uniform reveal counts, argmax, no noise), with and without its guidance."""
  _, cfg, tensors = upstream
  pipe, prompt = _prompt_and_answer(upstream, tmp_path / "b")
  ours = pipe.complete({"prompt": prompt}, ["answer"], steps=2, block_length=4, guidance_scale=cfg_scale,
                       **LOW_CONFIDENCE)
  ref = up.reference_generate(cfg, tensors, prompt, steps=4, gen_length=8, block_length=4, cfg_scale=cfg_scale)
  np.testing.assert_array_equal(ours["answer"], ref[:, 8:])
  assert len(set(map(tuple, ref[:, 8:].tolist()))) > 1     # the examples differ: a real comparison


def test_blocks_with_the_dual_cache_and_threshold_decoding_on_the_import(upstream, tmp_path):
  """Every speed-up at once on the imported model: blocks, Fast-dLLM's dual cache (the prompt's and the other
  blocks' keys and values reused within a block) and threshold decoding. With the threshold off (low-confidence
  remasking) and the cache refreshed every step, the upstream's tokens exactly; cached within the block, every
  answer position is filled, the prompt never changes, and the threshold sampler's passes stay within its bound."""
  _, cfg, tensors = upstream
  pipe, prompt = _prompt_and_answer(upstream, tmp_path / "b")
  ref = up.reference_generate(cfg, tensors, prompt, steps=4, gen_length=8, block_length=4)[:, 8:]
  refreshed = pipe.complete({"prompt": prompt}, ["answer"], steps=2, block_length=4, cache="dual", refresh_every=1,
                            **LOW_CONFIDENCE)
  np.testing.assert_array_equal(refreshed["answer"], ref)
  for method in ("confidence", "threshold"):
    cached = pipe.complete({"prompt": prompt}, ["answer"], steps=4, block_length=4, cache="dual", method=method,
                           threshold=0.5, **LOW_CONFIDENCE)["answer"]
    assert cached.shape == (3, 8) and (cached != pipe.layout.mask_id).all()
    assert ((pipe.last_forward_passes >= 2) & (pipe.last_forward_passes <= 8)).all()   # 1..4 a block
  uncached = pipe.complete({"prompt": prompt}, ["answer"], steps=4, block_length=4, method="threshold",
                           threshold=0.5, **LOW_CONFIDENCE)["answer"]
  every_step = pipe.complete({"prompt": prompt}, ["answer"], steps=4, block_length=4, method="threshold",
                             threshold=0.5, cache="dual", refresh_every=1, **LOW_CONFIDENCE)["answer"]
  np.testing.assert_array_equal(every_step, uncached)


def test_fine_tune_the_import_with_lora_then_export_it_back(upstream, imported, tmp_path):
  """The trainer on an imported backbone (a text-only layout; shapes captions as its text): LoRA from the bundle
  for a few steps, then the adapted model exported in the upstream layout and imported again gives its logits."""
  from unimm_jax import Pipeline, configuration, convert, train
  _, cfg, _ = upstream
  bundle_dir, meta = imported
  config = configuration.from_dict(meta["config"])
  config.init["from"] = str(bundle_dir)
  config.model.lora_rank, config.model.lora_alpha = 4, 8.0
  config.train.steps, config.train.batch_size, config.train.log_every = 3, 8, 1
  config.optim.warmup_steps, config.optim.learning_rate = 1, 1e-2
  config.eval.every_steps, config.ckpt.every_steps, config.eval.batch_size = 3, 3, 8
  config.data.val_size, config.mesh.cpu_devices = 16, 0
  report = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert report["step"] == 3 and np.isfinite(report["val_bits_per_token"]["text"])
  tuned = Pipeline.load(tmp_path / "run")
  base = Pipeline.load(bundle_dir)
  ids = _ids(cfg, seed=5)
  tuned_logits = np.asarray(tuned.model.apply({"params": tuned.params}, ids))
  assert np.abs(tuned_logits - np.asarray(base.model.apply({"params": base.params}, ids))).max() > 1e-3
  files = convert.export_checkpoint("llada", tmp_path / "run", tmp_path / "hf", dtype="float32")
  assert "config.json" in files and "tokenizer.json" in files
  assert json.loads((tmp_path / "hf" / "config.json").read_text()) == cfg   # the imported model's own config
  convert.import_checkpoint("llada", tmp_path / "hf", tmp_path / "again", seq_len=16)
  again = Pipeline.load(tmp_path / "again")
  np.testing.assert_allclose(np.asarray(again.model.apply({"params": again.params}, ids)), tuned_logits,
                             atol=1e-5, rtol=0)
