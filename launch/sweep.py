"""Ablations as one command: ``python -m launch.sweep --sweep=configs/sweeps/NAME.py --root=DIR``.

A sweep file names a base config and its variants (``configs/sweeps/schedule_time.py`` is an example)::

    from launch.sweep import grid

    def get_sweep():
      return {
          "base": "configs/shapes.py",
          "common": {"train.steps": 2000},                  # optional: overrides of every variant
          "variants": grid({"diffusion.schedule": ["linear", "cosine"],
                            "diffusion.shared_time": {"indep": False, "shared": True}}),
      }

``variants`` is a list of ``(name, {field: value})``; :func:`grid` builds the product of several axes with
readable names (``linear-indep``, ...). Every variant runs the main job into ``DIR/<name>/`` (``--backend=local``:
a subprocess here, ``--parallel`` at a time; ``--backend=tpu``: ``python -m launch.tpu run`` on one slice, one
after the other). A variant whose report is complete (trained to its ``train.steps`` and scored) is skipped; an
unfinished one is run again with the same command, so it resumes from its newest checkpoint. Then the sweep
writes, from the variants' ``report.json``:

* ``DIR/results.md`` and ``DIR/results.csv``: one row per variant with its overrides, final val bits/token of
  text and image, text->image and image->text accuracy (and their mean per-attribute accuracy), training
  tokens/s and training wall time;
* ``DIR/val_curves.png``: every variant's val bits/token against step (text and image side by side).

``--set=field=value`` (repeatable) changes a field of every variant, e.g. to run a sweep at a smaller size;
results of different ``--set`` belong in different roots. All files of the root go through epath (``gs://``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent import futures
from typing import Any, Sequence

from etils import epath

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("variant", "overrides", "step", "val_bits_text", "val_bits_image", "t2i_accuracy", "i2t_accuracy",
           "t2i_attributes", "i2t_attributes", "tokens_per_s", "wall_s")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


# ---------------------------------------------------------------------------------------------------------------
# Sweep files
# ---------------------------------------------------------------------------------------------------------------
def grid(axes: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """The product of ``axes`` as ``[(name, overrides)]``, names joined with '-' in axis order.

  Each axis is ``field: [values]`` (labels are the values) or ``field: {label: value}``; a ``{label: {field:
  value, ...}}`` axis sets several fields at once (its key is then only a title).
  """
  options = []
  for axis, values in axes.items():
    items = values.items() if isinstance(values, dict) else ((_label(v), v) for v in values)
    options.append([(label, value if isinstance(value, dict) else {axis: value}) for label, value in items])
  variants = []
  for combo in itertools.product(*options):
    overrides = {}
    for _, o in combo:
      overrides.update(o)
    variants.append(("-".join(label for label, _ in combo), overrides))
  return variants


def _label(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def load_sweep(path: str) -> dict[str, Any]:
  """Reads and checks a sweep file: {'base': path, 'common': {...}, 'variants': [(name, {...}), ...]}."""
  spec = importlib.util.spec_from_file_location("_sweep", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"no sweep file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  sweep.setdefault("common", {})
  names = [n for n, _ in sweep["variants"]]
  bad = [n for n in names if not _NAME.fullmatch(n)]
  if bad:
    raise ValueError(f"variant names must be usable as directory names ([A-Za-z0-9_.=+-]): {bad}")
  if len(set(names)) != len(names):
    raise ValueError(f"variant names repeat in {path}: {sorted(n for n in names if names.count(n) > 1)}")
  return sweep


def resolve(sweep: dict, extra: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any], Any]]:
  """[(name, all overrides, validated config)] of every variant; any bad field fails here, before any run."""
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  base = os.path.join(ROOT_DIR, sweep["base"]) if not os.path.isabs(sweep["base"]) else sweep["base"]
  spec = importlib.util.spec_from_file_location("_base_config", base)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = []
  for name, overrides in sweep["variants"]:
    merged = {**sweep["common"], **overrides, **(extra or {})}
    config = module.get_config()
    for field, value in merged.items():
      *groups, leaf = field.split(".")
      node = config
      for g in groups:
        node = node[g] if g in node else None
        if node is None:
          break
      if node is None or leaf not in node:
        raise configuration.ConfigError(f"variant {name}: {configuration.unknown_field_message(field)}")
      try:
        node[leaf] = value
      except TypeError as e:
        raise configuration.ConfigError(f"variant {name}: config.{field}={value!r}: {e}") from None
    try:
      configuration.validate(config)
    except configuration.ConfigError as e:
      raise configuration.ConfigError(f"variant {name}: {e}") from None
    out.append((name, merged, config))
  return out


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """``['train.steps=600', 'diffusion.schedule=cosine']`` -> {field: Python value (literal if it parses)}."""
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for item in items:
    field, _, text = item.partition("=")
    try:
      out[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[field] = text
  return out


# ---------------------------------------------------------------------------------------------------------------
# Running the variants
# ---------------------------------------------------------------------------------------------------------------
def override_flag(field: str, value) -> str:
  """One ``--config.FIELD=VALUE`` flag as ml_collections parses it."""
  return f"--config.{field}={value if isinstance(value, str) else repr(value)}"


def main_args(base: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
  return [f"--config={base}", f"--workdir={workdir}", *(override_flag(k, v) for k, v in overrides.items())]


def variant_command(backend: str, base: str, workdir: str, overrides: dict, tpu_args: Sequence[str] = ()) -> list[str]:
  args = main_args(base, workdir, overrides)
  if backend == "local":
    return [sys.executable, "-m", "unimm_jax.main", *args]
  if backend == "tpu":
    return [sys.executable, "-m", "launch.tpu", "run", *tpu_args, "--", *args]
  raise ValueError(f"--backend={backend!r} must be local or tpu")


def is_finished(workdir: epath.Path, config) -> bool:
  """Trained to ``train.steps`` and, on shapes, scored by generation at that step (main's last stage)."""
  report_file = workdir / "report.json"
  if not report_file.exists():
    return False
  report = json.loads(report_file.read_text())
  if report.get("step") != config.train.steps:
    return False
  return config.data.source != "shapes" or report.get("generation_step") == report["step"]


def run_variant(name: str, command: list[str], log_file: str) -> int:
  os.makedirs(os.path.dirname(log_file), exist_ok=True)
  start = time.perf_counter()
  print(f"run  {name}: {shlex.join(command)}  (log: {log_file})", flush=True)
  with open(log_file, "a") as log:
    status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT_DIR, check=False).returncode
  print(f"done {name}: exit {status} after {time.perf_counter() - start:.0f} s", flush=True)
  return status


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------
def collect(root: epath.Path, variants: list[tuple[str, dict, Any]], common: dict) -> list[dict[str, Any]]:
  """One row per variant from its report.json (missing figures None); overrides shown without the common ones."""
  rows = []
  for name, overrides, _ in variants:
    report_file = root / name / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    bits = report.get("val_bits_per_token") or {}
    own = {k: v for k, v in overrides.items() if k not in common or common[k] != v}
    rows.append({
        "variant": name, "overrides": " ".join(f"{k}={v}" for k, v in own.items()), "step": report.get("step"),
        "val_bits_text": bits.get("text"), "val_bits_image": bits.get("image"),
        "t2i_accuracy": report.get("t2i_accuracy"), "i2t_accuracy": report.get("i2t_accuracy"),
        # Mean per-attribute accuracy: short runs get whole shape sets right rarely, single attributes sooner.
        "t2i_attributes": _mean(report.get("t2i_attribute_accuracy")),
        "i2t_attributes": _mean(report.get("i2t_attribute_accuracy")),
        "tokens_per_s": report.get("train_tokens_per_s"), "wall_s": report.get("train_wall_s"),
        "val_curve": report.get("val_curve") or [],
    })
  return rows


def _mean(values: dict | None) -> float | None:
  return sum(values.values()) / len(values) if values else None


def _fmt(value, digits=4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
  return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  head = ("variant", "overrides", "steps", "val bits/token text", "val bits/token image", "t2i acc", "i2t acc",
          "t2i attr", "i2t attr", "tokens/s", "train wall s")
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = [r["variant"], f"`{r['overrides']}`" if r["overrides"] else "", _fmt(r["step"]),
             _fmt(r["val_bits_text"]), _fmt(r["val_bits_image"]), _fmt(r["t2i_accuracy"], 3),
             _fmt(r["i2t_accuracy"], 3), _fmt(r["t2i_attributes"], 3), _fmt(r["i2t_attributes"], 3),
             _fmt(r["tokens_per_s"]), _fmt(r["wall_s"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def curves_png(rows: list[dict[str, Any]], title: str) -> bytes:
  """PNG of every variant's val bits/token against step: text on the left, image on the right."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in rows:
    curve = [p for p in r["val_curve"] if p[0] > 0] or r["val_curve"]   # step 0 (untrained) flattens the plot
    if curve:
      steps = [p[0] for p in curve]
      axes[0].plot(steps, [p[1] for p in curve], marker=".", label=r["variant"])
      axes[1].plot(steps, [p[2] for p in curve], marker=".", label=r["variant"])
  for ax, modality in zip(axes, ("text", "image")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"val bits/token, {modality} (ELBO)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def write_results(root: epath.Path, rows: list[dict[str, Any]], title: str, command: str) -> None:
  md = f"# {title}\n\n`{command}`\n\n{markdown_table(rows)}\n![val curves](val_curves.png)\n"
  (root / "results.md").write_text(md)
  (root / "results.csv").write_text(csv_text(rows))
  (root / "val_curves.png").write_bytes(curves_png(rows, title))


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def sweep(sweep_file: str, root: str, *, backend: str = "local", parallel: int = 1, extra: Sequence[str] = (),
          tpu_args: Sequence[str] = (), log_dir: str | None = None) -> int:
  """Runs every unfinished variant, writes the results; returns 0 if every variant finished."""
  spec = load_sweep(sweep_file)
  overrides_extra = parse_set(extra)
  variants = resolve(spec, overrides_extra)
  root_path = epath.Path(root if "://" in root else os.path.abspath(root))
  if backend == "tpu" and not str(root_path).startswith("gs://"):
    raise ValueError(f"--backend=tpu needs a gs:// --root (the workers write there), got {root}")
  if backend == "tpu" and parallel != 1:
    raise ValueError("--backend=tpu runs the variants one after the other on one slice: use --parallel=1")
  root_path.mkdir(parents=True, exist_ok=True)
  log_dir = log_dir or (os.path.join(str(root_path), "logs") if "://" not in str(root_path)
                        else os.path.join("/tmp", "sweep_logs", os.path.basename(str(root_path))))
  todo = []
  for name, overrides, config in variants:
    workdir = root_path / name
    if is_finished(workdir, config):
      print(f"skip {name}: finished (step {config.train.steps})", flush=True)
    else:
      todo.append((name, variant_command(backend, spec["base"], str(workdir), overrides, tpu_args)))
  print(f"sweep {sweep_file}: {len(variants)} variants, {len(todo)} to run, {parallel} at a time", flush=True)
  with futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    statuses = dict(zip([n for n, _ in todo],
                        pool.map(lambda t: run_variant(t[0], t[1], os.path.join(log_dir, f"{t[0]}.log")), todo)))
  failed = {n: s for n, s in statuses.items() if s}
  rows = collect(root_path, variants, {**spec["common"], **overrides_extra})
  title = os.path.splitext(os.path.basename(sweep_file))[0]
  command = shlex.join(["python", "-m", "launch.sweep", f"--sweep={sweep_file}", f"--root={root}",
                        *(f"--set={s}" for s in extra)])
  write_results(root_path, rows, title, command)
  print(markdown_table(rows))
  print(f"wrote {root_path / 'results.md'}, results.csv and val_curves.png")
  if failed:
    print(f"failed variants (see their logs in {log_dir}): {failed}", file=sys.stderr)
    return 1
  return 0


def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  sweep_file = flags.DEFINE_string("sweep", None, "A sweep file, e.g. configs/sweeps/schedule_time.py.")
  root = flags.DEFINE_string("root", None, "Directory of the sweep: DIR/<variant>/ per variant, results here.")
  backend = flags.DEFINE_enum("backend", "local", ["local", "tpu"], "Where the main jobs run.")
  parallel = flags.DEFINE_integer("parallel", 1, "local: variants run at the same time.")
  extra = flags.DEFINE_multi_string("set", [], "field=value for every variant (repeatable).")
  tpu_args = flags.DEFINE_string("tpu_args", "", "tpu: flags for `launch.tpu run`, e.g. '--name=x --zone=y'.")
  flags.mark_flags_as_required(["sweep", "root"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
    try:
      status = sweep(sweep_file.value, root.value, backend=backend.value, parallel=parallel.value,
                     extra=extra.value, tpu_args=shlex.split(tpu_args.value))
    except (ValueError, FileNotFoundError, configuration.ConfigError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    sys.exit(status)

  app.run(main)


if __name__ == "__main__":
  _cli()
