"""The lock that lets a test run while no other pytest worker runs one (``tests/run_alone.py``)."""

import fcntl
import os
import threading
import time

from run_alone import RunAlone


def _turnstile_taken(directory):
  with open(os.path.join(directory, "turnstile"), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


def test_shared_holders_overlap_and_an_exclusive_one_waits_for_them_and_goes_before_later_ones(tmp_path):
  # flock locks belong to an open file, so each RunAlone (its own opened files) contends as a worker process would.
  events, lock = [], threading.Lock()
  release = {name: threading.Event() for name in ("r1", "r2", "w")}

  def hold(name, exclusive):
    with RunAlone(str(tmp_path)).hold(exclusive):
      with lock:
        events.append(f"{name} in")
      release[name].wait(30)
      with lock:
        events.append(f"{name} out")   # before the lock is let go

  release["r2"].set()
  release["w"].set()
  first = threading.Thread(target=hold, args=("r1", False))
  first.start()
  while not events:
    time.sleep(0.01)
  with RunAlone(str(tmp_path)).hold(exclusive=False):   # shared holders do not wait for each other
    assert events == ["r1 in"]
  writer = threading.Thread(target=hold, args=("w", True))
  writer.start()
  deadline = time.monotonic() + 30
  while not _turnstile_taken(str(tmp_path)):            # the writer waits for r1, holding the turnstile shut
    assert time.monotonic() < deadline
    time.sleep(0.01)
  later = threading.Thread(target=hold, args=("r2", False))
  later.start()
  time.sleep(0.3)
  assert events == ["r1 in"]                            # neither the writer nor the later reader got in
  release["r1"].set()
  for t in (first, writer, later):
    t.join(30)
  assert events == ["r1 in", "r1 out", "w in", "w out", "r2 in", "r2 out"]
