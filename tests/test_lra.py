"""Every LRA config's `:smoke` and the file-backed tasks train end to end through `trainer.train`
(the TFDS ones, lra_text and lra_image, in tests/test_tfds.py), and `inspect --png` draws
image tasks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer import train
from trainer.data import inspect


def _run(argv) -> list[dict]:
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  assert train.main(argv + ["--config.progress_bar=false"]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _finite_losses(rows) -> list[float]:
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  return losses


@pytest.mark.parametrize("config", ["configs/lra_pathfinder.py:smoke", "configs/listops.py:smoke"])
def test_generated_lra_smoke_trains(config, tmp_path):
  rows = _run([f"--config={config}", f"--workdir={tmp_path / 'run'}"])
  _finite_losses(rows)
  assert any("eval/accuracy" in r for r in rows)
  waits = [r["train/data_wait_fraction"] for r in rows if "train/loss" in r]
  assert waits and all(0.0 <= w <= 1.0 for w in waits)


def test_lra_retrieval_smoke_trains_on_tsv_files(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "tsv_data"
  data.mkdir()
  for name, n in (("train", 40), ("eval", 12), ("test", 12)):
    with open(data / f"new_aan_pairs.{name}.tsv", "w") as f:
      for i in range(n):
        words = lambda: " ".join(rng.choice(["graph", "parse", "tree", "model", "corpus"], rng.integers(5, 40)))
        f.write(f"{i % 2}.0\tid{i}a\tid{i}b\t{words()}\t{words()}\n")
  rows = _run(["--config=configs/lra_retrieval.py:smoke", f"--workdir={tmp_path / 'run'}",
               f"--config.task.retrieval.data_dir={data}", "--config.eval_examples=100"])
  _finite_losses(rows)
  evals = [r for r in rows if "eval/accuracy" in r]
  assert evals and all(r["eval/examples"] == 12 for r in evals)  # the whole eval file, each pair once


def test_textdir_trains_on_a_directory(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(12):
    (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 20)
  rows = _run(["--config=configs/default.py:smoke", f"--workdir={tmp_path / 'run'}", "--config.task.name=textdir",
               f"--config.task.textdir.path={corpus}", "--config.task.seq_len=64"])
  _finite_losses(rows)
  assert any("eval/bits_per_token" in r for r in rows)


def test_inspect_draws_pathfinder_pngs(tmp_path, capsys):
  from PIL import Image
  out = tmp_path / "png"
  assert inspect.main(["--config=configs/lra_pathfinder.py", "--split=test", "--num=2", f"--png={out}"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["index"] for r in rows] == [0, 1]
  for r in rows:
    image = np.asarray(Image.open(r["png"]))
    assert image.shape == (256, 256)  # 32 x 32 enlarged 8 times
    # The picture is the example's ascii view: marker pixels are white, background black.
    ascii_rows = r["ascii"]
    assert (image[::8, ::8] == 255).sum() == sum(line.count("o") for line in ascii_rows)
    assert (image[::8, ::8] == 0).sum() == sum(line.count(".") for line in ascii_rows)


def test_inspect_png_refuses_a_task_without_a_grid(tmp_path, capsys):
  assert inspect.main(["--config=configs/default.py:smoke", f"--png={tmp_path}"]) == 2
  assert "not laid out on a grid" in capsys.readouterr().err
