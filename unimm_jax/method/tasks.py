"""Tasks as data: a role for every segment of the sequence.

=======  ===========================================================================================
role     what happens to the segment during training
=======  ===========================================================================================
clean    given: never masked, carries no loss (the condition)
noised   masked at the segment's own time t (probability 1 - alpha(t) per token), carries the loss
null     all MASK, carries no loss: the null condition that classifier-free guidance needs
absent   not part of the example: every position holds the ABSENT token, kept as it is, no loss
         (only in a layout whose ``sequence.specials`` name ``<absent>``; see ``sequence``)
=======  ===========================================================================================

A task with absent segments applies only to the examples that lack exactly those segments: an example's task is
drawn from the mixture's tasks that fit it (:meth:`MaskedDiffusion.sample_corruption`), so one mixture serves a
batch of caption pairs, edits and questions, each kind of example trained on its own tasks.

Special segments (task tokens, begin/end of image) are always clean. The config's mixture
(``diffusion.tasks``, name -> weight) names tasks from the registry below or declared in the config
(``diffusion.task_roles``, name -> ``"segment:role segment:role ..."``). Built in, for any layout, by modality:

==============  ============  ============
task            text          image
==============  ============  ============
joint           noised        noised
text_to_image   clean         noised
image_to_text   noised        clean
image_only      null          noised
text_only       noised        null
==============  ============  ============

so that today's two-segment configs mean what they always meant. A new task is one :func:`register_task` call:
a name and a function from the layout to ``{segment: role}``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from unimm_jax.sequence import IMAGE, SPECIAL, TEXT, SequenceLayout

# Role codes (int32 in the programs).
NOISED, CLEAN, NULL, ABSENT = 0, 1, 2, 3
ROLES = {"noised": NOISED, "clean": CLEAN, "null": NULL, "absent": ABSENT}

RolesFn = Callable[[SequenceLayout], Mapping[str, str]]
_REGISTRY: dict[str, RolesFn] = {}


def register_task(name: str, roles: RolesFn | Mapping[str, str]) -> None:
  """Makes ``name`` usable in ``config.diffusion.tasks``. ``roles``: ``{segment: role}`` or a function of the
  layout that returns one (every generative segment must get a role; at least one must be noised)."""
  _REGISTRY[name] = roles if callable(roles) else (lambda layout, r=dict(roles): r)


def registered() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _by_modality(text_role: str, image_role: str) -> RolesFn:
  def roles(layout: SequenceLayout) -> dict[str, str]:
    by = {TEXT: text_role, IMAGE: image_role}
    return {s.name: by[s.modality] for s in layout.segments if s.modality != SPECIAL}
  return roles


BUILTIN = ("joint", "text_to_image", "image_to_text", "image_only", "text_only")
for _name, _roles in zip(BUILTIN, (("noised", "noised"), ("clean", "noised"), ("noised", "clean"),
                                   ("null", "noised"), ("noised", "null"))):
  register_task(_name, _by_modality(*_roles))


def fits(roles, present):
  """bool [...]: whether a task's roles (int [..., G]) fit examples whose segments are ``present`` (bool [..., G],
  ``SequenceLayout.present``): its absent segments are exactly the ones they lack. numpy or JAX, broadcast."""
  return ((roles == ABSENT) == ~present).all(axis=-1)


def parse_roles(spec: str) -> dict[str, str]:
  """``"instruction:clean source:clean target:noised"`` -> {segment: role}."""
  out = {}
  for item in spec.split():
    name, sep, role = item.partition(":")
    if not sep or not name or not role:
      raise ValueError(f"task roles {spec!r}: {item!r} is not segment:role")
    out[name] = role
  return out


def roles_of(name: str, layout: SequenceLayout, declared: Mapping[str, str] | None = None) -> np.ndarray:
  """int32 [num segments]: the role code of each segment under task ``name`` (declared in the config, or
  registered). ValueError that names the task and the problem."""
  declared = declared or {}
  if name in declared:
    roles = parse_roles(declared[name])
  elif name in _REGISTRY:
    roles = dict(_REGISTRY[name](layout))
  else:
    raise ValueError(f"unknown task {name!r}: register it (unimm_jax.method.tasks.register_task) or declare its "
                     f"roles in config.diffusion.task_roles; known: {', '.join(sorted(set(_REGISTRY) | set(declared)))}")
  out = np.full(len(layout.segments), CLEAN, np.int32)
  generative = [s.name for s in layout.segments if s.modality != SPECIAL]
  for seg, role in roles.items():
    if seg not in layout.names:
      raise ValueError(f"task {name!r} gives a role to {seg!r}, which is not a segment of {layout.describe()}")
    if role not in ROLES:
      raise ValueError(f"task {name!r}: role {role!r} of {seg!r} is not one of {tuple(ROLES)}")
    if layout.segment(seg).modality == SPECIAL and role != "clean":
      raise ValueError(f"task {name!r}: special segment {seg!r} is always clean, not {role!r}")
    if role == "absent" and not layout.has_absent:
      raise ValueError(f"task {name!r}: segment {seg!r} is absent, but the layout has no '<absent>' token; add it "
                       "to config.sequence.specials")
    out[layout.index(seg)] = ROLES[role]
  missing = [s for s in generative if s not in roles]
  if missing:
    raise ValueError(f"task {name!r} gives no role to {', '.join(missing)} of {layout.describe()}")
  if not (out == NOISED).any():
    raise ValueError(f"task {name!r} noises no segment of {layout.describe()}; it would carry no loss")
  return out


def mixture(weights: Mapping[str, float], layout: SequenceLayout,
            declared: Mapping[str, str] | None = None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
  """(names, float32 [T] weights, int32 [T, num segments] roles) of the config's task mixture.

  The built-in tasks come first in their fixed order (so a two-segment run draws the same tasks as before
  segments), then the others in the config's order. A task with weight 0 that does not fit the layout (say
  ``text_to_image`` without an image segment) is left out; one with a positive weight is an error.
  """
  names = [n for n in BUILTIN if n in weights] + [n for n in weights if n not in BUILTIN]
  kept, w, roles = [], [], []
  for name in names:
    try:
      r = roles_of(name, layout, declared)
    except ValueError:
      if weights[name] > 0:
        raise
      continue
    kept.append(name)
    w.append(float(weights[name]))
    roles.append(r)
  if not kept or sum(w) <= 0:
    raise ValueError(f"config.diffusion.tasks={dict(weights)} has no task with a positive weight for "
                     f"{layout.describe()}")
  return tuple(kept), np.asarray(w, np.float32), np.stack(roles)
