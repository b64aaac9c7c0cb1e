"""The programs compiled for the chips they are for (``unimm_jax.aot``), checked here on a CPU host.

libtpu compiles the real TPU executables (memory, FLOPs, HLO); ``jax.export`` gives the CUDA StableHLO. Where
libtpu has no wheel (macOS, ARM) the TPU checks are skipped and say so; CI's Linux x86 host runs them all.
"""

import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest
from ml_collections.config_flags import config_flags as cf

from unimm_jax import aot, configuration, dry_run
from unimm_jax.models import attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (no wheel for this platform): the TPU "
                                         "compilation checks were not run")


def _config(name):
  path = ROOT / "configs" / f"{name}.py"
  return configuration.validate(cf._LoadConfigModule(name, str(path)).get_config())  # pylint: disable=protected-access


def small_bf16_config(**model):
  """A small bfloat16 model with every attention mask the network has, FSDP over 4 chips."""
  c = configuration.base_config()
  c.data.source, c.data.path = "folder", "/nonexistent"   # never read: the layout comes from the sizes
  c.text.tokenizer, c.text.max_len = "byte", 32
  # 32 + 12x12 = 176 positions: padded to 256 for splash (two key sets: 512), apart from the 128 lanes and head_dim.
  c.image.tokenizer, c.image.size, c.image.patch, c.image.codebook_size = "patch", 96, 8, 1024
  # The MLP 4x d_model, as in the large configs: the head (whose other-modality columns the step skips but the
  # formula counts, as MFU does) is then a realistic share of the FLOPs.
  c.model.update(d_model=384, num_layers=3, num_heads=3, head_dim=128, mlp_dim=1536, max_len=176, dtype="bfloat16",
                 cross_modal_rope=False, directional_heads=1, remat=_config("large_v5e32").model.remat)
  c.model.update(model)
  c.mesh.shape = (1, -1, 1)
  c.train.batch_size = c.eval.batch_size = 8
  return configuration.validate(c)


# ---------------------------------------------------------------------------------------------------------------
# The command's errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topology,words", [
    ("v5x:4x4", ["'v5x:4x4'", "v4", "v5e", "v5p", "v6e"]),
    ("v5e:2x2x2", ["'v5e:2x2x2'", "2 dimensions"]),
    ("v5e", ["'v5e'", "GENERATION:SHAPE"]),
])
def test_a_bad_topology_is_one_line_naming_it(topology, words, capsys):
  assert aot.main(["aot", f"--config={ROOT / 'configs/bench_cpu.py'}", f"--topology={topology}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ")
  for word in words:
    assert word in err


@needs_libtpu
def test_a_mesh_that_does_not_fit_the_topology_is_one_line_naming_both(capsys):
  args = ["aot", f"--config={ROOT / 'configs/bench_cpu.py'}", "--topology=v5e:2x2", "--config.mesh.shape=(3,1,1)"]
  assert aot.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "config.mesh.shape=(3, 1, 1)" in err and "--topology=v5e:2x2" in err and "4 devices" in err


def test_chips_table_names_the_cloud_tpu_generations():
  assert set(aot.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
  assert aot.CHIPS["v5e"].hbm_bytes == 16 * 2**30 and aot.parse_topology("v4:2x2x4")[1] == (2, 2, 4)


# ---------------------------------------------------------------------------------------------------------------
# A small bfloat16 model on a v5e slice: the HLO
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tpu():
  """(report, optimized train-step HLO) of the small config compiled for v5e:2x2."""
  config = small_bf16_config()
  chip, devices = aot.topology_devices("v5e:2x2")
  programs = aot.build(config, devices, "tpu", "v5e:2x2")
  compiled, _, compile_s = aot._compile(programs.train_step, programs.abstract_state, programs.batch)  # pylint: disable=protected-access
  hlo = compiled.as_text()
  report = aot.describe_program(compiled, hlo, chip.hbm_bytes, 0.0, compile_s, len(devices))
  report["model_flops"] = aot.model_flops(programs)
  report["attention"] = programs.method.model.config.attention
  report["seq_len"] = programs.layout.seq_len
  return report, hlo


@needs_libtpu
def test_small_bf16_step_on_tpu_uses_splash_and_bf16_matmuls(small_tpu):
  report, hlo = small_tpu
  assert report["attention"] == "splash"                     # model.attention=auto on TPU
  kernels = report["pallas_kernels"]
  assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
  assert any(k.startswith("splash_mha_dq") for k in kernels) and any(k.startswith("splash_mha_dkv") for k in kernels)
  # No matmul takes a float32 operand: the projections, the head (its float32 logits are cast after the matmul)
  # and attention run in bfloat16; the loss and the norms are elementwise float32.
  assert aot.matmuls_with_float32_operands(hlo) == []
  # FSDP gathers the weights in bfloat16; float32 gathers are only of vectors (norm scales, kept float32).
  gathers = [i for i in aot.instructions(hlo) if i["op"] in ("all-gather", "all-gather-start")]
  assert gathers
  for g in gathers:
    for dtype, dims in aot._SHAPE.findall(g["type"]):  # pylint: disable=protected-access
      assert dtype == "bf16" or len(dims.split(",")) <= 1 or dtype.startswith("s"), g
  # Splash never writes scores: no array ends in [S, S], nor in the padded [S', S'] or [S', 2 S'].
  s, padded = report["seq_len"], 256
  assert s == 176
  scores = [t for t in {i["type"] for i in aot.instructions(hlo)}
            if re.search(rf"\[\d+,[\d,]*\b({s}|{padded}),({s}|{padded}|{2 * padded})\]", t)]   # rank >= 3
  assert scores == [], scores


@needs_libtpu
def test_small_bf16_step_flops_match_the_formula(small_tpu):
  report, _ = small_tpu
  ratio = report["xla_flops_all_devices"] / report["model_flops"]
  assert 0.9 <= ratio <= 1.1, ratio


def test_named_remat_policy_keeps_no_attention_scores_across_the_layer_scan():
  """The XLA path writes [B, N, S, S] float32 scores each layer; the large configs' policy saves named matmul
  outputs only, so no per-example [.., S, S] array is carried from the forward scan to the backward one ('dots'
  carries the scores of every layer)."""
  from unimm_jax import sharding as sharding_lib, train_state  # pylint: disable=g-import-not-at-top
  carried = {}
  for remat in (_config("large_v5e32").model.remat, "dots"):
    config = small_bf16_config(scan_layers=True, remat=remat, attention="xla", num_layers=3, d_model=64,
                               head_dim=16, mlp_dim=128, dtype="float32")
    config.mesh.shape = (1, 1, 1)
    layout = dry_run.planned_layout(config)
    method = train_state.make_step_inputs(config, layout)
    mesh = sharding_lib.single_device_mesh()
    _, shardings = train_state.state_shardings(method, mesh, ())
    abstract, _ = train_state.state_shardings(method, mesh, ())
    step, _ = train_state.compile_steps(method, mesh, (), shardings)
    tokens = jax.ShapeDtypeStruct((8, layout.seq_len), np.int32)
    hlo = step.lower(abstract, {"tokens": tokens}).compile().as_text()
    s, heads = layout.seq_len, config.model.num_heads
    # Per-example [.., B, N, S, S] arrays (scores, their softmax); the masks, [1, N, S, S] constants, may be carried.
    carried[remat] = [t for t in aot.loop_carried_shapes(hlo) if t.endswith(f",{s},{s}]")
                      and np.prod([int(d) for d in t[t.index("[") + 1:-1].split(",")][:-2]) > heads]
  assert carried["dots"], "the check cannot see the scores 'dots' keeps"
  assert carried[_config("large_v5e32").model.remat] == []


# ---------------------------------------------------------------------------------------------------------------
# The large configs fit their slices
# ---------------------------------------------------------------------------------------------------------------
@needs_libtpu
@pytest.mark.parametrize("name", ["large_v5e32", "coco256"])
def test_large_config_fits_its_slice_at_full_size(name):
  config = _config(name)
  report = aot.compile_for_topology(config, config.mesh.topology, sampler=False)
  memory = report["train"]["memory"]
  assert report["attention"] == "splash"
  assert memory["total"] <= 0.9 * memory["hbm"], aot.format_report(report)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------
def test_cuda_export_of_bench_gpu_calls_cudnn_flash_attention_forward_and_backward():
  report = aot.export_cuda(_config("bench_gpu"))
  assert report["attention"] == "cudnn"
  calls = report["custom_calls"]
  assert any(c.startswith("__cudnn$fmha") and not c.endswith("Backward") for c in calls), calls
  assert any(c.startswith("__cudnn$fmha") and c.endswith("Backward") for c in calls), calls


def test_cuda_export_of_a_float32_model_runs_the_xla_path_and_explicit_cudnn_is_refused():
  config = _config("bench_gpu")
  config.model.dtype = "float32"
  report = aot.export_cuda(config)
  assert report["attention"] == "xla" and not any(c.startswith("__cudnn$fmha") for c in report["custom_calls"])
  config.model.attention = "cudnn"
  with pytest.raises(attention.AttentionConfigError, match="config.model.dtype='float32'"):
    aot.export_cuda(config)


def test_concurrent_chunks_are_refused_on_accelerators():
  """Sub-batches only help XLA:CPU's concurrent thunks; on a TPU or GPU they would duplicate the whole graph."""
  from unimm_jax import train_state  # pylint: disable=g-import-not-at-top
  config = _config("bench_cpu")
  assert config.train.concurrent_chunks == 2
  layout = dry_run.planned_layout(config)
  assert train_state.make_step_inputs(config, layout, platform="cpu").concurrent_chunks == 2
  for platform in ("tpu", "gpu"):
    with pytest.raises(configuration.ConfigError, match="concurrent_chunks=2.*set it to 1"):
      train_state.make_step_inputs(config, layout, platform=platform)
