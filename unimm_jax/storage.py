"""Workdir storage: every read and write of a run's directory goes through ``etils.epath``.

epath gives one pathlib-like API over local paths and ``gs://`` (also ``s3://``, ``az://``), so the main job,
evaluation, sampling and export run unchanged on a Cloud Storage workdir. Orbax (checkpoints) and the tokenizer,
config, report and export writers use epath directly. Two libraries need help:

* tensorboardX opens event files with Python's ``open`` (or google-cloud-storage for ``gs://``, which it
  imports only if installed): :func:`register_tensorboard_backends` gives it a writer over epath for remote
  schemes. Remote objects cannot be appended to, so each flush rewrites the whole event file (what tensorboardX's
  own GCS writer does); scalar event files stay small (kilobytes), and TensorBoard sees the events as they come.
* ``shutil.copytree`` knows only local paths: :func:`copy_tree` copies through epath.
"""

from __future__ import annotations

import io
import os

from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az")


def absolute_path(path) -> epath.Path:
  """Local paths made absolute (Orbax requires it); ``gs://`` and other URLs unchanged."""
  text = str(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class EpathRecordWriter:
  """A file-like sink for tensorboardX's RecordWriter that rewrites ``path`` through epath on every flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self._buffer = io.BytesIO()
    self.closed = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


class _EpathWriterFactory:

  def open(self, path: str) -> EpathRecordWriter:
    return EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_backends() -> None:
  """Makes tensorboardX write ``gs://`` (``s3://``, ``az://``) event files through epath. Idempotent."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in REMOTE_SCHEMES:
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathWriterFactory):
      record_writer.register_writer_factory(scheme, _EpathWriterFactory())


def copy_tree(source, target) -> None:
  """Copies the directory ``source`` to ``target`` (created), file by file, through epath (any scheme)."""
  source, target = epath.Path(source), epath.Path(target)
  target.mkdir(parents=True, exist_ok=True)
  for child in source.iterdir():
    if child.is_dir():
      copy_tree(child, target / child.name)
    else:
      (target / child.name).write_bytes(child.read_bytes())
