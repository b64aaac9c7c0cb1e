"""Sizes of parameter pytrees."""

from __future__ import annotations

import jax
import numpy as np


def param_count(params) -> int:
  """Number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``: nothing is allocated)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
