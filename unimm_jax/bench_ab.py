"""A/B timing of this code's train step against another checkout's, in one process.

    python -m unimm_jax.bench --config=configs/shapes.py --what=ab --against=/path/to/other/checkout

The CPUs here change speed from one process to the next (BENCHMARKS.md: the matmul peak read 347-490 GFLOP/s
between processes), so two versions are only comparable inside one process: the other checkout's ``unimm_jax``
package is copied under the name ``unimm_jax_ab`` (imports rewritten), both train steps are compiled on the same
devices for the same config, and their steps alternate in rounds; the figure is the median of the per-round ratios.

The other checkout's config is its own base config with every field this config also has set to this config's
value, and both are fed the same random tokens (the two-segment layout's ids are the same in every version).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

ALIAS = "unimm_jax_ab"


def load_checkout(directory) -> object:
  """The ``unimm_jax`` package of another checkout, imported as ``unimm_jax_ab``."""
  source = Path(directory) / "unimm_jax"
  if not (source / "__init__.py").exists():
    raise FileNotFoundError(f"--against={directory}: no unimm_jax package there")
  root = Path(tempfile.mkdtemp(prefix="unimm_jax_ab_"))
  shutil.copytree(source, root / ALIAS, ignore=shutil.ignore_patterns("__pycache__"))
  for path in (root / ALIAS).rglob("*.py"):
    path.write_text(re.sub(r"\bunimm_jax\b", ALIAS, path.read_text()))
  sys.path.insert(0, str(root))
  return importlib.import_module(ALIAS)


def _flat(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    if hasattr(value, "items") and not isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _step(pkg, config):
  """(compiled step, state, abstract) of package ``pkg`` for ``config`` (this code's ConfigDict)."""
  # The state and its step: ``train_state``, or ``train`` in a checkout from before the two were split.
  state_mod = "train_state" if importlib.util.find_spec(f"{pkg.__name__}.train_state") else "train"
  mods = {name: importlib.import_module(f"{pkg.__name__}.{name}")
          for name in ("configuration", "dry_run", "sharding", state_mod)}
  cfg = mods["configuration"].base_config()
  ours = _flat(config)
  for name in _flat(cfg):
    if name in ours:
      *parents, last = name.split(".")
      node = cfg
      for part in parents:
        node = node[part]
      node[last] = ours[name]
  if cfg.text.tokenizer == "word" and not cfg.text.max_vocab:
    cfg.text.max_vocab = 64
  layout = mods["dry_run"].planned_layout(cfg)
  make = getattr(mods[state_mod], "make_step_inputs", None) or getattr(mods[state_mod], "make_method")
  inputs = make(cfg, layout)
  mesh, rules = mods["sharding"].make_mesh(cfg.mesh.shape), mods["sharding"].rules_of(cfg)
  abstract, shardings = mods[state_mod].state_shardings(inputs, mesh, rules)
  step_fn, _ = mods[state_mod].compile_steps(inputs, mesh, rules, shardings)
  state = mods[state_mod].init_state(inputs, 0, mesh, rules)
  return step_fn, state, mesh, layout


def bench_ab(config, against, rounds: int = 10, steps_per_round: int = 5, warmup: int = 3) -> dict:
  """{'this_step_s', 'other_step_s' (medians), 'ratio_median' (this / other per round), 'ratios', ...}."""
  from unimm_jax import dry_run, sharding  # pylint: disable=g-import-not-at-top
  import unimm_jax  # pylint: disable=g-import-not-at-top
  other = load_checkout(against)
  sides = {"this": _step(unimm_jax, config), "other": _step(other, config)}
  c = config.copy_and_resolve_references()
  if c.text.tokenizer == "word" and not c.text.max_vocab:
    c.text.max_vocab = 64
  layout = dry_run.planned_layout(c)
  rng = np.random.default_rng(0)
  mesh = sides["this"][2]
  batches = [sharding.global_array(layout.random_tokens(rng, c.train.batch_size), sharding.batch_sharding(mesh))
             for _ in range(2)]
  states = {k: v[1] for k, v in sides.items()}
  losses = {}

  def run(name, n):
    step_fn = sides[name][0]
    times = []
    for i in range(n):
      start = time.perf_counter()
      states[name], metrics = step_fn(states[name], {"tokens": batches[i % 2]})
      jax.block_until_ready((states[name], metrics))
      times.append(time.perf_counter() - start)
    losses[name] = float(metrics["loss"])
    return times

  for name in sides:
    run(name, warmup)
  per = {"this": [], "other": []}
  ratios = []
  for r in range(rounds):
    order = ("this", "other") if r % 2 == 0 else ("other", "this")
    medians = {}
    for name in order:
      t = run(name, steps_per_round)
      per[name].extend(t)
      medians[name] = statistics.median(t)
    ratios.append(medians["this"] / medians["other"])
    logging.info("round %d: this %.1f ms, other %.1f ms, ratio %.3f", r, 1e3 * medians["this"],
                 1e3 * medians["other"], ratios[-1])
  out = {"against": str(against), "rounds": rounds, "steps_per_round": steps_per_round,
         "this_step_s": statistics.median(per["this"]), "other_step_s": statistics.median(per["other"]),
         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
         "ratios": ratios, "last_loss": losses, "devices": len(mesh.devices.flat)}
  logging.info("A/B: this %.1f ms, other %.1f ms per step; median ratio %.3f (%.3f-%.3f)", 1e3 * out["this_step_s"],
               1e3 * out["other_step_s"], out["ratio_median"], out["ratio_min"], out["ratio_max"])
  return out
