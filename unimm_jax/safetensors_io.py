"""safetensors files and Hugging Face checkpoints, read and written one tensor at a time (the one reader of the
format in unimm_jax: bundles, ``init.from``, ``python -m unimm_jax.convert``).

A safetensors file is 8 bytes of little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw little-endian bytes. A Hugging Face checkpoint directory holds ``model.safetensors``
(one file) or ``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file) and the shards.

:class:`CheckpointReader` (a directory, or one file) parses the headers only, then reads each tensor's bytes with
one positioned read when asked (``read``, or ``read_rows`` for a block of its leading axis), so a reader holds one
tensor at a time, never a whole shard (no memory map either: mapped pages that were read stay in the process's
resident set). bfloat16 comes back as ``ml_dtypes.bfloat16`` (JAX's ``jnp.bfloat16``) without a float32 copy.
Paths go through ``etils.epath``, so ``gs://`` works too. :func:`write_checkpoint` is the inverse: shards of at
most ``max_shard_bytes``, each file's header written from the planned names, shapes and dtypes before its tensors
are produced one by one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from etils import epath

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked: one line naming the file or tensor and what is wrong."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  file: str            # the shard's file name
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int          # absolute byte offset of the data in the file
  nbytes: int


def _header(path: epath.Path) -> tuple[dict, int]:
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", head)
    raw = f.read(n)
  try:
    return json.loads(raw), 8 + n
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: its safetensors header is not JSON ({e})") from None


class CheckpointReader:
  """The tensors of a Hugging Face checkpoint directory (module docstring), read on demand."""

  def __init__(self, directory):
    path = epath.Path(directory)
    single = None if path.is_dir() else path.name      # one .safetensors file
    self.directory = path.parent if single else path
    index = self.directory / INDEX_FILE
    if single:
      if not path.exists():
        raise CheckpointError(f"{path}: no such file")
      weight_map, files = None, [single]
    elif index.exists():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).exists():
      weight_map, files = None, [SINGLE_FILE]
    else:
      raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
    self.tensors: dict[str, TensorInfo] = {}
    for file in files:
      path = self.directory / file
      if not path.exists():
        raise CheckpointError(f"{path}: missing shard (named by {INDEX_FILE})")
      header, data_start = _header(path)
      header.pop("__metadata__", None)
      size = path.stat().length
      for name, info in header.items():
        if info["dtype"] not in DTYPES:
          raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not read here")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
          raise CheckpointError(f"{path}: tensor {name} {info['dtype']}{list(shape)} does not fit its byte range "
                                f"[{begin}, {end}) (file truncated?)")
        self.tensors[name] = TensorInfo(name, file, dtype, shape, data_start + begin, end - begin)
    if weight_map is not None:
      for name, file in weight_map.items():
        if name not in self.tensors:
          raise CheckpointError(f"{self.directory / file}: tensor {name} (named by {INDEX_FILE}) is not in it")

  def names(self) -> list[str]:
    return sorted(self.tensors)

  def info(self, name: str) -> TensorInfo:
    try:
      return self.tensors[name]
    except KeyError:
      raise CheckpointError(f"{self.directory}: no tensor {name}") from None

  def read(self, name: str) -> np.ndarray:
    """The tensor ``name``, in its stored dtype, read with one positioned read."""
    t = self.info(name)
    out = np.empty(t.shape, t.dtype)
    with (self.directory / t.file).open("rb") as f:
      f.seek(t.offset)
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != t.nbytes:
        raise CheckpointError(f"{self.directory / t.file}: tensor {name} is cut short")
    return out

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the tensor ``name`` along its first axis (contiguous in the file): one read."""
    t = self.info(name)
    row = t.nbytes // max(t.shape[0], 1)
    out = np.empty((stop - start,) + t.shape[1:], t.dtype)
    with (self.directory / t.file).open("rb") as f:
      f.seek(t.offset + start * row)
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != (stop - start) * row:
        raise CheckpointError(f"{self.directory / t.file}: tensor {name} is cut short")
    return out

  @property
  def total_bytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())


def read_file(path) -> dict[str, np.ndarray]:
  """{name: array} of every tensor of one .safetensors file, in its stored dtype."""
  reader = CheckpointReader(path)
  return {name: reader.read(name) for name in reader.names()}


@dataclasses.dataclass(frozen=True)
class Planned:
  """A tensor to write: its name, shape, dtype, and a function that makes it when its turn comes."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _write_file(path: epath.Path, tensors: list[Planned], metadata: dict[str, str]) -> None:
  header, offset = {"__metadata__": metadata}, 0
  for t in tensors:
    header[t.name] = {"dtype": NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned (as safetensors writes it)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      array = np.ascontiguousarray(t.make())
      if array.shape != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
        raise CheckpointError(f"{path}: tensor {t.name} came out {array.dtype}{list(array.shape)}, planned "
                              f"{np.dtype(t.dtype)}{list(t.shape)}")
      f.write(array.reshape(-1).view(np.uint8).data)


def write_checkpoint(directory, tensors: Iterable[Planned], *, max_shard_bytes: int = 5 * 2**30,
                     metadata: dict[str, str] | None = None) -> list[str]:
  """Writes ``tensors`` in order as Hugging Face shards ``model-0000i-of-0000n.safetensors`` and their index (or
  one ``model.safetensors`` when they fit in one shard); returns the file names. Each tensor is made (``make``)
  only when its bytes are written, so at most one is in memory."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = list(tensors)
  shards: list[list[Planned]] = [[]]
  for t in tensors:
    if shards[-1] and sum(x.nbytes for x in shards[-1]) + t.nbytes > max_shard_bytes:
      shards.append([])
    shards[-1].append(t)
  metadata = {"format": "pt", **(metadata or {})}
  if len(shards) == 1:
    _write_file(directory / SINGLE_FILE, shards[0], metadata)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    _write_file(directory / name, shard, metadata)
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
           "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return names + [INDEX_FILE]
