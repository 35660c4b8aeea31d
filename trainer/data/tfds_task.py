"""Any prepared TFDS data set as a task: `task.name=tfds`, settings under `task.tfds.*`.

Records are read by random access through `tfds.data_source` (ArrayRecord files; no
TensorFlow at training time), so an example is a pure function of (seed, split, index)
like a generated task's, and each host reads only the rows it holds:

* train: the endless stream visits the train split once per epoch, in an order drawn
  from (seed, epoch): example i is record perm_e[i mod N] with e = i div N;
* validation / test: example i is record i; evaluation scores records [0, n) in order,
  and the rows that round the last batch up past the split's end are fillers of zero
  weight (`label_weights` / `weights` 0), so nothing is counted twice.

Each split is a TFDS split expression (`train[:90%]`, `train[90%:]`, `test`, ...); the
three must not share a record, which is checked from the split's file instructions.

Encodings of the input feature(s) into token ids (0 is always padding):

* ``bytes``: text as its UTF-8 bytes, id = byte + 1 (vocab 257), the first `seq_len` kept;
* ``grey``: an image as grey levels, row-major, id = level + 1 (vocab 257). RGB images are
  converted with ITU-R 601 luma weights (0.2989, 0.5870, 0.1140) and truncated to an
  integer level after scaling by 255.5/255, as `tf.image.rgb_to_grayscale` on uint8 does;
* ``pixels``: an image's channel values, row-major with channels interleaved
  (T = H * W * C), id = value + 1 (vocab 257);
* ``tokens``: an integer sequence feature as it is, id = token + 1 (vocab `vocab_size` + 1).

Kinds: ``classify`` (one input, one label), ``match`` (two inputs `inputs` and `inputs2`,
one label: the dual encoder) and ``lm`` (one text per record, next-byte targets over
its first `seq_len` + 1 bytes).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from trainer.data.base import SPLITS, DataError, Task, TaskSpec

ENCODINGS = ("bytes", "grey", "pixels", "tokens")
KINDS = ("classify", "match", "lm")
# Labels read to measure chance (the majority label of the validation split) and to check
# the label range when the label feature does not declare its classes.
LABEL_SCAN = 20_000
GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


def _tfds():
  """tensorflow_datasets, imported on first use (it takes ~2 s; generated tasks never need it)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  return tfds


def prepare_command(name: str, data_dir: str) -> str:
  builder = name.split(":")[0]
  return f"tfds build {builder} --data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record"


def open_source(name: str, split_key: str, expr: str, data_dir: str, decoders=None):
  """`tfds.data_source(name, split=expr)`, every failure turned into one sentence."""
  tfds = _tfds()
  kwargs = {"data_dir": data_dir or None, "download": False}
  if decoders:
    kwargs["decoders"] = decoders
  # The name first (a ValueError or AssertionError here is about the name, config or version),
  # then the split, so each failure names the key that caused it.
  try:
    tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"task.tfds.name={name!r} is neither a TFDS data set nor prepared in "
                    f"{data_dir or 'the default data_dir'}; check the name (e.g. 'imdb_reviews', "
                    f"'cifar10', or NAME/CONFIG:VERSION)") from None
  except (ValueError, AssertionError) as e:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"task.tfds.name={name!r} names no data set, config or version TFDS knows ({text}); write "
                    f"NAME, NAME/CONFIG or NAME/CONFIG:VERSION") from None
  try:
    return tfds.data_source(name, split=expr, **kwargs)
  except ValueError as e:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"task.tfds.{split_key}={expr!r} is not a split of {name!r} ({text}); write a TFDS split "
                    f"expression such as 'train', 'train[:90%]' or 'test'") from None
  except (NotImplementedError, RuntimeError, FileNotFoundError, OSError):
    pass
  # Diagnose: not prepared at all, or prepared in a format without random access.
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    where, prepared = str(builder.data_dir), builder.is_prepared()
    fmt = str(getattr(builder.info, "file_format", "") or "")
  except Exception:  # the builder itself cannot be made: report the generic reason below
    where, prepared, fmt = data_dir or "the default data_dir", False, ""
  if prepared:
    raise DataError(f"task.tfds.name={name!r} is prepared in {where} as {fmt or 'a format'} without random access; "
                    f"rebuild it with `{prepare_command(name, data_dir)}`")
  raise DataError(f"task.tfds.name={name!r} is not prepared in {where}; prepare it on a machine with internet with "
                  f"`{prepare_command(name, data_dir)}` and point task.tfds.data_dir at that directory")


def read_records(source, keys: list[int]) -> list:
  """Records `keys` of a data source: one `__getitems__` call (ArrayRecord reads them in
  parallel), or one by one where it is missing or broken (tfds.testing.mock_data in TFDS
  4.9 patches it with a function that lacks its `self` argument)."""
  if not keys:
    return []
  try:
    return list(source.__getitems__(keys))
  except (TypeError, AttributeError):
    return [source[k] for k in keys]


def grey_levels(image: np.ndarray) -> np.ndarray:
  """[H, W, C] uint8 -> [H, W] grey levels 0..255, as tf.image.rgb_to_grayscale on uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    return image.astype(np.int32)
  if image.shape[-1] == 1:
    return image[..., 0].astype(np.int32)
  if image.shape[-1] != 3:
    raise DataError(f"encoding 'grey' takes images with 1 or 3 channels, not {image.shape[-1]}")
  luma = (image.astype(np.float64) / 255.0) @ GREY_WEIGHTS
  return np.clip((luma * 255.5).astype(np.int32), 0, 255)


def encode(value: Any, encoding: str, limit: int, feature: str) -> np.ndarray:
  """One feature value -> token ids (>= 1), at most `limit` of them."""
  if encoding == "bytes":
    if isinstance(value, np.ndarray) and value.dtype == object:
      value = value.item()
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)  # mock data gives str, files bytes
    return np.frombuffer(data[:limit], np.uint8).astype(np.int32) + 1
  if encoding == "grey":
    return grey_levels(value).reshape(-1)[:limit] + 1
  if encoding == "pixels":
    return np.asarray(value).astype(np.int32).reshape(-1)[:limit] + 1
  ids = np.asarray(value).astype(np.int64).reshape(-1)[:limit]
  if ids.size and ids.min() < 0:
    raise DataError(f"feature {feature!r} holds the negative token id {int(ids.min())}; encoding 'tokens' takes ids >= 0")
  return ids.astype(np.int32) + 1


class TfdsTask(Task):

  def __init__(self, seq_len: int, seed: int, name: str = "", data_dir: str = "", train_split: str = "train",
               validation_split: str = "validation", test_split: str = "test", kind: str = "classify",
               inputs: str = "text", inputs2: str = "", label: str = "label", encoding: str = "bytes",
               vocab_size: int = 0, num_classes: int = 0):
    if not name:
      raise DataError("task.tfds.name is empty; name a prepared TFDS data set, e.g. task.tfds.name=imdb_reviews")
    if kind not in KINDS:
      raise DataError(f"task.tfds.kind={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    if encoding not in ENCODINGS:
      raise DataError(f"task.tfds.encoding={encoding!r} is not valid; choose one of: {', '.join(ENCODINGS)}")
    if kind == "lm" and encoding not in ("bytes", "tokens"):
      raise DataError(f"task.tfds.kind='lm' reads text or token sequences, so task.tfds.encoding={encoding!r} "
                      f"does not fit; use 'bytes' or 'tokens'")
    if kind == "match" and not inputs2:
      raise DataError("task.tfds.kind='match' compares two inputs, but task.tfds.inputs2 is empty; name the "
                      "second input feature")
    if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
      raise DataError(f"task.tfds.data_dir={data_dir!r} is not a directory; point it at the directory that "
                      f"`{prepare_command(name, data_dir)}` filled")
    self.name, self.seed, self.kind, self.encoding = name, int(seed), kind, encoding
    self.data_dir = os.path.expanduser(data_dir) if data_dir else ""
    self.inputs = [inputs] + ([inputs2] if kind == "match" else [])
    self.label_key = label
    self.exprs = {"train": train_split, "validation": validation_split, "test": test_split}
    self.sources = {s: open_source(name, f"{s}_split", e, self.data_dir) for s, e in self.exprs.items()}
    for split, source in self.sources.items():
      if len(source) == 0:
        raise DataError(f"task.tfds.{split}_split={self.exprs[split]!r} of {name!r} holds no records; choose a "
                        f"non-empty split")
    self._check_disjoint()
    features = self._features()
    for key, feature_name in [("inputs", inputs)] + ([("inputs2", inputs2)] if kind == "match" else []) + (
        [("label", label)] if kind != "lm" else []):
      if features is not None and feature_name not in features:
        raise DataError(f"task.tfds.{key}={feature_name!r} is not a feature of {name!r}; its features are: "
                        f"{', '.join(sorted(features))}")
    if encoding == "tokens":
      if vocab_size <= 0:
        raise DataError(f"task.tfds.encoding='tokens' needs task.tfds.vocab_size (the number of token ids in "
                        f"{inputs!r}), not {vocab_size}")
      vocab = int(vocab_size) + 1
    else:
      vocab = 257
    self.vocab = vocab
    grid = (0, 0)
    if encoding in ("grey", "pixels"):
      shape = self._image_shape(features, inputs)
      if encoding == "grey":
        grid, tokens = (shape[0], shape[1]), shape[0] * shape[1]
      else:
        tokens = int(np.prod(shape))
        grid = (shape[0], shape[1] * (shape[2] if len(shape) > 2 else 1))
      if tokens != seq_len:
        raise DataError(f"task.seq_len={seq_len} does not match {name!r}'s {inputs!r} images of shape "
                        f"{tuple(shape)}, which give {tokens} tokens with encoding {encoding!r}; "
                        f"set task.seq_len={tokens}")
    if kind == "lm":
      self.classes = vocab
      chance, note = self._lm_chance(seq_len)
    else:
      self.classes = self._num_classes(features, label, num_classes)
      chance, note = self._label_chance()
    self.spec = TaskSpec(kind="lm" if kind == "lm" else kind, vocab_size=vocab, seq_len=int(seq_len),
                         num_classes=self.classes, chance=chance, chance_note=note, grid=grid)

  # -- set-up checks ---------------------------------------------------------------------

  def _builder(self):
    try:
      return _tfds().builder(self.name, data_dir=self.data_dir or None)
    except Exception:  # mock data or a data set known only by its files: no builder checks
      return None

  def _features(self):
    builder = self._builder()
    return None if builder is None else builder.info.features

  def _check_disjoint(self) -> None:
    """The three splits must not share a record (same file, overlapping record ranges)."""
    builder = self._builder()
    if builder is None or not builder.info.splits:  # mock data has no split files to compare
      return
    ranges = {}
    for split, expr in self.exprs.items():
      ranges[split] = [(fi.filename, fi.skip, fi.skip + fi.take) for fi in builder.info.splits[expr].file_instructions]
    for i, a in enumerate(SPLITS):
      for b in SPLITS[i + 1:]:
        for fa, sa, ea in ranges[a]:
          if any(fa == fb and sa < eb and sb < ea for fb, sb, eb in ranges[b]):
            raise DataError(f"task.tfds.{a}_split={self.exprs[a]!r} and task.tfds.{b}_split={self.exprs[b]!r} "
                            f"share records, so held-out results would include trained examples; choose "
                            f"disjoint slices such as 'train[:90%]' and 'train[90%:]'")

  @staticmethod
  def _image_shape(features, feature_name: str) -> tuple:
    shape = tuple(getattr(features[feature_name], "shape", ())) if features is not None else ()
    if len(shape) < 2 or any(d is None for d in shape):
      raise DataError(f"feature {feature_name!r} has shape {shape}, not a fixed-size image; encodings 'grey' and "
                      f"'pixels' take images of one size")
    return shape

  def _num_classes(self, features, label: str, configured: int) -> int:
    declared = getattr(features[label], "num_classes", None) if features is not None else None
    if configured and declared and configured < declared:
      raise DataError(f"task.tfds.num_classes={configured} is smaller than the {declared} classes of {label!r}; "
                      f"use 0 (take them from the data set) or at least {declared}")
    classes = int(configured or declared or 0)
    if classes < 2:
      raise DataError(f"label feature {label!r} declares no number of classes; set task.tfds.num_classes")
    if not declared:  # a plain integer feature: every scanned label must be a class
      for split in SPLITS:
        labels = self._labels(split)
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.size:
          raise DataError(f"{split} split {self.exprs[split]!r} holds label {int(bad[0])}, outside "
                          f"task.tfds.num_classes={classes}; set num_classes above the largest label")
    return classes

  def _labels(self, split: str) -> np.ndarray:
    """Labels of the first LABEL_SCAN records of `split`, read without decoding the inputs."""
    decoders = {k: _tfds().decode.SkipDecoding() for k in self.inputs
                if self.encoding in ("grey", "pixels")}  # images: skip the PNG decoding
    source = open_source(self.name, f"{split}_split", self.exprs[split], self.data_dir, decoders) if decoders \
        else self.sources[split]
    n = min(len(source), LABEL_SCAN)
    records = read_records(source, list(range(n)))
    return np.asarray([int(np.asarray(r[self.label_key])) for r in records], np.int64)

  def _label_chance(self) -> tuple[float, str]:
    labels = self._labels("validation")
    counts = np.bincount(labels, minlength=self.classes)
    top = int(counts.argmax())
    return (float(counts[top] / max(counts.sum(), 1)),
            f"frequency of the most common label ({top}) among {len(labels)} validation records")

  def _lm_chance(self, seq_len: int) -> tuple[float, str]:
    source = self.sources["validation"]
    n = min(len(source), 1000)
    counts = np.zeros(self.vocab, np.int64)
    for r in read_records(source, list(range(n))):
      counts += np.bincount(encode(r[self.inputs[0]], self.encoding, seq_len + 1, self.inputs[0])[1:],
                            minlength=self.vocab)[:self.vocab]
    top = int(counts.argmax())
    return (float(counts[top] / max(counts.sum(), 1)),
            f"next-token accuracy of always predicting the most frequent target token (id {top}) of "
            f"{n} validation records")

  # -- examples --------------------------------------------------------------------------

  def num_examples(self, split: str) -> int:
    return len(self.sources[split])

  @functools.lru_cache(maxsize=2)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0x7F4A, int(epoch)]).permutation(len(self.sources["train"]))

  def record_index(self, split: str, index: int) -> int | None:
    """Which record example `index` of `split` is (None: a filler past a held-out split's end)."""
    n = len(self.sources[split])
    if split == "train":
      return int(self._epoch_order(index // n)[index % n])
    return index if index < n else None

  def _encode_record(self, record: dict | None) -> dict[str, np.ndarray]:
    t = self.spec.seq_len
    out: dict[str, np.ndarray] = {}
    if self.kind == "lm":
      ids = np.zeros(0, np.int32) if record is None else encode(record[self.inputs[0]], self.encoding, t + 1,
                                                                self.inputs[0])
      n = max(len(ids) - 1, 0)
      for key, values in (("inputs", ids[:-1]), ("targets", ids[1:])):
        out[key] = np.zeros(t, np.int32)
        out[key][:n] = values[:n]
      out["weights"] = (np.arange(t) < n).astype(np.float32)
      out["segment_ids"] = (np.arange(t) < n).astype(np.int32)
      out["positions"] = np.where(np.arange(t) < n, np.arange(t), 0).astype(np.int32)
      return out
    for i, feature in enumerate(self.inputs):
      suffix = "2" if i else ""
      ids = np.zeros(0, np.int32) if record is None else encode(record[feature], self.encoding, t, feature)
      n = len(ids)
      out["inputs" + suffix] = np.zeros(t, np.int32)
      out["inputs" + suffix][:n] = ids
      out["segment_ids" + suffix] = (np.arange(t) < n).astype(np.int32)
      out["positions" + suffix] = np.where(np.arange(t) < n, np.arange(t), 0).astype(np.int32)
    if record is None:
      out["label"], out["label_weights"] = np.zeros((), np.int32), np.zeros((), np.float32)
    else:
      label = int(np.asarray(record[self.label_key]))
      if not 0 <= label < self.classes:
        raise DataError(f"a record of {self.name!r} has label {label}, outside [0, {self.classes}); set "
                        f"task.tfds.num_classes above the largest label")
      out["label"], out["label_weights"] = np.asarray(label, np.int32), np.ones((), np.float32)
    return out

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    at = self.record_index(split, int(index))
    return self._encode_record(None if at is None else self.sources[split][at])

  def batch(self, split: str, indices) -> dict[str, np.ndarray]:
    """One `__getitems__` read for the whole batch (ArrayRecord reads them in parallel)."""
    at = [self.record_index(split, int(i)) for i in indices]
    real = [a for a in at if a is not None]
    records = iter(read_records(self.sources[split], real))
    rows = [self._encode_record(None if a is None else next(records)) for a in at]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def decode(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
    def text(ids, seg):
      ids = ids[seg != 0] - 1
      if self.encoding == "bytes":
        return bytes(ids.clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
      return ids.tolist()
    out = {"input": text(example["inputs"], example["segment_ids"])}
    if self.kind == "match":
      out["input2"] = text(example["inputs2"], example["segment_ids2"])
    if self.kind == "lm":
      out["tokens"] = int(example["weights"].sum())
    else:
      out["label"] = int(example["label"])
    return out
