"""Bad input at the command line is one ``error:`` line on stderr and exit status 2, never a traceback; prompt
words outside the vocabulary are named in one warning per call."""

import logging
import os
import subprocess
import sys

import pytest

from unimm_jax import train
from unimm_jax.pipeline import Pipeline
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNKNOWN = "a purple hexagon floating in space"
UNKNOWN_WARNING = ("prompt 'a purple hexagon floating in space': words not in the vocabulary, read as UNK: purple, "
                   "hexagon, floating, in, space")   # the shapes captions have no "in"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny trained workdir (4 steps: these tests need a model, not a good one)."""
  path = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(tiny_config(**{"train.steps": 4, "ckpt.every_steps": 4}), path)
  return path


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def _error_line(proc) -> str:
  """The one ``error:`` line of a failed command (other stderr lines are progress logs)."""
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_an_image_flag_naming_a_text_file_or_no_file(workdir, tmp_path):
  notes = tmp_path / "notes.txt"
  notes.write_text("not an image\n")
  proc = _run("unimm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path / 'o'}", "--task=i2t", f"--image={notes}")
  assert _error_line(proc) == f"error: --image: {notes} is not an image PIL can read (not a format it knows)"
  missing = tmp_path / "missing.png"
  proc = _run("unimm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path / 'o'}", "--task=inpaint",
              f"--image={missing}", f"--mask={notes}")
  assert _error_line(proc) == f"error: --image: cannot read {missing}: No such file or directory"


def test_missing_flags_and_a_directory_that_is_no_model(tmp_path):
  # Before any model is loaded: the whole of stderr is the one line.
  proc = _run("unimm_jax.sample", "--task=t2i", "--prompt=a red circle")
  assert _error_line(proc).startswith("error: --workdir and --out are required, e.g. python -m unimm_jax.sample ")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = _run("unimm_jax.sample", f"--workdir={tmp_path}", "--prompt=a red circle")
  assert _error_line(proc).startswith("error: --out is required, e.g. ")
  proc = _run("unimm_jax.sample", f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}", "--prompt=a")
  assert _error_line(proc) == (f"error: --workdir: {tmp_path / 'nothing'} is neither a training workdir (no "
                               "config.json) nor an exported model (no model.json)")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = _run("unimm_jax.main", "--config=configs/shapes.py")
  assert proc.stderr.strip() == ("error: --workdir is required: the run's directory for checkpoints and reports, "
                                 "e.g. --workdir=runs/shapes")
  assert _error_line(proc)
  proc = _run("unimm_jax.main", "--config=configs/shapes.py", f"--workdir={tmp_path}", "extra")
  assert proc.stderr.strip() == "error: unexpected arguments: extra (flags are --name=value)" and proc.returncode == 2


def _unk_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "not in the vocabulary" in r.getMessage()]


def test_prompt_words_outside_the_vocabulary_are_named_once_per_call(workdir, caplog):
  pipe = Pipeline.load(workdir)
  with caplog.at_level(logging.WARNING):
    pipe.text_to_image([UNKNOWN] * 3, steps=2)   # three prompts, one warning
    assert _unk_warnings(caplog) == [UNKNOWN_WARNING]
    caplog.clear()
    pipe.text_to_image(["a small red circle at the top left"], steps=2)
    assert _unk_warnings(caplog) == []
    pipe.infill(["a <mask> hexagon at the top left", "a <mask> circle"], steps=2)   # <mask> is no word
    assert _unk_warnings(caplog) == [
        "prompt 'a <mask> hexagon at the top left': words not in the vocabulary, read as UNK: hexagon"]


def test_the_sample_command_shows_the_unknown_words_warning(workdir, tmp_path):
  proc = _run("unimm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path}", "--task=t2i", f"--prompt={UNKNOWN}",
              "--num=2", "--steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if "not in the vocabulary" in line]
  assert len(warnings) == 1 and warnings[0].endswith(UNKNOWN_WARNING), proc.stderr[-3000:]


def test_sample_cache_and_block_flags(workdir, tmp_path):
  """``--cache=exact`` on a model not trained for it is one error line; ``--cache=dual --block_length`` writes
  captions block by block."""
  image = tmp_path / "a.png"
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(image)
  base = ("unimm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path / 'o'}", "--task=i2t", f"--image={image}")
  proc = _run(*base, "--cache=exact")
  assert _error_line(proc) == ("error: --cache=exact needs a model trained with config.model.isolate_given=True "
                               "(use --cache=dual)")
  proc = _run(*base, "--refresh_every=2")
  assert _error_line(proc) == "error: --refresh_every is for --cache=dual"
  proc = _run(*base, "--score_passes=1")
  assert _error_line(proc) == ("error: --score_passes is for --task=i2t with --candidates (or "
                               "config.sample.i2t_candidates) above 1")
  proc = _run(*base, "--cache=dual", "--refresh_every=2", "--block_length=4", "--steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "o" / "samples.json").exists()
