"""Text frames: how an imported checkpoint's format wraps a text segment's text in fixed tokens and pads it.

A published unified model does not feed a caption as it is: MMaDA's text-to-image prompt is
``[iPAD] ... [iPAD] <|t2i|> <|startoftext|> caption <|endoftext|>`` (padded on the left), its understanding
question the chat template ``<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n question <|eot_id|>
<|start_header_id|>assistant<|end_header_id|>\\n\\n``. A frame states that as data (``sequence.text_frames``: per segment,
``(template, pad side, pad token[, 'trim'][, 'null=TEXT'])``) so the Pipeline and the training input pipeline build the same
ids::

    ids = piece(before) + encode(text)[:room] + piece(after)       room: what the segment has left
    ids = [pad] * (length - len(ids)) + ids                         pad side 'left' ('right': after)

``before`` / ``after`` are the template around ``{text}``; in them, the names of ``sequence.special_ids`` become
those ids and everything else goes through the text tokenizer (whose own special tokens, such as
``<|startoftext|>``, it knows); the text is tokenized without the tokenizer's added BOS/EOS (the frame says
where they go), after stripping surrounding whitespace with ``'trim'`` (a chat template's ``| trim``). A text
longer than the room is cut at the end, the frame kept whole (MMaDA keeps its task token and BOS and ends on EOS).
``'null=TEXT'`` names the text of the upstream's unconditional prompt, which classifier-free guidance gives the
segment in its uncond pass instead of all MASK (MMaDA: the empty caption; Lumina-DiMOO: ``<uncondition>``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np
from absl import logging

PLACEHOLDER = "{text}"
SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class TextFrame:
  template: str = PLACEHOLDER
  pad_side: str = "right"
  pad_token: str = ""          # a special_ids name or a tokenizer token; "" = the tokenizer's PAD
  trim: bool = False           # strip the text's surrounding whitespace first
  null_text: str | None = None  # the text of the unconditional prompt guidance uses (None: the segment all MASK)

  def __post_init__(self):
    if self.template.count(PLACEHOLDER) != 1:
      raise ValueError(f"a text frame needs exactly one {PLACEHOLDER} in its template, got {self.template!r}")
    if self.pad_side not in SIDES:
      raise ValueError(f"text pad side {self.pad_side!r} is not one of {SIDES}")

  def pieces(self, tok, special_ids: Mapping[str, int]) -> tuple[list[int], list[int]]:
    """(ids before the text, ids after it)."""
    before, after = self.template.split(PLACEHOLDER)
    return _piece_ids(before, tok, special_ids), _piece_ids(after, tok, special_ids)

  def pad_id(self, tok, special_ids: Mapping[str, int]) -> int:
    if not self.pad_token:
      return int(tok.pad_id)
    if self.pad_token in special_ids:
      return int(special_ids[self.pad_token])
    return int(_token_id(tok, self.pad_token))

  def encode(self, tok, texts: Sequence[str], length: int, special_ids: Mapping[str, int]) -> np.ndarray:
    """int32 [B, length]: each text framed and padded (module docstring)."""
    before, after = self.pieces(tok, special_ids)
    room = length - len(before) - len(after)
    if room < 0:
      raise ValueError(f"the text frame {self.template!r} takes {len(before) + len(after)} tokens, more than the "
                       f"segment's {length}")
    pad = self.pad_id(tok, special_ids)
    out = np.full((len(texts), length), pad, np.int32)
    cut = 0
    for i, text in enumerate(texts):
      body = _encode(tok, text.strip() if self.trim else text)
      cut += len(body) > room
      ids = before + body[:room] + after
      if self.pad_side == "left":
        out[i, length - len(ids):] = ids
      else:
        out[i, :len(ids)] = ids
    if cut:
      logging.warning("%d of %d texts cut to the %d tokens their segment leaves after the frame %r", cut, len(texts),
                      room, self.template)
    return out


def _token_id(tok, token: str) -> int:
  if not hasattr(tok, "token_id"):
    raise ValueError(f"text frames name tokens ({token!r}), which the {tok.kind!r} text tokenizer cannot look up; "
                     "use text.tokenizer=hf")
  return tok.token_id(token)


def _encode(tok, text: str) -> list[int]:
  if hasattr(tok, "encode_ids"):
    return tok.encode_ids(text, add_special_tokens=False) if text else []
  return [int(i) for i in tok.encode(text, len(text) + 8) if i != tok.pad_id]


def _piece_ids(piece: str, tok, special_ids: Mapping[str, int]) -> list[int]:
  """A template piece's ids: names of ``special_ids`` as their ids, the text between through the tokenizer."""
  if not piece:
    return []
  if not special_ids:
    return _encode(tok, piece)
  names = sorted(special_ids, key=len, reverse=True)
  out = []
  for part in re.split("(" + "|".join(re.escape(n) for n in names) + ")", piece):
    if part in special_ids:
      out.append(int(special_ids[part]))
    elif part:
      out += _encode(tok, part)
  return out


def from_config(config) -> tuple[tuple[str, TextFrame], ...]:
  """((segment, frame), ...) of ``sequence.text_frames``: segment -> (template, pad side, pad token, options...),
  the options ``'trim'`` and ``'null=TEXT'`` (the unconditional prompt's text)."""
  out = []
  for name, spec in sorted(dict(config.sequence.get("text_frames", {})).items()):
    spec = (spec,) if isinstance(spec, str) else tuple(spec)
    options = spec[3:]
    bad = [o for o in options if o != "trim" and not str(o).startswith("null=")]
    if not spec or bad:
      raise ValueError(f"config.sequence.text_frames[{name!r}]={spec!r} must be (template[, pad side[, pad token"
                       "[, 'trim'][, 'null=TEXT']]])")
    null = [o[len("null="):] for o in options if str(o).startswith("null=")]
    out.append((name, TextFrame(spec[0], *(spec[1:3]), trim="trim" in options, null_text=null[0] if null else None)))
  return tuple(out)
