"""A readers-writer lock across processes, for tests that must run while no other pytest worker runs one."""

import contextlib
import fcntl
import os


class RunAlone:
  """A readers-writer lock across the workers' processes (``flock``), writers first.

  A shared holder passes the turnstile first, which a waiting exclusive holder keeps shut, so a stream of ordinary
  tests on the other workers cannot starve an exclusive one.
  """

  def __init__(self, directory):
    self._turnstile = open(os.path.join(directory, "turnstile"), "a+")   # pylint: disable=consider-using-with
    self._room = open(os.path.join(directory, "room"), "a+")             # pylint: disable=consider-using-with

  @contextlib.contextmanager
  def hold(self, exclusive):
    fcntl.flock(self._turnstile, fcntl.LOCK_EX)
    try:
      if not exclusive:
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
      fcntl.flock(self._room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    finally:
      if exclusive:
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
    try:
      yield
    finally:
      fcntl.flock(self._room, fcntl.LOCK_UN)
