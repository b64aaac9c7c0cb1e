"""Configs: every file in configs/ validates and traces one step; bad fields stop with a message naming them."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)
from ml_collections.config_flags import config_flags as cf

from unimm_jax import config_schema, configuration, sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
  return cf._LoadConfigModule(path.stem, str(path)).get_config()  # pylint: disable=protected-access


def test_there_are_configs():
  assert CONFIGS, "configs/ holds no config files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_traces_one_train_step(path):
  from unimm_jax import train_state  # pylint: disable=g-import-not-at-top
  config = configuration.validate(_load(path))
  if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
    config.model.attention = "xla"   # cuDNN flash attention traces only for a GPU; the rest of the step is the same
  h, w = configuration.image_token_grid(config)
  # Vocabulary sizes come from fitted tokenizers; any plausible sizes trace the same program shape.
  # (a MASK among the text ids, sequence.mask_id, needs a text vocabulary that holds it: LLaDA's 126,464)
  # (an upstream's special tokens, sequence.special_ids, are text ids too: Lumina-DiMOO's reach 126,355)
  text_vocab = max(64, config.sequence.mask_id + 1, *(i + 1 for i in dict(config.sequence.special_ids).values()))
  layout = sequence.from_config(config, text_vocab=text_vocab, image_vocab=256, image_grid=(h, w))
  method = train_state.make_step_inputs(config, layout)
  state = jax.eval_shape(lambda: train_state.init_state(method, 0))
  batch = {"tokens": jax.ShapeDtypeStruct((config.train.batch_size, layout.seq_len), jnp.int32)}
  new_state, metrics = jax.eval_shape(lambda s, b: train_state.train_step(method, s, b), state, batch)
  assert new_state.step.shape == () and metrics["loss"].shape == ()
  assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)


def _problems(config):
  with pytest.raises(configuration.ConfigError) as info:
    configuration.validate(config)
  return str(info.value)


def test_unknown_key_names_the_field_and_the_closest_one():
  config = configuration.base_config()
  with config.unlocked():
    config.model.num_layer = 4
  msg = _problems(config)
  assert "config.model.num_layer is not a known field" in msg and "did you mean model.num_layers" in msg


def test_wrong_type_names_the_field():
  config = configuration.base_config()
  with config.ignore_type():
    config.model.d_model = "wide"
  msg = _problems(config)
  assert "config.model.d_model='wide'" in msg and "expected int" in msg


def test_inconsistent_sizes_name_the_fields():
  config = configuration.base_config()
  config.model.max_len = 40   # 24 text + 36 image tokens = 60
  assert "config.model.max_len=40 is smaller than config.text.max_len (24) + image tokens (6x6=36) = 60" in \
      _problems(config)
  config = configuration.base_config()
  config.image.patch = 5
  assert "config.image.size=24 is not a multiple of config.image.patch=5" in _problems(config)
  config = configuration.base_config()
  config.diffusion.schedule = "cosnie"
  assert "config.diffusion.schedule='cosnie' is not one of" in _problems(config)
  config = configuration.base_config()
  config.train.batch_size = 0
  assert "config.train.batch_size=0 must be > 0" in _problems(config)
  config = configuration.base_config()
  config.model.directional_heads = 3   # 6 directional heads of the base config's 4
  assert "config.model.directional_heads=3 takes 6 heads" in _problems(config)
  config.model.directional_heads = 1
  config.model.cross_modal_heads = 3
  assert "config.model.cross_modal_heads=3 takes 6 heads" in _problems(config)
  config.model.cross_modal_heads = 0
  config.model.value_positions, config.model.positions = True, "rope"
  assert "config.model.value_positions projects the learned absolute positions" in _problems(config)
  config.model.positions = "rope+learned"   # (with learned positions the option is fine: not in msg below)
  config.model.cross_modal_rope = False
  config.model.attention = "cudnn"
  msg = _problems(config)
  assert "config.model.attention='cudnn' runs cuDNN flash attention" in msg and "value_positions" not in msg
  for field in ("config.model.dtype='float32'", "config.model.cross_modal_rope", "config.model.directional_heads"):
    assert field in msg


def _leaves(config, prefix=""):
  """{dotted name: value} with an open group as one leaf (its dict of names)."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, configuration.ConfigDict) and name not in config_schema.OPEN_GROUPS:
      out.update(_leaves(value, name + "."))
    else:
      out[name] = value.to_dict() if isinstance(value, configuration.ConfigDict) else value
  return out


def test_every_schema_field_has_a_doc_and_a_default_of_its_declared_type():
  for f in config_schema.FIELDS:
    assert f.doc.strip(), f"config.{f.name} has no doc"
    values = f.default.values() if f.open else [f.default]
    assert not f.open or isinstance(f.default, dict), f.name
    for value in values:
      assert type(value) is f.type, f"config.{f.name}: default {value!r} is not a {f.type.__name__}"
    if f.legacy is not None:
      assert type(f.legacy) is f.type, f"config.{f.name}: legacy value {f.legacy!r} is not a {f.type.__name__}"
  assert len({f.name for f in config_schema.FIELDS}) == len(config_schema.FIELDS), "a field is declared twice"
  assert [row[0] for row in configuration.describe_fields()] == [f.name for f in config_schema.FIELDS]


def test_base_config_is_the_schema():
  leaves = _leaves(configuration.base_config())
  assert sorted(leaves) == sorted(f.name for f in config_schema.FIELDS)
  for f in config_schema.FIELDS:
    assert leaves[f.name] == f.default and type(leaves[f.name]) is type(f.default), f.name
  configuration.validate(configuration.base_config())   # every default within its own choices and bounds
  assert "model.d_model" in configuration.STATE_FIELDS and "model.max_len" not in configuration.STATE_FIELDS
  assert configuration.LEGACY_DEFAULTS == {"model.vocab_multiple": 1, "model.fused_qkv": False, "sequence.id_align": 1}


def _bad_value(f):
  """A value of f's type just outside its choices or bounds."""
  if f.choices:
    return "not-a-choice"
  if f.bounds in (">0", ">=0"):
    return f.type(0 if f.bounds == ">0" else -1)
  lo, hi = (float(x) for x in f.bounds[1:-1].split(","))
  if f.bounds[0] == "(":
    return f.type(lo)
  return f.type(hi) if f.bounds[-1] == ")" else f.type(lo - 1)


@pytest.mark.parametrize("f", [f for f in config_schema.FIELDS if f.choices or f.bounds], ids=lambda f: f.name)
def test_a_value_outside_a_fields_choices_or_bounds_is_rejected(f):
  config = configuration.base_config()
  value = _bad_value(f)
  *groups, leaf = f.name.split(".")
  node = config
  for g in groups:
    node = node[g]
  node[leaf] = {"entry": value} if f.open else value    # an open group: the bound holds for each entry
  want = {">0": "must be > 0", ">=0": "must be >= 0"}.get(f.bounds, f"must be in {f.bounds}")
  want = "is not one of" if f.choices else want
  name = f"{f.name}.entry" if f.open else f.name
  assert f"config.{name}={value!r} {want}" in _problems(config)


def test_open_groups_take_any_name_and_round_trip_through_a_saved_config():
  config = configuration.base_config()
  config.diffusion.tasks.edit = 0.3
  config.diffusion.task_roles.edit = "text:clean image:noised"
  config.sequence.segments = (("caption", "text", 24), ("image", "image"))
  configuration.validate(config)
  again = configuration.from_dict(json.loads(config.to_json_best_effort()))
  assert again.to_dict() == config.to_dict()
  assert again.sequence.segments == (("caption", "text", 24), ("image", "image"))   # tuples, not JSON lists
  configuration.check_resumable(config, again)
  # A saved group comes back whole: names it does not hold do not reappear with their defaults.
  config.diffusion.tasks = configuration.ConfigDict({"edit": 1.0})
  again = configuration.from_dict(json.loads(config.to_json_best_effort()))
  assert again.diffusion.tasks.to_dict() == {"edit": 1.0}
  # Values are still checked: weights are numbers with a positive sum, roles are strings.
  config.diffusion.tasks.edit = 0.0
  config.diffusion.task_roles.other = 3
  msg = _problems(config)
  assert "config.diffusion.task_roles.other=3 has type int, expected str" in msg
  config.diffusion.task_roles = configuration.ConfigDict()
  assert "config.diffusion.tasks={'edit': 0.0} must be non-negative with a positive sum" in _problems(config)


def test_an_unknown_key_in_a_closed_group_is_still_rejected_with_the_closest_field():
  config = configuration.base_config()
  with config.unlocked():
    config.diffusion.schedul = "cosine"
  assert "config.diffusion.schedul is not a known field; did you mean diffusion.schedule?" in _problems(config)
  with pytest.raises(configuration.ConfigError, match="config.model.num_layer is not a known field; did you mean "
                                                      "model.num_layers"):
    configuration.from_dict({"model": {"num_layer": 2}})


def test_a_saved_config_without_a_legacy_field_gets_the_layout_from_before_it():
  saved = json.loads(configuration.base_config().to_json_best_effort())
  del saved["model"]["fused_qkv"], saved["sequence"], saved["diffusion"]["task_roles"]
  config = configuration.from_dict(saved)
  assert config.model.fused_qkv is False and config.model.vocab_multiple == 128
  assert config.sequence.segments == () and config.diffusion.task_roles.to_dict() == {}
  with pytest.raises(configuration.ConfigError, match=r"config.model.fused_qkv: True here, False in the checkpoint"):
    configuration.check_resumable(configuration.base_config(), config)


def test_saved_tokenizer_that_disagrees_with_the_config_is_an_error():
  from unimm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = configuration.base_config()
  images = np.zeros((4, 24, 24, 3), np.uint8)
  image_tok = tokenizers.PatchTokenizer.fit(images, 24, 3, 4, 4, 1024)
  text_tok = tokenizers.WordTokenizer.fit(["a red circle"])
  configuration.check_tokenizers(config, text_tok, image_tok)   # agrees: no error
  config.image.patch = 2
  config.model.max_len = 200
  with pytest.raises(configuration.ConfigError, match=r"config.image.patch=2 but the workdir's saved image "
                                                      r"tokenizer has patch=4"):
    configuration.check_tokenizers(config, text_tok, image_tok)


def _main(*args, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "unimm_jax.main", f"--config={ROOT / 'configs/shapes.py'}",
                         f"--workdir={tmp_path / 'w'}", *args], capture_output=True, text=True, env=env,
                        timeout=120, cwd=ROOT)


def test_main_stops_on_a_bad_field_before_compiling(tmp_path):
  out = _main("--config.model.max_len=8", tmp_path=tmp_path)
  assert out.returncode == 2
  assert "config.model.max_len=8 is smaller than" in out.stderr
  assert not (tmp_path / "w").exists(), "nothing may be written for an invalid config"
  out = _main("--config.model.num_layer=2", tmp_path=tmp_path)
  assert out.returncode == 2
  assert "config.model.num_layer is not a known field; did you mean model.num_layers?" in out.stderr
  assert "Traceback" not in out.stderr


_FAULTS_SCRIPT = r"""
import ctypes, resource, sys
from unimm_jax import configuration
applied = configuration.retain_host_memory(sys.argv[1] == "on")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc.argtypes = [ctypes.c_size_t]
size = int(sys.argv[2]) << 20                     # MiB (64: above glibc's largest mmap threshold, 32)
def faults_of_one_allocation():                   # malloc itself, as XLA:CPU does (numpy would madvise huge pages)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_allocation()                        # the first one faults in either case
print(applied, min(faults_of_one_allocation() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what is tuned")
def test_retained_host_memory_is_reused_without_page_faults():
  """mesh.retain_host_memory: a freed 64 MiB block is reused by the next allocation of that size (no fresh pages,
  so almost no page faults); by default glibc unmaps it and the next one faults in all 16k pages again."""
  def run(mode):
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode, "64"], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])
  applied, retained = run("on")
  if not applied:
    pytest.skip("the C library is not glibc: retain_host_memory is a no-op here")
  _, default = run("off")
  pages = (64 << 20) // 4096
  assert default > pages // 2, default        # unmapped on free, faulted in again
  assert retained < pages // 20, retained     # reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what is tuned")
def test_retained_host_memory_keeps_a_free_heap_top_above_2_gib():
  """The largest positive trim threshold (2 GiB) let glibc return a free heap top above it to the OS, and the
  bench_cpu step paid 366k page faults every few steps for it; the threshold is now unlimited."""
  out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, "on", "2600"], capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  if out[0] != "True":
    pytest.skip("the C library is not glibc: retain_host_memory is a no-op here")
  pages = (2600 << 20) // 4096
  assert int(out[1]) < pages // 20, out       # a 2.6 GiB block freed and allocated again: its pages kept


@pytest.mark.parametrize("kind", ["magvitv2", "vqgan"])
def test_an_image_size_a_pretrained_tokenizer_cannot_take_is_a_config_error(kind):
  """Without a checkpoint at image.tokenizer_path the published geometry (16x downsampling) is assumed."""
  config = configuration.base_config()
  config.image.tokenizer, config.image.size, config.model.image_code_features = kind, 40, False
  assert f"config.image.size=40 is not a multiple of the {kind} tokenizer's downsampling 16" in _problems(config)


def test_a_config_resumes_its_own_saved_copy_open_groups_included():
  """The workdir's config.json read back (open groups such as sequence.special_ids, empty or not, come back as
  plain dicts) must resume: only a real change of a state field stops a run."""
  import json
  # (main's config is locked, as config_flags gives it; a locked ConfigDict never equals an unlocked one)
  config = configuration.base_config()
  config.sequence.special_ids = {"<t2i>": 5}
  saved = configuration.from_dict(json.loads(json.dumps(config.to_dict())))
  config.lock()
  configuration.check_resumable(config, saved)
  plain = configuration.base_config()
  plain.lock()
  configuration.check_resumable(plain, configuration.from_dict(json.loads(json.dumps(plain.to_dict()))))
  config.unlock()
  config.sequence.special_ids = {"<t2i>": 6}
  with pytest.raises(configuration.ConfigError, match="sequence.special_ids"):
    configuration.check_resumable(config, saved)
