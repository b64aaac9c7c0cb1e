"""``python -m unimm_jax.aot --config=configs/NAME.py --topology=v5e:4x8``: will it fit? Compile for a TPU slice here.

With ``libtpu`` installed (``pip install -e '.[tpu]'``), a CPU host can build the devices of a named TPU slice
(``jax.experimental.topologies.get_topology_desc``) and compile the real programs for them: the train step (and
the sampling loop) over the config's mesh, as ``python -m unimm_jax.main`` would run them there. From the TPU
executable it reports, per chip:

* memory (``memory_analysis()``): arguments, outputs, the part of them aliased (the donated train state),
  temporaries, generated code, and their total against the chip's HBM (:data:`CHIPS`);
* FLOPs (``cost_analysis()``) against the model FLOPs of the formula (``bench.model_flops_per_step``). XLA counts
  the body of a loop once: the layer scan of ``model.scan_layers``, and the loops XLA makes of FSDP matmuls on a
  large mesh (collective-permutes around partial matmuls), so there its figure is a fraction of the work and the
  report lists the loops' trip counts; an unscanned model on a small mesh gives the whole count;
* the collectives of the optimized HLO (kind, dtype, count, bytes), the custom kernels (``custom-call`` targets:
  ``tpu_custom_call`` is a Pallas kernel such as splash attention), and the compile time.

``--cuda`` also exports the train step for CUDA (``jax.export``, StableHLO) and lists its custom calls (cuDNN flash
attention is ``__cudnn$fmha...``). There is no GPU compiler on a CPU host, so that part has no memory figures; the
cuDNN version check is given a version and the custom-call safety check is set aside for the export.

Output: a summary on stdout and, with ``--out=FILE``, everything as JSON (``--hlo_dir=DIR`` also writes the HLO).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

HBM_GIB_BYTES = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A Cloud TPU generation: how Cloud TPU names it, JAX's ``device_kind``, HBM and bf16 peak per chip."""

  name: str                  # v4 | v5e | v5p | v6e (the prefix of Cloud TPU's accelerator types)
  device_kind: str
  hbm_bytes: int
  peak_bf16_flops: float
  dims: int                  # topology dimensions: 2 (v5e, v6e: AxB) or 3 (v4, v5p: AxBxC)


# Cloud TPU's published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * HBM_GIB_BYTES, 275e12, 3),
    Chip("v5e", "TPU v5 lite", 16 * HBM_GIB_BYTES, 197e12, 2),
    Chip("v5p", "TPU v5", 95 * HBM_GIB_BYTES, 459e12, 3),
    Chip("v6e", "TPU v6 lite", 32 * HBM_GIB_BYTES, 918e12, 2),
)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}


class TopologyError(ValueError):
  """A topology name that is not a Cloud TPU slice, or a mesh that does not fit one."""


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """``'v5e:4x8'`` -> (the chip, (4, 8)); TopologyError naming the name and what would be valid."""
  gen, _, shape = name.partition(":")
  chip = CHIPS.get(gen)
  example = ", ".join(f"{c.name}:{'x'.join(['2'] * c.dims)}" for c in CHIPS.values())
  if chip is None or not re.fullmatch(r"\d+(x\d+)*", shape):
    raise TopologyError(f"--topology={name!r} is not a Cloud TPU slice: write GENERATION:SHAPE, the generation one "
                        f"of {tuple(CHIPS)}, e.g. {example}")
  dims = tuple(int(d) for d in shape.split("x"))
  if len(dims) != chip.dims or min(dims) < 1:
    raise TopologyError(f"--topology={name!r}: a {chip.name} slice has {chip.dims} dimensions "
                        f"({'x'.join(['A', 'B', 'C'][:chip.dims])}), got {shape!r}")
  return chip, dims


def topology_devices(name: str):
  """The devices of a named TPU slice, built on this host by libtpu (no TPU needed)."""
  chip, dims = parse_topology(name)
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise TopologyError(f"compiling for --topology={name} needs libtpu: pip install -e '.[tpu]' ({e})") from None
  # Compiling uses no chip: let several processes (a test run beside a CLI run) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  per_host = (min(dims[0], 2), min(dims[1], 2), 1)   # Cloud TPU hosts hold 2x2 chips (v5e/v6e: up to 2x4)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                      chips_per_host_bounds=per_host, num_slices=1, wrap=(False, False, False))
  return chip, list(desc.devices)


# ---------------------------------------------------------------------------------------------------------------
# Reading an executable
# ---------------------------------------------------------------------------------------------------------------
def memory(compiled, hbm_bytes: int | None) -> dict:
  """Per-device bytes of a compiled program: the kinds of ``memory_analysis()`` and their total.

  total = arguments + outputs - aliased + temporaries + generated code: outputs that reuse a donated argument's
  buffer (the train state) are counted once."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
         "generated_code": int(m.generated_code_size_in_bytes)}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"])
  if hbm_bytes:
    out["hbm"] = hbm_bytes
    out["fraction_of_hbm"] = out["total"] / hbm_bytes
  return out


def xla_flops(compiled) -> float:
  """FLOPs of one run of the program on one device, as XLA counts them (a loop body once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _bytes_of(types: str) -> tuple[int, str]:
  total, dtypes = 0, []
  for dtype, dims in _SHAPE.findall(types):
    n = math.prod(int(d) for d in dims.split(",")) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
    dtypes.append(dtype)
  return total, "/".join(sorted(set(dtypes)))


def collectives(hlo: str) -> list[dict]:
  """[{kind, dtype, count, bytes}] of the collectives in optimized HLO text (an async pair counted once, by its
  start; bytes of the result), largest first. A collective inside the scanned layer appears once in the text."""
  table = collections.defaultdict(lambda: [0, 0])
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    result, kind, start = m.group(1), m.group(2), m.group(3)
    if start:   # the start op's result is a tuple (operands..., outputs...): take the second half
      shapes = _SHAPE.findall(result)
      result = " ".join(f"{d}[{s}]" for d, s in shapes[len(shapes) // 2:]) if len(shapes) > 1 else result
    nbytes, dtype = _bytes_of(result)
    entry = table[(kind, dtype)]
    entry[0] += 1
    entry[1] += nbytes
  rows = [{"kind": k, "dtype": d, "count": c, "bytes": b} for (k, d), (c, b) in table.items()]
  return sorted(rows, key=lambda r: -r["bytes"])


def custom_calls(hlo: str) -> dict[str, int]:
  """{custom-call target: count} in HLO or StableHLO text (Pallas kernels: ``tpu_custom_call``)."""
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo) + re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", hlo)
  return dict(collections.Counter(targets))


def pallas_kernels(hlo: str) -> dict[str, int]:
  """{kernel name: count} of the Pallas kernels in TPU HLO (a ``tpu_custom_call`` instruction is named after its
  kernel, e.g. ``splash_mha_fwd_residuals``, ``splash_mha_dq``)."""
  names = re.findall(r'%([A-Za-z_][\w\-]*?)(?:\.\d+)?\s*=.*custom_call_target="tpu_custom_call"', hlo)
  return dict(collections.Counter(names))


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis that closes the one open at ``text[start - 1]``."""
  depth = 1
  for i in range(start, len(text)):
    depth += (text[i] == "(") - (text[i] == ")")
    if depth == 0:
      return i
  return len(text)


def instructions(hlo: str) -> list[dict]:
  """[{name, type, op, operands, op_name}] of every instruction of HLO text (fused computations included)."""
  out = []
  for line in hlo.splitlines():
    m = _NAME.match(line)
    if not m:
      continue
    rest = line[m.end():]
    if rest.startswith("("):                     # a tuple type: (f32[..]{..:T(8,128)}, ...)
      end = _closing(rest, 1) + 1
    else:
      end = rest.find(" ")
    type_, rest = rest[:end], rest[end:].lstrip()
    call = re.match(r"([\w\-]+)\(", rest)
    if not call:
      continue
    args = rest[call.end():_closing(rest, call.end())]
    meta = re.search(r'op_name="([^"]+)"', rest)
    out.append({"name": m.group(1), "type": type_, "op": call.group(1), "operands": re.findall(r"%([\w.\-]+)", args),
                "op_name": meta.group(1) if meta else ""})
  return out


def matmuls_with_float32_operands(hlo: str) -> list[dict]:
  """The dots and convolutions of HLO text with a float32 operand: [{name, op_name, operand_types}]."""
  insts = instructions(hlo)
  types = {i["name"]: i["type"] for i in insts}
  found = []
  for i in insts:
    if i["op"] in ("dot", "convolution"):
      operand_types = [types.get(a, "?") for a in i["operands"]]
      if any(t.startswith("f32") for t in operand_types):
        found.append({"name": i["name"], "op_name": i["op_name"], "operand_types": operand_types})
  return found


def loops(hlo: str) -> dict[str, int]:
  """How many ``while`` loops optimized HLO has, and how many of them XLA made of matmuls (``windowed_dot_general``:
  an FSDP weight's all-gather done as collective-permutes around partial matmuls); XLA counts each body once."""
  bodies = re.findall(r"\swhile\(.*?body=%([\w.\-]+)", hlo)
  return {"while": len(bodies), "windowed_dot_general": sum("windowed_dot_general" in b for b in bodies)}


def loop_carried_shapes(hlo: str) -> list[str]:
  """Shapes of every array a ``while`` loop carries (its state tuple): what a scan over layers keeps across it."""
  shapes = []
  for i in instructions(hlo):
    if i["op"] == "while":
      shapes += [f"{d}[{s}]" for d, s in _SHAPE.findall(i["type"])]
  return shapes


# ---------------------------------------------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Programs:
  """The train step and sampling loop of a config over a mesh, with their abstract arguments."""

  config: Any
  layout: Any
  method: Any                # train_state.StepInputs
  mesh: Any
  abstract_state: Any        # TrainState of ShapeDtypeStructs with their shardings
  train_step: Any            # jitted (state, batch) -> (state, metrics)
  batch: dict
  sampler: Any               # jitted (params, tokens, keys) -> tokens
  sampler_args: tuple


def build(config, devices, platform: str, topology: str | None = None) -> Programs:
  """The main job's train step and a text->image sampling loop of ``config`` over ``devices`` (not compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unimm_jax import dry_run, train_state  # pylint: disable=g-import-not-at-top
  from unimm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from unimm_jax.method import samplers  # pylint: disable=g-import-not-at-top
  from unimm_jax.sequence import IMAGE, TEXT  # pylint: disable=g-import-not-at-top

  try:
    shape = sharding_lib.resolve_mesh_shape(config.mesh.shape, len(devices))
  except sharding_lib.MeshError:
    where = f"--topology={topology}" if topology else f"{platform}"
    raise TopologyError(f"config.mesh.shape={tuple(config.mesh.shape)} does not fit {where} ({len(devices)} "
                        f"devices): the product of its sizes must be {len(devices)} (-1 takes the rest)") from None
  layout = dry_run.planned_layout(config)
  mesh = sharding_lib.make_mesh(shape, devices)
  rules = sharding_lib.rules_of(config)
  method = train_state.make_step_inputs(config, layout, platform=platform)
  abstract, shardings = train_state.state_shardings(method, mesh, rules)
  sharding_lib.check_divisible(abstract, shardings)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(with_sharding, abstract, shardings)
  step_fn, _ = train_state.compile_steps(method, mesh, rules, shardings)
  batch_sh = sharding_lib.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct((config.train.batch_size, layout.seq_len), jnp.int32, sharding=batch_sh)}

  # Sampling: the image given the text (a text-only model: the text), with the config's sampler settings (and
  # guidance, if it has some).
  s = config.sample
  kw = dict(method=s.method, steps=s.t2i_steps, temperature=s.temperature, confidence_noise=s.confidence_noise,
            reveal_schedule=s.reveal_schedule, guidance_scale=s.guidance_scale)
  if s.get("preset", ""):   # an upstream's decoding (sample.preset): its steps and guidance
    from unimm_jax.method.samplers import presets  # pylint: disable=g-import-not-at-top
    kw.update({k: v for k, v in presets.preset_kwargs(s.preset, "t2i", config.text.max_len).items() if k in kw})
  cfg = samplers.SamplerConfig(**kw)
  masks = layout.modality_masks(np)
  image = masks[IMAGE] if IMAGE in masks else masks[TEXT]
  guide = ((jnp.asarray(image), jnp.asarray(~image)),) if cfg.guidance_scale > 0 else ()

  def sample(params, tokens, keys):
    logits_fn = lambda t: method.model.apply({"params": params}, t)
    return samplers.sample(logits_fn, tokens, keys, mask_id=layout.mask_id, config=cfg, schedule=method.schedule,
                           guide=guide, generate=jnp.asarray(image))

  sampler = jax.jit(sharding_lib.in_scope(sample, mesh, rules),
                    in_shardings=(shardings.network_params(shardings.params), batch_sh, batch_sh),
                    out_shardings=batch_sh)
  n = config.eval.batch_size
  network = abstract_state.network_params(abstract_state.params)   # a LoRA run's base with its adapters
  sampler_args = (network, jax.ShapeDtypeStruct((n, layout.seq_len), jnp.int32, sharding=batch_sh),
                  jax.ShapeDtypeStruct((n, 2), jnp.uint32, sharding=batch_sh))
  return Programs(config, layout, method, mesh, abstract_state, step_fn, batch, sampler, sampler_args)


def _compile(fn, *args) -> tuple[Any, float, float]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def model_flops(programs: Programs) -> float:
  from unimm_jax import bench  # pylint: disable=g-import-not-at-top
  state = programs.abstract_state
  return bench.step_model_flops(programs.method, state.network_params(state.params), programs.config.train.batch_size)


def describe_program(compiled, hlo: str, hbm: int | None, lower_s: float, compile_s: float,
                     devices: int) -> dict:
  """The report of one compiled program; ``hlo`` is its ``as_text()`` (taken once by the caller, also for files)."""
  flops = xla_flops(compiled)
  return {"compile_s": round(compile_s, 2), "lower_s": round(lower_s, 2), "memory": memory(compiled, hbm),
          "loops": loops(hlo), "xla_flops_per_device": flops, "xla_flops_all_devices": flops * devices,
          "collectives": collectives(hlo), "custom_calls": custom_calls(hlo), "pallas_kernels": pallas_kernels(hlo)}


def compile_for_topology(config, topology: str, *, sampler: bool = True, hlo_dir: str | None = None) -> dict:
  """Compiles the train step (and the sampling loop) of ``config`` for a TPU slice; the report as a dict."""
  chip, devices = topology_devices(topology)
  programs = build(config, devices, "tpu", topology)
  report = {"config_model": {k: programs.config.model[k] for k in ("d_model", "num_layers", "num_heads", "head_dim",
                                                                   "mlp_dim", "dtype", "remat", "scan_layers")},
            "attention": programs.method.model.config.attention,
            "topology": topology, "chip": chip.name, "device_kind": devices[0].device_kind, "devices": len(devices),
            "mesh": dict(programs.mesh.shape), "sequence": programs.layout.seq_len,
            "batch": programs.config.train.batch_size}
  compiled, lower_s, compile_s = _compile(programs.train_step, programs.abstract_state, programs.batch)
  hlo = compiled.as_text()
  train = describe_program(compiled, hlo, chip.hbm_bytes, lower_s, compile_s, len(devices))
  train["model_flops"] = model_flops(programs)
  train["xla_over_model_flops"] = train["xla_flops_all_devices"] / train["model_flops"]
  train["bf16_step_s_at_peak"] = train["model_flops"] / (chip.peak_bf16_flops * len(devices))
  report["train"] = train
  _write_hlo(hlo_dir, "train", hlo)
  if sampler:
    compiled, lower_s, compile_s = _compile(programs.sampler, *programs.sampler_args)
    hlo = compiled.as_text()
    report["sample"] = describe_program(compiled, hlo, chip.hbm_bytes, lower_s, compile_s, len(devices))
    report["sample"]["batch"] = programs.config.eval.batch_size
    _write_hlo(hlo_dir, "sample", hlo)
  return report


def _write_hlo(hlo_dir, name, text):
  if hlo_dir:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(hlo_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.hlo.txt").write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# CUDA export
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cudnn_without_a_gpu(version: int = 91000):
  """cuDNN attention's lowering asks the installed cuDNN for its version; a host without one answers ``version``
  (the cuDNN of jax's CUDA 12 wheels) for the length of the export."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  saved = fused.check_cudnn_version
  fused.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    fused.check_cudnn_version = saved


def export_cuda(config, hlo_dir: str | None = None) -> dict:
  """The train step of ``config`` on one device, exported for CUDA: {'custom_calls', 'stablehlo_bytes', ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaSoftmaxDropout",
             "__cudnn$fmhaSoftmaxDropoutBackward", "__cudnn$fmhaScaleBiasSoftmax",
             "__cudnn$fmhaScaleBiasSoftmaxBackward")
  t0 = time.perf_counter()
  with _cudnn_without_a_gpu():
    programs = build(config, jax.local_devices()[:1], "gpu")
    exported = export.export(programs.train_step, platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in targets])(
                                 programs.abstract_state, programs.batch)
  text = exported.mlir_module()
  _write_hlo(hlo_dir, "train_cuda.stablehlo", text)
  return {"attention": programs.method.model.config.attention, "export_s": round(time.perf_counter() - t0, 2),
          "custom_calls": custom_calls(text), "stablehlo_bytes": len(text)}


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
  return f"{n / HBM_GIB_BYTES:.2f} GiB"


def format_report(r: dict) -> str:
  lines = [f"{r['topology']} ({r['devices']} x {r['device_kind']}), mesh {r['mesh']}, sequence {r['sequence']}, "
           f"batch {r['batch']}, attention {r['attention']}, remat {r['config_model']['remat']}"]
  for name in ("train", "sample"):
    if name not in r:
      continue
    p = r[name]
    m = p["memory"]
    lines.append(f"{name}: compiled in {p['compile_s']:.1f} s; per chip {_gib(m['total'])} of {_gib(m['hbm'])} HBM "
                 f"({100 * m['fraction_of_hbm']:.1f} %): arguments {_gib(m['arguments'])}, outputs "
                 f"{_gib(m['outputs'])} (aliased {_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}, "
                 f"code {_gib(m['generated_code'])}")
    if "model_flops" in p:
      n = p["loops"]
      loops = (f" (XLA counts each loop body once: {n['while']} loops, {n['windowed_dot_general']} of them FSDP "
               "matmul loops)") if n["while"] else ""
      lines.append(f"  FLOPs: XLA {p['xla_flops_all_devices']:.4g} vs formula {p['model_flops']:.4g} (ratio "
                   f"{p['xla_over_model_flops']:.3f}){loops}; at the bf16 peak a step takes "
                   f"{1e3 * p['bf16_step_s_at_peak']:.1f} ms")
    for c in p["collectives"][:8]:
      lines.append(f"  {c['kind']:<18} {c['dtype']:<9} x{c['count']:<4} {c['bytes'] / 2**20:10.1f} MiB")
    lines.append(f"  custom calls: {p['custom_calls'] or 'none'}; Pallas kernels: {p['pallas_kernels'] or 'none'}")
  return "\n".join(lines)


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  fl = flags.FlagValues()
  # sys_argv: the config's --config.a.b=v overrides are defined as flags from the arguments actually parsed.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fl, lock_config=False, sys_argv=argv)
  flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5e:4x8, v4:2x2x4, v5p:4x4x4, v6e:8x8 (default: the "
                      "config's mesh.topology)", flag_values=fl)
  flags.DEFINE_string("out", None, "write the report as JSON here", flag_values=fl)
  flags.DEFINE_string("hlo_dir", None, "write the optimized HLO (and the CUDA StableHLO) here", flag_values=fl)
  flags.DEFINE_bool("sampler", True, "also compile the sampling loop", flag_values=fl)
  flags.DEFINE_bool("cuda", False, "also export the train step for CUDA and list its custom calls", flag_values=fl)
  fl(argv)
  topology = fl.topology or (fl.config.mesh.get("topology", "") if fl.config is not None else "")
  if fl.config is None or not topology:
    print("error: --config=configs/NAME.py and --topology=GEN:SHAPE (e.g. v5e:4x8; or the config's mesh.topology) "
          "are required", file=sys.stderr)
    return 2
  try:
    parse_topology(topology)
    config = configuration.validate(fl.config)
    report = compile_for_topology(config, topology, sampler=fl.sampler, hlo_dir=fl.hlo_dir)
    print(format_report(report), flush=True)
    if fl.cuda:
      report["cuda"] = export_cuda(config, fl.hlo_dir)
      print(f"cuda export ({report['cuda']['attention']} attention): custom calls {report['cuda']['custom_calls']}")
  except (TopologyError, configuration.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if fl.out:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(fl.out).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the TPU here; never probe for a local one
  sys.exit(main())
