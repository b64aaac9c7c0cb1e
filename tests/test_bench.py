"""``python -m unimm_jax.bench``: the FLOPs formula (by hand and against XLA's count) and the JSON it writes.

Timing itself is not tested (shared machines are noisy); BENCHMARKS.md holds the measured figures.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax import bench, configuration, sharding, train_state
from unimm_jax.sequence import SequenceLayout


def _matmul_heavy_config():
  """Wide enough that matmuls are most of the step's FLOPs (as in real sizes), small enough to compile fast."""
  c = configuration.base_config()
  c.model.update(d_model=128, num_layers=2, num_heads=4, head_dim=32, mlp_dim=384, max_len=80, vocab_multiple=1)
  c.train.batch_size = 4
  return c


def test_flops_formula_equals_a_hand_count():
  c = _matmul_heavy_config()
  layout = SequenceLayout.two_segment(text_vocab=64, image_vocab=256, text_len=16, image_grid=(8, 8))
  method = train_state.make_step_inputs(c, layout)
  abstract, _ = train_state.state_shardings(method, sharding.single_device_mesh(), ())
  d, heads, hd, mlp, L, V = 128, 4, 32, 384, 2, layout.size
  per_layer = 4 * d * heads * hd + 3 * d * mlp          # q, k, v, out; gate, up, down
  matmul_params = L * per_layer + d * V                 # + the output head
  assert bench.matmul_param_count(abstract.params) == matmul_params
  B, S = 4, layout.seq_len
  hand = 6 * matmul_params * B * S + 12 * L * B * S * S * heads * hd
  assert bench.model_flops_per_step(abstract.params, method.model.config, B, S) == hand


def test_flops_formula_is_within_15_percent_of_xla_cost_analysis():
  c = _matmul_heavy_config()
  layout = SequenceLayout.two_segment(text_vocab=64, image_vocab=256, text_len=16, image_grid=(8, 8))
  method = train_state.make_step_inputs(c, layout)
  mesh = sharding.single_device_mesh()
  abstract, shardings = train_state.state_shardings(method, mesh, ())
  step_fn, _ = train_state.compile_steps(method, mesh, (), shardings)
  batch = {"tokens": jax.ShapeDtypeStruct((4, layout.seq_len), jnp.int32)}
  cost = step_fn.lower(abstract, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  formula = bench.model_flops_per_step(abstract.params, method.model.config, 4, layout.seq_len)
  assert abs(formula - xla) / xla < 0.15, (formula, xla)


def test_nominal_peaks_by_device_kind():
  assert bench.nominal_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert bench.nominal_peak("TPU v5 lite") == 197e12
  assert bench.nominal_peak("TPU v5p") == 459e12
  assert bench.nominal_peak("TPU v4") == 275e12
  assert bench.nominal_peak("cpu") is None


def test_bench_cli_writes_train_sample_and_data_figures(tmp_path):
  out = tmp_path / "bench.json"
  tiny = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
          "--config.model.head_dim=16", "--config.model.mlp_dim=64", "--config.train.batch_size=8",
          "--config.data.train_size=200", "--config.data.fit_examples=200"]
  proc = subprocess.run([sys.executable, "-m", "unimm_jax.bench", "--config=configs/shapes.py", *tiny,
                         "--what=train,sample,data", "--steps=3", "--warmup=1", "--sample_batches=2",
                         "--repeats=1", f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MFU" in proc.stdout and "images/s" in proc.stdout
  r = json.loads(out.read_text())
  t = r["train"]
  assert r["devices"] == 2 and t["devices"] == 2        # configs/shapes.py splits the CPU in two, as main does
  for key in ("compile_s", "step_s_median", "step_s_p90", "tokens_per_s", "examples_per_s",
              "measured_peak_flops_per_s", "achieved_flops_per_s", "mfu_vs_measured", "process_peak_rss_bytes"):
    assert np.isfinite(t[key]) and t[key] > 0, key
  assert t["step_s_p90"] >= t["step_s_median"]
  assert t["tokens_per_s"] == t["batch"] * t["seq_len"] / t["step_s_median"]
  assert t["mfu_vs_measured"] == t["achieved_flops_per_s"] / t["measured_peak_flops_per_s"]
  assert t["nominal_peak_flops_per_s"] is None and t["mfu_vs_nominal"] is None     # CPU: no nominal peak
  assert np.isfinite(t["loss"])
  (s,) = r["sample"]
  assert s["batch"] == 2 and set(s["text_to_image"]) == {"16", "32"}
  assert all(v["images_per_s"] > 0 and v["step_over_forward"] > 0 for v in s["text_to_image"].values())
  d = r["data"]
  assert d["batches_per_s"] > 0 and d["headroom"] == d["batches_per_s"] * t["step_s_median"]


def test_kind_rows_flops_count_each_groups_own_positions_and_match_xla():
  """With ``data.kind_rows`` the step computes each group of rows over its own segments: the formula counts that
  (within 15 % of XLA's count of the compiled step), not the covering layout at every row."""
  from test_kind_rows import layout as covering_layout, unified_config  # pylint: disable=g-import-not-at-top
  c = unified_config(**{"model.d_model": 128, "model.num_layers": 2, "model.num_heads": 4, "model.head_dim": 32,
                        "model.mlp_dim": 384, "model.directional_heads": 0,
                        "data.kind_rows": (("caption", 2), ("vqa", 1), ("edit", 1))})
  lay = covering_layout()
  method = train_state.make_step_inputs(c, lay)
  assert len(method.row_groups) == 2    # caption pairs with the questions (63 positions), edits (96)
  mesh = sharding.single_device_mesh()
  abstract, shardings = train_state.state_shardings(method, mesh, ())
  step_fn, _ = train_state.compile_steps(method, mesh, (), shardings)
  batch = {"tokens": jax.ShapeDtypeStruct((c.train.batch_size, lay.seq_len), jnp.int32)}
  cost = step_fn.lower(abstract, batch).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  grouped = bench.step_model_flops(method, abstract.params, c.train.batch_size)
  whole = bench.model_flops_per_step(abstract.params, method.model.config, c.train.batch_size, lay.seq_len)
  assert abs(grouped - xla) / xla < 0.15, (grouped, xla)
  assert whole > 1.25 * grouped
