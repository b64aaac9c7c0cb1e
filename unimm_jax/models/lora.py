"""Low-rank adapters (LoRA, Hu et al. 2021) on the network's projections, for fine-tuning with the base frozen.

With ``model.lora_rank`` r > 0 each targeted :class:`~unimm_jax.models.layers.Projection` (kernel W
``[*in, *out]``) gains two parameters beside its kernel, ``lora_a`` A ``[*in, r]`` (fan-in random) and ``lora_b``
B ``[r, *out]`` (zeros), and computes

    y = x W + (alpha / r) * (x A) B

so a run starts exactly at the base model. The adapters are added by a Flax method interceptor around each
projection's call (:class:`LoraTransformer`), so the network's code (``layers.py``, ``transformer.py``) knows
nothing of them and its parameter names stay those of the base; the adapters sit next to the kernel they adapt
(``block_0/attn/qkv/{kernel, lora_a, lora_b}``; with ``model.scan_layers`` stacked on the leading layer axis
like the kernel). (x A) B is two thin matmuls, so the base kernel's weight gradient (the cost of full
fine-tuning) is never formed: the trainer differentiates the adapters only.

Targets (``model.lora_targets``, checked against ``config_schema.LORA_TARGETS``) name projections: ``qkv`` (the
q, k, v projections: the fused one, or ``query``/``key``/``value`` with ``model.fused_qkv=False``, which may also
be named alone), ``out``, ``wi_0``, ``wi_1``, ``wo``. The output head is not a target: the trainer applies it per
segment outside the network (``transformer.segment_nll``).

:func:`split` and :func:`combine` separate a parameter tree into the frozen base and the adapters and join them;
:func:`merge` folds the adapters into the base (W + alpha/r * A B, the base's names and layout), which is what
an export writes and ``Pipeline.load`` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unimm_jax.models import layers
from unimm_jax.models.transformer import Transformer

ADAPTERS = ("lora_a", "lora_b")
_QKV = ("qkv", "query", "key", "value")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """``model.lora_*``: rank r, alpha (the update is scaled by alpha / r) and the targeted projection names."""

  rank: int
  alpha: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_projection(self, name: str) -> bool:
    return name in self.targets or (name in _QKV and "qkv" in self.targets)

  @classmethod
  def from_config(cls, model_config) -> "LoraSpec | None":
    """The spec of a config's ``model`` group; None when ``model.lora_rank`` is 0 (no adapters)."""
    if not model_config.get("lora_rank", 0):
      return None
    return cls(int(model_config.lora_rank), float(model_config.lora_alpha), tuple(model_config.lora_targets))

  def _intercept(self, next_fun, args, kwargs, context):
    """Flax interceptor: a targeted Projection's call returns x W + scale * (x A) B (A, B its own parameters)."""
    module = context.module
    y = next_fun(*args, **kwargs)
    if not (isinstance(module, layers.Projection) and context.method_name == "__call__"
            and self.targets_projection(module.name)):
      return y
    n_in = len(module.in_shape)
    in_axes, out_axes = tuple(module.axes[:n_in]), tuple(module.axes[n_in:])
    a_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                              out_axis=n_in)
    a = module.param("lora_a", nn.with_logical_partitioning(a_init, in_axes + (None,)),
                     module.in_shape + (self.rank,), module.param_dtype)
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                     (self.rank,) + module.out_shape, module.param_dtype)
    x = args[0].astype(module.dtype)
    xa = layers.matmul_2d(x, a.astype(module.dtype), n_in)                       # [..., r]
    delta = layers.matmul_2d(xa, b.astype(module.dtype), 1)                      # [..., *out]
    return y + jnp.asarray(self.scale, module.dtype) * delta


class LoraTransformer(Transformer):
  """The :class:`~unimm_jax.models.transformer.Transformer` with adapters on the projections ``lora`` targets
  (same call, same parameter names, plus ``lora_a`` / ``lora_b`` beside each targeted kernel)."""

  lora: LoraSpec | None = None

  def __call__(self, tokens, **kw):   # Transformer.__call__'s keywords
    with nn.intercept_methods(self.lora._intercept):  # pylint: disable=protected-access
      return super().__call__(tokens, **kw)


def _partition(tree: Mapping, adapters: bool) -> dict:
  """The nested dict of ``tree``'s adapter leaves (``adapters``) or of its other leaves; empty dicts dropped."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = _partition(value, adapters)
      if sub:
        out[key] = sub
    elif (key in ADAPTERS) == adapters:
      out[key] = value
  return out


def split(params) -> tuple[dict, dict]:
  """(base, adapters) of a parameter tree with adapters: two nested dicts of the same leaves, disjoint."""
  return _partition(params, False), _partition(params, True)


def combine(base, adapters) -> dict:
  """The network's parameter tree: ``base`` with ``adapters`` added beside their kernels (inverse of
  :func:`split`). Works on any trees of the two layouts (arrays, shapes, shardings)."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(base[key], value) if isinstance(value, Mapping) and key in base else value
  return out


def merge(base, adapters, scale: float):
  """The base's tree with each adapted kernel replaced by W + scale * A B (in W's dtype): the adapted network
  without adapters, in the base's names and layout. The sum is formed in float32.

  Shapes: W ``[*lead, *in, *out]``, A ``[*lead, *in, r]``, B ``[*lead, r, *out]``, where ``lead`` is the layer
  axis of a scanned stack (or nothing).
  """
  out = dict(base)
  for key, value in adapters.items():
    if "lora_a" in value:
      w, a, b = base[key]["kernel"], value["lora_a"], value["lora_b"]
      lead = a.ndim + b.ndim - 2 - w.ndim
      k, n = int(np.prod(a.shape[lead:-1])), int(np.prod(b.shape[lead + 1:]))
      a2 = jnp.asarray(a, jnp.float32).reshape(a.shape[:lead] + (k, a.shape[-1]))
      b2 = jnp.asarray(b, jnp.float32).reshape(b.shape[:lead] + (b.shape[lead], n))
      delta = jnp.matmul(a2, b2).reshape(w.shape)
      out[key] = {**base[key], "kernel": (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)}
    else:
      out[key] = merge(base[key], value, scale)
  return out
