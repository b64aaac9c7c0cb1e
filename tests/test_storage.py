"""The main job's reads and writes on a ``gs://`` workdir, against a local fake of Cloud Storage (fake_gcs.py).

Training (checkpoints, tokenizers, config, TensorBoard, report), resume, the generation report, export and
Pipeline.load all run on ``gs://bucket/...``; the test then finds every file under the fake's directory and
nothing in the working directory (where an ``open("gs://...")`` that bypassed epath would have written).
"""

import json
import os

from etils import epath

from fake_gcs import fake_gcs
from test_train import tiny_config
from unimm_jax import evaluate, export, train
from unimm_jax.pipeline import Pipeline


def test_main_job_writes_resumes_and_exports_on_a_gs_workdir(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = tiny_config(**{"train.steps": 4, "ckpt.every_steps": 2, "eval.every_steps": 2, "eval.num_generate": 4,
                          "data.val_size": 64})
  with fake_gcs(tmp_path / "bucket_store") as root:
    workdir = "gs://unimm-test/runs/tiny"
    report = train.train_and_evaluate(config, workdir)
    assert report["step"] == 4
    local = epath.Path(root) / "unimm-test" / "runs" / "tiny"
    assert sorted(p.name for p in (local / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (local / "tokenizers" / "text_tokenizer.json").exists() and (local / "config.json").exists()
    on_disk = json.loads((local / "report.json").read_text())
    assert [p[0] for p in on_disk["val_curve"]] == [0, 2, 4]
    events = list((local / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"val/bits_text" in events[0].read_bytes()
    # The same command again resumes from the gs:// checkpoint and trains nothing.
    again = train.train_and_evaluate(config, workdir)
    assert again["history"] == [] and again["val_bits_per_token"] == report["val_bits_per_token"]
    # Generation report, export and loading the export, all on gs://.
    full = evaluate.evaluate_workdir(workdir, config)
    assert 0.0 <= full["t2i_accuracy"] <= 1.0 and (local / "report.html").exists()
    export.export(workdir, "gs://unimm-test/models/tiny")
    bundle = epath.Path(root) / "unimm-test" / "models" / "tiny"
    assert (bundle / "model.safetensors").exists() and (bundle / "tokenizers" / "text_tokenizer.json").exists()
    pipe = Pipeline.load("gs://unimm-test/models/tiny")
    assert pipe.step == 4
  assert not os.listdir(cwd), f"wrote outside epath: {os.listdir(cwd)}"
