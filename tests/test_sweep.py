"""launch.sweep end to end: a 2x2 grid of tiny main jobs, the results table, the plot, skip and resume."""

import csv
import math
import os
import subprocess
import sys

import pytest
from etils import epath

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.head_dim": 16, "model.mlp_dim": 64,
        "train.steps": 4, "train.batch_size": 16, "train.log_every": 2, "optim.warmup_steps": 1,
        "eval.every_steps": 2, "eval.batch_size": 32, "eval.num_generate": 4, "ckpt.every_steps": 2,
        "data.val_size": 64, "data.train_size": 2000, "data.fit_examples": 500, "mesh.cpu_devices": 0}
SWEEP_FILE = f"""
from launch.sweep import grid

def get_sweep():
  return {{"base": "configs/shapes.py", "common": {TINY!r},
          "variants": grid({{"diffusion.schedule": ["linear", "cosine"],
                             "diffusion.shared_time": {{"indep": False, "shared": True}}}})}}
"""


def test_grid_names_and_overrides():
  variants = sweep.grid({"diffusion.schedule": ["linear", "cosine"], "drop": {"d0": {"a.b": 0, "a.c": 1}},
                         "diffusion.shared_time": [False, True]})
  assert [n for n, _ in variants] == ["linear-d0-false", "linear-d0-true", "cosine-d0-false", "cosine-d0-true"]
  assert variants[3][1] == {"diffusion.schedule": "cosine", "a.b": 0, "a.c": 1, "diffusion.shared_time": True}


def test_shipped_sweeps_resolve_to_valid_configs():
  for name, count in (("schedule_time", 6), ("guidance_dropout", 3)):
    spec = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", f"{name}.py"))
    variants = sweep.resolve(spec)
    assert len(variants) == count and len({n for n, _, _ in variants}) == count
  rates = [c.diffusion.tasks.image_only + c.diffusion.tasks.text_only for _, _, c in variants]
  assert rates == pytest.approx([0.0, 0.1, 0.3])


def test_tpu_backend_runs_each_variant_through_launch_tpu_on_a_gs_root(tmp_path):
  cmd = sweep.variant_command("tpu", "configs/shapes.py", "gs://b/sweep/cosine-indep",
                              {"diffusion.schedule": "cosine", "diffusion.shared_time": False},
                              ["--name=unimm", "--zone=z"])
  assert cmd[1:] == ["-m", "launch.tpu", "run", "--name=unimm", "--zone=z", "--", "--config=configs/shapes.py",
                     "--workdir=gs://b/sweep/cosine-indep", "--config.diffusion.schedule=cosine",
                     "--config.diffusion.shared_time=False"]
  (tmp_path / "s.py").write_text('def get_sweep():\n  return {"base": "configs/shapes.py", "variants": [("a", {})]}\n')
  with pytest.raises(ValueError, match="gs://"):
    sweep.sweep(str(tmp_path / "s.py"), str(tmp_path / "root"), backend="tpu")


def test_a_bad_field_fails_before_anything_runs(tmp_path):
  (tmp_path / "bad.py").write_text('def get_sweep():\n  return {"base": "configs/shapes.py", '
                                   '"variants": [("a", {"diffusion.schedul": "cosine"})]}\n')
  with pytest.raises(Exception, match="did you mean diffusion.schedule"):
    sweep.resolve(sweep.load_sweep(str(tmp_path / "bad.py")))


def _run(sweep_file, root):
  return subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={sweep_file}", f"--root={root}",
                         "--parallel=2"], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_two_by_two_sweep_writes_a_table_of_four_real_rows_and_skips_finished_variants(tmp_path):
  sweep_file = tmp_path / "tiny.py"
  sweep_file.write_text(SWEEP_FILE)
  root = tmp_path / "sweep"
  proc = _run(sweep_file, root)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["linear-indep", "linear-shared", "cosine-indep", "cosine-shared"]
  for r in rows:
    assert r["step"] == "4"
    for key in ("val_bits_text", "val_bits_image", "tokens_per_s", "wall_s"):
      assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
    for key in ("t2i_accuracy", "i2t_accuracy", "t2i_attributes"):
      assert 0.0 <= float(r[key]) <= 1.0
    # None (empty) when no caption of the tiny model parses: evaluate.py has no attributes to count then.
    assert r["i2t_attributes"] == "" or 0.0 <= float(r["i2t_attributes"]) <= 1.0
  assert rows[3]["overrides"] == "diffusion.schedule=cosine diffusion.shared_time=True"
  # Variants differ (their own configs ran): the schedules give different val figures.
  assert len({r["val_bits_text"] for r in rows}) == 4
  table = (root / "results.md").read_text()
  assert table.count("\n| ") == 6 and "cosine-shared" in table          # header, rule, four rows
  assert (root / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Run again: every variant is finished, nothing runs, the same table comes back.
  first_csv = (root / "results.csv").read_text()
  again = _run(sweep_file, root)
  assert again.returncode == 0 and again.stdout.count("skip ") == 4 and "0 to run" in again.stdout
  assert (root / "results.csv").read_text() == first_csv
  # A variant cut off after its last checkpoint (no report yet) is not finished: the next sweep runs main again,
  # which resumes from that checkpoint (tests/test_lifecycle.py tests the resume itself).
  name, overrides, config = sweep.resolve(sweep.load_sweep(str(sweep_file)))[3]
  assert sweep.is_finished(epath.Path(root / name), config)
  os.remove(root / name / "report.json")
  assert not sweep.is_finished(epath.Path(root / name), config)
  assert sweep.variant_command("local", "configs/shapes.py", str(root / name), overrides)[-2:] == [
      "--config.diffusion.schedule=cosine", "--config.diffusion.shared_time=True"]
