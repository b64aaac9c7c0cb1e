"""Validation: what the val ELBO measures (the joint bound per modality, then each conditional), its compiled step's
body, and the mean over a val set.

Training (:mod:`unimm_jax.train`) compiles :func:`eval_step` beside its update step and calls :func:`validate` every
``eval.every_steps``; the figures are ``WORKDIR/report.json``'s ``val_bits_per_token``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import transformer
from unimm_jax.sequence import SequenceLayout

if TYPE_CHECKING:
  from unimm_jax import train_state


def validation_tasks(layout: SequenceLayout, diffusion: MaskedDiffusion | None = None
                     ) -> tuple[tuple[str, np.ndarray], ...]:
  """What validation measures: (name, roles [G]) pairs. ``joint`` (every segment noised, reported per modality),
  then each generative segment given the others clean: ``text_given_image`` and ``image_given_text`` for the
  two-segment layout, the conditionals that captioning and drawing sample from (the joint figure mostly measures
  the marginals).

  In a layout with absent segments the conditionals are instead the mixture's tasks that noise one segment and
  null none (``text_to_image``, ``image_to_text``, ``edit``, ``vqa`` in ``configs/shapes_unified.py``), each
  measured on the examples it fits (:func:`eval_step`), so each figure is one task's, not a mix of kinds.
  """
  generative = [s.name for s in layout.segments if s.generative]
  out = [("joint", np.where([s.generative for s in layout.segments], tasks_lib.NOISED, tasks_lib.CLEAN))]
  if layout.has_absent and diffusion is not None:
    for name, roles in zip(diffusion.task_names, diffusion.task_roles):
      roles = np.asarray(roles, np.int32)
      if (roles == tasks_lib.NOISED).sum() == 1 and not (roles == tasks_lib.NULL).any():
        out.append((name, roles))
  elif len(generative) > 1:
    for name in generative:
      roles = np.full(len(layout.segments), tasks_lib.CLEAN, np.int32)
      roles[layout.index(name)] = tasks_lib.NOISED
      out.append((f"{name}_given_{'+'.join(g for g in generative if g != name)}", roles.astype(np.int32)))
  return tuple((n, np.asarray(r, np.int32)) for n, r in out)


def val_figures(layout: SequenceLayout, diffusion: MaskedDiffusion | None = None) -> tuple[str, ...]:
  """Names of the columns of :func:`eval_step`: the joint ELBO per modality, then each conditional."""
  return tuple(m for m in layout.modalities if m != "special") + \
      tuple(n for n, _ in validation_tasks(layout, diffusion)[1:])


def eval_step(method: "train_state.StepInputs", params, tokens, key) -> jax.Array:
  """Negative ELBO in bits per token of each example: float32 [B, len(val_figures)].

  Columns: each modality with every segment noised (the joint ELBO, split by modality), then each segment given
  the others clean (:func:`validation_tasks`). Times are low-discrepancy per segment, so a batch averages over the
  whole t range; a fixed key makes the validation figure of two evaluations comparable.

  In a layout with absent segments each example's absent segments stay absent under the joint task, each
  conditional (a task of the mixture) counts only the examples it fits, and a column that measures nothing for
  an example is NaN there; :func:`validate` averages each column over the examples where it is finite.
  """
  k_corruption, k_mask = jax.random.split(key)
  diffusion, layout = method.diffusion, method.layout
  t = diffusion.sample_times(k_corruption, tokens.shape[0])
  present = layout.present(tokens, jnp) if layout.has_absent else None
  out = []
  for i, (_, roles) in enumerate(validation_tasks(layout, diffusion)):
    example_roles = roles if present is None else jnp.where(present, roles[None], tasks_lib.ABSENT)
    corruption = diffusion.corruption_at(t, example_roles)
    noisy, masked = diffusion.corrupt(k_mask, tokens, corruption)
    bits = diffusion.elbo_bits(transformer.sequence_nll(method.model, params, noisy, tokens, diffusion.given_positions(corruption)),
                               masked, corruption)
    if i == 0:
      out.extend(diffusion.modality_bits(bits, roles, present).values())
    elif present is None:
      out.append(bits[:, int(np.argmax(roles == 0))])
    else:   # a task of the mixture: the examples whose absent segments are exactly the task's
      out.append(jnp.where(tasks_lib.fits(roles[None], present), bits[:, int(np.argmax(roles == 0))], jnp.nan))
  return jnp.stack(out, axis=1)



def validate(eval_fn, params, batches, seed: int, figures: tuple[str, ...]) -> dict[str, float]:
  """Mean val bits per token over every example once: {'text', 'image'} (joint ELBO) and the conditionals."""
  total, count = np.zeros(len(figures)), np.zeros(len(figures))
  base = jax.random.PRNGKey(seed + 1)
  for i, batch in enumerate(batches):
    bits = np.asarray(eval_fn(params, batch["tokens"], jax.random.fold_in(base, i)))
    weight = batch["weight"][:, None] * np.isfinite(bits)     # NaN: the column measures nothing for the example
    total += (np.nan_to_num(bits) * weight).sum(axis=0)
    count += weight.sum(axis=0)
  return {name: float(v / c) if c else float("nan") for name, v, c in zip(figures, total, count)}
