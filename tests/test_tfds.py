"""The TFDS task through the real loading code: `tfds.testing.mock_data` for imdb_reviews and
cifar10, and small data sets that the tests build themselves (ArrayRecord files in a
temporary data_dir, read back by name, as a user's prepared data set is).

Expected values are recomputed here from the records the data source returns, never
taken from the task's own encoding functions.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from trainer.data.base import DataError  # noqa: E402
from trainer.data.tfds_task import TfdsTask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
PYTHON = VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable


class SeqmixTinyText(tfds.core.GeneratorBasedBuilder):
  """20 train / 6 test reviews of distinct lengths; label = length parity. Plain int `score`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2),
        "score": tfds.features.Scalar(dtype=np.int64), "other": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", 40), "test": self._generate_examples("test", 12)}

  def _generate_examples(self, split, n):
    rng = np.random.default_rng(len(split))
    for i in range(n):
      length = int(rng.integers(3, 60))
      text = "".join(rng.choice(list("abcdefgh é"), length))
      yield f"{split}{i}", {"text": text, "label": length % 2, "score": 7 if i == n - 1 else i % 3,
                            "other": text[::-1]}


class SeqmixTinyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(30), "test": self._generate_examples(9)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      # PIL images: TFDS encodes them to PNG without TensorFlow.
      yield i, {"image": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  SeqmixTinyText(data_dir=d, file_format="array_record").download_and_prepare()
  SeqmixTinyImages(data_dir=d, file_format="array_record").download_and_prepare()
  return d


TEXT = dict(name="seqmix_tiny_text", train_split="train[:75%]", validation_split="train[75%:]", test_split="test")


def _text_task(data_dir, seq_len=32, **kw):
  return TfdsTask(seq_len=seq_len, seed=3, data_dir=data_dir, **(TEXT | kw))


def _bytes_of(ids, seg):
  return bytes((ids[seg != 0] - 1).astype(np.uint8).tolist())


def test_built_text_examples_are_the_records(data_dir):
  task = _text_task(data_dir)
  source = tfds.data_source("seqmix_tiny_text", split="test", data_dir=data_dir)
  assert task.num_examples("test") == len(source) == 12
  for i in range(12):
    ex = task.example("test", i)
    want = source[i]["text"][:32]  # prepared data gives bytes; the first seq_len are kept
    assert isinstance(want, bytes)
    assert _bytes_of(ex["inputs"], ex["segment_ids"]) == want
    n = len(want)
    assert np.all(ex["segment_ids"][:n] == 1) and np.all(ex["segment_ids"][n:] == 0)
    assert np.array_equal(ex["positions"][:n], np.arange(n))
    assert int(ex["label"]) == int(source[i]["label"]) and float(ex["label_weights"]) == 1.0
  filler = task.example("test", 12)  # past the end: weight 0, no tokens
  assert float(filler["label_weights"]) == 0.0 and not filler["segment_ids"].any()
  batch = task.batch("test", [10, 11, 12, 13])
  assert batch["label_weights"].tolist() == [1.0, 1.0, 0.0, 0.0]
  assert _bytes_of(batch["inputs"][1], batch["segment_ids"][1]) == source[11]["text"][:32]


def test_train_stream_visits_each_record_once_per_epoch(data_dir):
  task = _text_task(data_dir)
  n = task.num_examples("train")
  assert n == 30
  source = tfds.data_source("seqmix_tiny_text", split="train[:75%]", data_dir=data_dir)
  texts = [source[i]["text"][:32] for i in range(n)]
  for epoch in range(2):
    seen = [_bytes_of(e["inputs"], e["segment_ids"]) for e in (task.example("train", epoch * n + j) for j in range(n))]
    assert sorted(seen) == sorted(texts)
  order0 = [task.record_index("train", j) for j in range(n)]
  order1 = [task.record_index("train", n + j) for j in range(n)]
  assert order0 != order1 and order0 != list(range(n))  # reshuffled each epoch
  other = TfdsTask(seq_len=32, seed=4, data_dir=data_dir, **TEXT)
  assert [other.record_index("train", j) for j in range(n)] != order0
  again = _text_task(data_dir)
  assert [again.record_index("train", j) for j in range(n)] == order0  # a pure function of (seed, index)


def test_lm_and_match_kinds(data_dir):
  lm = _text_task(data_dir, seq_len=16, kind="lm")
  source = tfds.data_source("seqmix_tiny_text", split="train[75%:]", data_dir=data_dir)
  ex = lm.example("validation", 0)
  text = source[0]["text"][:17]
  n = len(text) - 1
  assert _bytes_of(ex["inputs"], ex["segment_ids"]) == text[:-1]
  assert bytes((ex["targets"][:n] - 1).tolist()) == text[1:]
  assert ex["weights"].sum() == n and lm.spec.kind == "lm" and lm.spec.vocab_size == 257
  match = _text_task(data_dir, kind="match", inputs2="other")
  ex = match.example("validation", 1)
  assert _bytes_of(ex["inputs2"], ex["segment_ids2"]) == source[1]["other"][:32]
  assert _bytes_of(ex["inputs"], ex["segment_ids"]) == source[1]["text"][:32]


def _grey_reference(rgb: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale on uint8, written out per pixel: to [0, 1], the luma weights,
  back to uint8 by truncating x * 255.5."""
  out = np.zeros(rgb.shape[:2], np.int64)
  for y in range(rgb.shape[0]):
    for x in range(rgb.shape[1]):
      r, g, b = (float(c) / 255.0 for c in rgb[y, x])
      out[y, x] = min(int((0.2989 * r + 0.5870 * g + 0.1140 * b) * 255.5), 255)
  return out


def test_built_images_grey_and_pixels(data_dir):
  task = TfdsTask(seq_len=64, seed=0, data_dir=data_dir, name="seqmix_tiny_images", train_split="train[:80%]",
                  validation_split="train[80%:]", test_split="test", inputs="image", encoding="grey")
  assert task.spec.grid == (8, 8) and task.spec.num_classes == 3 and task.spec.vocab_size == 257
  source = tfds.data_source("seqmix_tiny_images", split="test", data_dir=data_dir)
  for i in (0, 5):
    image = source[i]["image"]
    assert image.shape == (8, 8, 3)
    assert np.array_equal(task.example("test", i)["inputs"], _grey_reference(image).reshape(-1) + 1)
  pix = TfdsTask(seq_len=192, seed=0, data_dir=data_dir, name="seqmix_tiny_images", train_split="train[:80%]",
                 validation_split="train[80%:]", test_split="test", inputs="image", encoding="pixels")
  assert np.array_equal(pix.example("test", 2)["inputs"], source[2]["image"].reshape(-1).astype(np.int32) + 1)
  with pytest.raises(DataError, match=r"task.seq_len=100 does not match .* set task.seq_len=64"):
    TfdsTask(seq_len=100, seed=0, data_dir=data_dir, name="seqmix_tiny_images", train_split="train[:80%]",
             validation_split="train[80%:]", test_split="test", inputs="image", encoding="grey")


@pytest.mark.parametrize("kw, pattern", [
    (dict(name="seqmix_no_such_set"), r"task.tfds.name='seqmix_no_such_set' is neither a TFDS data set"),
    (dict(name="imdb_reviews:9.9.9"), r"task.tfds.name='imdb_reviews:9.9.9' names no data set, config or version"),
    (dict(name="imdb_reviews/nosuchconfig"), r"task.tfds.name='imdb_reviews/nosuchconfig' names no data set"),
    (dict(name="imdb_reviews"), r"task.tfds.name='imdb_reviews' is not prepared in .*tfds build imdb_reviews"),
    (dict(train_split="train[:75%"), r"task.tfds.train_split='train\[:75%' is not a split"),
    (dict(validation_split="valid"), r"task.tfds.validation_split='valid' is not a split"),
    (dict(validation_split="train[50%:]"), r"share records"),
    (dict(inputs="txt"), r"task.tfds.inputs='txt' is not a feature of 'seqmix_tiny_text'; its features are"),
    (dict(label="score"), r"label feature 'score' declares no number of classes"),
    (dict(label="score", num_classes=3), r"holds label 7, outside task.tfds.num_classes=3"),
    (dict(num_classes=1), r"task.tfds.num_classes=1 is smaller than the 2 classes"),
    (dict(encoding="utf16"), r"task.tfds.encoding='utf16' is not valid"),
    (dict(kind="match"), r"task.tfds.inputs2 is empty"),
    (dict(data_dir="/no/such/dir"), r"task.tfds.data_dir='/no/such/dir' is not a directory"),
])
def test_bad_settings_are_one_sentence(data_dir, kw, pattern):
  settings = TEXT | {"data_dir": data_dir} | kw
  with pytest.raises(DataError, match=pattern) as e:
    TfdsTask(seq_len=32, seed=0, **settings)
  assert "\n" not in str(e.value)


def test_mock_imdb_text_comes_back_as_str():
  with tfds.testing.mock_data(num_examples=10):
    task = TfdsTask(seq_len=64, seed=0, name="imdb_reviews", train_split="train[:90%]",
                    validation_split="train[90%:]", test_split="test")
    source = tfds.data_source("imdb_reviews", split="test")
    record = source[3]
    assert isinstance(record["text"], str)  # mock text is str, prepared text bytes
    ex = task.example("test", 3)
    assert _bytes_of(ex["inputs"], ex["segment_ids"]) == record["text"].encode()[:64]
    assert int(ex["label"]) == int(record["label"])


@pytest.fixture
def mock_cifar(monkeypatch):
  """Mock cifar10. The mock encodes its random images to PNG through TensorFlow, which seqmix
  does not install; encode them with PIL instead (decoding, the part seqmix runs, is TFDS's own)."""
  from tensorflow_datasets.core.features import image_feature  # noqa: PLC0415

  def encode_png(self, np_image):
    del self
    buf = io.BytesIO()
    Image.fromarray(np_image.squeeze(-1) if np_image.shape[-1] == 1 else np_image).save(buf, format="PNG")
    return buf.getvalue()
  monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", encode_png)
  with tfds.testing.mock_data(num_examples=24):
    yield


def test_mock_cifar10_grey(mock_cifar):
  task = TfdsTask(seq_len=1024, seed=0, name="cifar10", train_split="train[:90%]", validation_split="train[90%:]",
                  test_split="test", inputs="image", encoding="grey")
  assert task.spec.grid == (32, 32) and task.spec.num_classes == 10
  image = tfds.data_source("cifar10", split="test")[1]["image"]
  assert np.array_equal(task.example("test", 1)["inputs"], _grey_reference(image).reshape(-1) + 1)


def _train(argv):
  from trainer import train
  return train.main(argv)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_lra_image_smoke_trains_swin_on_the_task_grid(mock_cifar, tmp_path):
  """The 2-D mixer takes the 32 x 32 grid from the task (model.swin.grid left at (0, 0))."""
  workdir = str(tmp_path / "img")
  assert _train(["--config=configs/lra_image.py:smoke", f"--workdir={workdir}", "--config.model.mixer=swin",
                 "--config.progress_bar=false"]) == 0
  from trainer.config import load_config
  from trainer.experiment import Experiment
  exp = Experiment(load_config("configs/lra_image.py:smoke", ["model.mixer=swin"]), str(tmp_path / "probe"))
  assert dict(dict(exp.spec.mixer_options)["swin"])["grid"] == (32, 32)
  assert len(_losses(workdir)) == 3


def test_lra_text_smoke_trains_on_mock_imdb(tmp_path):
  workdir = str(tmp_path / "text")
  with tfds.testing.mock_data(num_examples=40):
    assert _train(["--config=configs/lra_text.py:smoke", f"--workdir={workdir}", "--config.progress_bar=false",
                   "--config.eval_examples=100"]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/accuracy" in line]
  # The mock serves 40 records for every split expression: evaluation scores all 40, once each.
  assert evals and all(r["eval/examples"] == 40 for r in evals)


BUILT = ["--config=configs/lra_text.py:smoke", "--config.task.tfds.name=seqmix_tiny_text",
         "--config.task.tfds.train_split=train[:75%]", "--config.task.tfds.validation_split=train[75%:]",
         "--config.task.seq_len=32", "--config.progress_bar=false", "--config.log_every=1",
         "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0", "--config.keep_best=false"]


def test_resume_over_tfds_is_exact(data_dir, tmp_path):
  """4 steps + resume to 8 (a second epoch begins at step 4: 30 records, batch 8) = 8 steps straight."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  args = BUILT + [f"--config.task.tfds.data_dir={data_dir}", "--config.checkpoint_every=4"]
  assert _train(args + [f"--workdir={straight}", "--config.total_steps=8"]) == 0
  assert _train(args + [f"--workdir={resumed}", "--config.total_steps=4"]) == 0
  assert _train(args + [f"--workdir={resumed}", "--config.total_steps=8"]) == 0
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert all(a[s] == b[s] for s in a), (a, b)


def test_refused_data_leaves_no_workdir(data_dir, tmp_path):
  workdir = tmp_path / "never"
  r = subprocess.run([PYTHON, "-m", "trainer.train", f"--workdir={workdir}", *BUILT,
                      f"--config.task.tfds.data_dir={data_dir}", "--config.task.tfds.inputs=txt"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "task.tfds.inputs='txt' is not a feature" in r.stderr and "Traceback" not in r.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_two_processes_read_their_own_rows(data_dir, tmp_path):
  """A 2-process x 2-device run over the prepared data set (read by name, with no builder code
  in those processes) has the losses of a 1-process x 4-device run: each host read its rows."""
  from tests.test_multihost import RTOL, _assert_close, _env, _launch  # noqa: PLC0415
  args = [a for a in BUILT if a != "--config=configs/lra_text.py:smoke"]
  args += [f"--config.task.tfds.data_dir={data_dir}", "--config.total_steps=4", "--config.batch_size=8"]
  two = str(tmp_path / "two")
  env = _env() | {"SEQMIX_LOCAL_DEVICES": "2"}
  r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_local.sh"), "2", f"--workdir={two}",
                      "--config=configs/lra_text.py:smoke", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=240)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  one = str(tmp_path / "one")
  r = subprocess.run([PYTHON, "-m", "trainer.train", f"--workdir={one}", "--config=configs/lra_text.py:smoke", *args],
                     cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  _assert_close(_losses(two), _losses(one), RTOL)
  del _launch
