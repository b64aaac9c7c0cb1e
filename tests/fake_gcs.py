"""A fake ``gs://`` for tests: Google Cloud Storage semantics that matter here, kept in a local directory.

The main job never touches GCS itself; three libraries do, and each is faked at its own seam, so everything
above that seam (etils.epath's ``gs://`` path class and fsspec backend, Orbax's GCS code paths, tensorboardX's
writer factory) is the code a real ``gs://`` run executes:

* ``etils.epath`` sends ``gs://`` paths to fsspec's ``gcs`` filesystem (gcsfs in a real run):
  :class:`FakeGCSFileSystem` is registered in its place and maps ``gs://bucket/key`` to ``ROOT/bucket/key``.
  Like GCS it needs no parent "directory" before a write, and, like gcsfs, it lists names without the scheme.
* Orbax writes the array data of a checkpoint through TensorStore, whose native ``gcs`` driver speaks HTTP to
  GCS: ``orbax...gcs_utils.get_kvstore_for_gcs`` is patched to give TensorStore's ``file`` driver on the same
  local directory instead.
* Orbax asks google-cloud-storage whether the bucket has a hierarchical namespace: answered "no" (a plain
  bucket), without the client library.

What this does not test: GCS's own consistency and latency, authentication, and the real gcsfs/TensorStore GCS
clients.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import importlib
import os
import shutil
from unittest import mock

import fsspec

_PREFIXES = ("gs://", "gcs://")


class FakeGCSFileSystem(fsspec.AbstractFileSystem):
  """fsspec filesystem for ``gs://bucket/key`` stored under ``root/bucket/key``."""

  protocol = ("gs", "gcs")
  root = ""          # set by :func:`fake_gcs` before the first use
  cachable = False   # a new root per test; never reuse an instance

  def __init__(self, *args, **kwargs):
    del args, kwargs   # epath passes gcsfs options (finalize_on_close)
    super().__init__()
    if not self.root:
      raise RuntimeError("FakeGCSFileSystem used outside fake_gcs()")

  def _local(self, path) -> str:
    path = os.fspath(path)
    for prefix in _PREFIXES:
      if path.startswith(prefix):
        path = path[len(prefix):]
    return os.path.join(self.root, path.lstrip("/"))

  def _name(self, local: str) -> str:
    """gcsfs-style name of a local path: 'bucket/key', no scheme."""
    return os.path.relpath(local, self.root)

  def open(self, path, mode="rb", **kwargs):   # pylint: disable=arguments-differ
    del kwargs
    local = self._local(path)
    if any(c in mode for c in "wax"):
      os.makedirs(os.path.dirname(local), exist_ok=True)   # GCS has no directories to create first
    return open(local, mode)  # pylint: disable=unspecified-encoding

  def exists(self, path, **kwargs):
    return os.path.exists(self._local(path))

  def isdir(self, path):
    return os.path.isdir(self._local(path))

  def ls(self, path, detail=False, **kwargs):
    local = self._local(path)
    if not os.path.isdir(local):
      raise FileNotFoundError(path)
    names = [self._name(os.path.join(local, n)) for n in sorted(os.listdir(local))]
    return [self.info("gs://" + n) for n in names] if detail else names

  listdir = ls

  def glob(self, path, **kwargs):
    return sorted(self._name(p) for p in globlib.glob(self._local(path)))

  def walk(self, path, maxdepth=None, topdown=True, on_error="omit", **kwargs):
    for root, dirs, files in os.walk(self._local(path), topdown=topdown):
      yield "gs://" + self._name(root), dirs, files

  def info(self, path, **kwargs):
    local = self._local(path)
    if not os.path.exists(local):
      raise FileNotFoundError(path)
    st = os.stat(local)
    return {"name": self._name(local), "size": st.st_size, "mtime": st.st_mtime,
            "type": "directory" if os.path.isdir(local) else "file"}

  def makedirs(self, path, exist_ok=False):
    os.makedirs(self._local(path), exist_ok=exist_ok)

  def mkdir(self, path, create_parents=True, **kwargs):
    os.makedirs(self._local(path), exist_ok=True) if create_parents else os.mkdir(self._local(path))

  def rm(self, path, recursive=False, maxdepth=None):
    local = self._local(path)
    if os.path.isdir(local):
      if not recursive:
        raise IsADirectoryError(path)
      shutil.rmtree(local)
    else:
      os.remove(local)

  def rmdir(self, path):
    os.rmdir(self._local(path))

  def mv(self, path1, path2, recursive=True, maxdepth=None, **kwargs):
    os.replace(self._local(path1), self._local(path2))

  rename = mv


@contextlib.contextmanager
def fake_gcs(root):
  """Within this context ``gs://bucket/key`` is ``root/bucket/key`` for epath, Orbax and TensorStore."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top

  root = os.path.abspath(os.fspath(root))
  os.makedirs(root, exist_ok=True)

  def kvstore(ckpt_path: str) -> dict:
    return {"driver": "file", "path": FakeGCSFileSystem(root=root)._local(ckpt_path)}  # pylint: disable=protected-access

  previous = {p: fsspec.registry.get(p) for p in FakeGCSFileSystem.protocol}
  FakeGCSFileSystem.root = root
  for protocol in FakeGCSFileSystem.protocol:
    fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access  (epath caches it)
  try:
    with mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
         mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False):
      yield root
  finally:
    FakeGCSFileSystem.root = ""
    backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access
    for protocol, cls in previous.items():
      if cls is not None:
        fsspec.register_implementation(protocol, cls, clobber=True)
      else:
        importlib.import_module("fsspec.registry")._registry.pop(protocol, None)  # pylint: disable=protected-access
