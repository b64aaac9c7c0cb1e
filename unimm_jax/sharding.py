"""Device mesh, logical-axis rules and the shardings of the train state and batches (one code path, 1 to N devices).

Mesh axes are ``('data', 'fsdp', 'tensor')`` (config ``mesh.shape``, -1 = the remaining devices):

* ``data``: pure data parallelism; parameters are replicated along it;
* ``fsdp``: the batch is split along it too, and so are the parameters (their ``embed`` dimension), gathered
  layer by layer by XLA when used (ZeRO-3 / FSDP);
* ``tensor``: Megatron-style splitting of the ``mlp``, ``heads`` and ``vocab`` dimensions.

Parameters and activations carry *logical* axis names (``models/layers.py``); ``config.mesh.rules`` maps them to
mesh axes, in priority order: a rule whose mesh axis is already taken by an earlier dimension of the same array is
skipped (Flax's semantics), so ``batch -> (data, fsdp)`` first and ``embed -> fsdp`` later leaves activations'
``embed`` unsplit while parameters' ``embed`` is split over ``fsdp``.

Nothing is ever whole on one device: the state's shardings come from ``jax.eval_shape`` of the initialiser
(:func:`state_shardings`), and the initialiser itself is jitted with those ``out_shardings``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
  """``jax.distributed.initialize`` for a job that spans processes (call before anything else touches JAX).

  On Cloud TPU every argument can stay None (the TPU runtime knows the pod); GPU and CPU clusters pass the
  coordinator ``host:port``, the process count and this process's id (``launch/`` fills them from SLURM or
  flags). CPU processes exchange collectives over gloo.
  """
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_hint():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)


def _has_accelerator_hint() -> bool:
  """Whether the environment names a TPU or GPU (checked without initialising a JAX backend)."""
  return any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "CUDA_VISIBLE_DEVICES",
                                       "TPU_ACCELERATOR_TYPE"))


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """``shape`` with its -1 (at most one) replaced so that the product is ``num_devices``; MeshError if impossible."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise MeshError(f"config.mesh.shape={shape} must have {len(AXES)} entries, one per mesh axis {AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"config.mesh.shape={shape}: each entry must be a positive size, or -1 (at most one) for "
                    "'the remaining devices'")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f"config.mesh.shape={shape} does not fit {num_devices} devices: {num_devices} is not "
                      f"divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(f"config.mesh.shape={shape} has {math.prod(shape)} devices but there are {num_devices} "
                    f"({jax.default_backend()}); use -1 for one axis to take the remaining devices")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """The ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: all of them, every process).

  ``mesh_utils.create_device_mesh`` orders the devices so the last (fastest-varying) axes sit on the fastest
  links (ICI neighbours on TPU, NVLink on GPU). When the devices span several TPU slices (multislice), the
  ``data`` axis is laid across slices over DCN (``create_hybrid_device_mesh``) and the rest within a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    if shape[0] % num_slices:
      raise MeshError(f"mesh.shape={shape}: the data axis ({shape[0]}) must be a multiple of the {num_slices} "
                      "slices, which it spans over DCN")
    ici = (shape[0] // num_slices,) + shape[1:]
    array = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
  elif len(devices) == 1:
    array = np.asarray(devices).reshape(shape)
  else:
    try:
      array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      # Devices without a known physical topology (CPU, fake devices, some GPU hosts): jax.devices() order.
      logging.info("mesh %s laid out in jax.devices() order (%s: %s)", shape, type(e).__name__, e)
      array = np.asarray(devices).reshape(shape)
  return Mesh(array, AXES)


def single_device_mesh() -> Mesh:
  """A 1x1x1 mesh over the first local device: the no-parallelism case of the same code."""
  return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), AXES)


def rules_of(config) -> tuple[tuple[str, Any], ...]:
  """``config.mesh.rules`` as the tuple of (logical name, mesh axis | tuple of axes | None) Flax expects."""
  return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.rules)


@contextlib.contextmanager
def scope(mesh: Mesh, rules):
  """Mesh and logical rules in effect while tracing, so ``nn.with_logical_constraint`` becomes a real constraint.

  The abstract mesh (axis names and sizes) is what tracing needs, and unlike ``jax.set_mesh`` it may be entered
  inside ``jax.jit``.
  """
  abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
  with jax.sharding.use_abstract_mesh(abstract), nn.logical_axis_rules(rules):
    yield


def in_scope(fn, mesh: Mesh, rules):
  """``fn`` traced under :func:`scope` (use as the function given to ``jax.jit``)."""
  def wrapped(*args, **kwargs):
    with scope(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings of a tree of ``nn.Partitioned`` boxes (abstract or real), by their logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over ``data`` x ``fsdp``; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh):
  """Shardings of ``tx.init(params)``: moments like their parameter, scalars (counts) replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows of the global batch (its contiguous share, in process order) as one global array."""
  return jax.make_array_from_process_local_data(sharding, local)


def global_array(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """An array every process holds whole (e.g. a validation batch), placed with ``sharding``."""
  full = np.asarray(full)
  return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def check_divisible(abstract_tree, shardings) -> None:
  """MeshError naming every array whose dimensions the mesh axes do not divide (instead of XLA's error later)."""
  problems = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree), jax.tree.leaves(shardings)):
    try:
      sharding.shard_shape(leaf.shape)
    except ValueError:
      problems.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} over {describe(sharding)}")
  if problems:
    raise MeshError("these arrays cannot be split evenly by the mesh (change mesh.shape, mesh.rules or the "
                    "model sizes):\n  " + "\n  ".join(problems[:10]))


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under ``shardings`` (largest shard per array)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def describe(sharding) -> str:
  spec = getattr(sharding, "spec", None)
  return str(tuple(spec)) if spec is not None else str(sharding)
