"""Masking schedules of continuous-time absorbing-state diffusion (MDLM / MD4).

A schedule is alpha(t) on t in [0, 1] with alpha(0) = 1 (clean) and alpha(1) = 0 (all masked): at time t each
token is independently MASK with probability 1 - alpha(t). The negative ELBO weights the cross-entropy on masked
tokens by

    w(t) = -alpha'(t) / (1 - alpha(t))

=====================  =========================  ==================================
schedule               alpha(t)                   w(t)
=====================  =========================  ==================================
linear                 1 - t                      1 / t
cosine (MD4's form)    1 - cos(pi/2 (1 - t))      (pi/2) tan(pi/2 (1 - t))
polynomial, power k    1 - t^k                    k / t
=====================  =========================  ==================================
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax.numpy as jnp


class Schedule(abc.ABC):
  """alpha(t), its derivative, and the ELBO weight; all elementwise on float arrays."""

  @abc.abstractmethod
  def alpha(self, t):
    """Probability that a token is still clean at time t."""

  @abc.abstractmethod
  def dalpha(self, t):
    """d alpha / dt."""

  def mask_prob(self, t):
    """1 - alpha(t): the probability that a token is MASK at time t."""
    return 1.0 - self.alpha(t)

  def weight(self, t):
    """-alpha'(t) / (1 - alpha(t)), the ELBO weight of a masked token's cross-entropy."""
    return -self.dalpha(t) / (1.0 - self.alpha(t))


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
  def alpha(self, t):
    return 1.0 - t

  def dalpha(self, t):
    return -jnp.ones_like(t)

  def weight(self, t):  # closed form: exact where 1 - alpha(t) rounds badly
    return 1.0 / t


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  def alpha(self, t):
    return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

  def dalpha(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))

  def weight(self, t):
    return 0.5 * math.pi * jnp.tan(0.5 * math.pi * (1.0 - t))


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
  power: float = 2.0

  def alpha(self, t):
    return 1.0 - t ** self.power

  def dalpha(self, t):
    return -self.power * t ** (self.power - 1.0)

  def weight(self, t):
    return self.power / t


def get_schedule(name: str, poly_power: float = 2.0) -> Schedule:
  """The schedule named by ``config.diffusion.schedule``."""
  if name == "linear":
    return Linear()
  if name == "cosine":
    return Cosine()
  if name == "polynomial":
    return Polynomial(poly_power)
  raise ValueError(f"unknown diffusion schedule {name!r}; expected linear, cosine or polynomial")
