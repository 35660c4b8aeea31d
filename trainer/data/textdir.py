"""Byte-level language modelling on your own text: a directory of files, no TFDS.

    python -m trainer.train --config=configs/base.py --workdir=runs/mine \\
        --config.task.name=textdir --config.task.textdir.path=/my/corpus \\
        [--config.task.textdir.glob='**/*.jsonl' --config.task.textdir.text_field=text]

Settings (`task.textdir.*`):

* ``path``: the corpus directory (required).
* ``glob``: which files under it are documents, relative to ``path`` ("**/*.txt");
  several patterns may be joined with commas ("**/*.txt,**/*.jsonl").
* ``text_field``: in ``*.jsonl`` / ``*.json`` files every non-blank line is one JSON
  object and this field ("text") is one document. Any other file is one document.
* ``validation_fraction``, ``test_fraction`` (0.05 each): shares of the documents held out.

Splits are made by document, never by window, so held-out text comes from documents
never trained on. A document's split is a stable function of its name alone, the path
relative to ``path`` (plus ``:LINE`` for a JSON-lines document, 1-based, so one big
.jsonl still splits): ``zlib.crc32(name) % 1000`` below ``1000 * test_fraction`` is test,
below ``1000 * (test_fraction + validation_fraction)`` validation, the rest train. Adding
files therefore never moves an existing document to another split.

Small corpora: if that rule leaves any split without a document (e.g. 10 files at 5%),
the whole corpus is instead ranked by (bucket, name), and test takes the first
``max(1, round(n * test_fraction))`` documents, validation the next
``max(1, round(n * validation_fraction))``, train the rest (at least one). This rank
rule depends on the other documents, so with it adding files can move documents; it
applies only while the hash rule would leave a split empty. Fewer than 3 non-empty
documents is an error.

Bytes are kept exactly as stored (no UTF-8 validation or repair): a byte-level model
reads any byte, so files with invalid UTF-8 train as they are and only `decode` shows
U+FFFD for them. JSON-lines text is encoded back to UTF-8. Empty documents are skipped.

Each split's documents (files in name order, JSON lines in file order), each followed by b"\\n\\n", form one byte array
(token = byte + 1, so 0 stays padding; vocabulary 257), read once per process and
cached by (path, settings, each file's size and mtime). Train example `index` is a
random window of seq_len + 1 bytes drawn from `split_rng(seed, "train", index)`.
Held-out example `index` is the window starting at `index * seq_len`: windows
0 .. num_examples-1 tile the split once, each target byte scored exactly once (the last
window ends at the split's end and weighs only the bytes not scored before it); later
indices are zero-weight fillers, so evaluation can round up to whole batches.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.base import SPLITS, DataError, Task, TaskSpec, split_rng

VOCAB = 257  # bytes shifted by one; 0 is padding
SEPARATOR = b"\n\n"  # appended to every document
BUCKETS = 1000  # crc32(name) % BUCKETS decides a document's split
JSON_SUFFIXES = (".jsonl", ".json")
MIN_DOCUMENTS = 3
_CACHE_SIZE = 2  # corpora kept in memory per process


class _Corpus:
  """The three splits of one directory: raw bytes (uint8) and the names of the documents."""

  def __init__(self, data: dict[str, np.ndarray], names: dict[str, list[str]], rule: str):
    self.data, self.names, self.rule = data, names, rule


_cache: collections.OrderedDict[tuple, _Corpus] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _fraction(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
    raise DataError(f"task.textdir.{name}={value!r} must be a number strictly between 0 and 1")
  return float(value)


def _bucket(name: str) -> int:
  return zlib.crc32(name.encode("utf-8", "surrogateescape")) % BUCKETS


def _list_files(root: Path, glob: str) -> list[tuple[str, Path]]:
  """(name relative to root, path) of every file matching any of the comma-separated patterns."""
  patterns = [p.strip() for p in glob.split(",") if p.strip()]
  if not patterns:
    raise DataError(f"task.textdir.glob={glob!r} holds no pattern; give one such as '**/*.txt'")
  found = {}
  for pattern in patterns:
    try:
      matches = list(root.glob(pattern))
    except (ValueError, NotImplementedError) as e:
      raise DataError(f"task.textdir.glob={glob!r} is not a valid relative glob pattern ({e})") from None
    for p in matches:
      if p.is_file():
        found[p.relative_to(root).as_posix()] = p
  return sorted(found.items())


def _json_type(value) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
      type(value), "null")


def _documents(name: str, path: Path, text_field: str):
  """(document name, bytes) of one file: the file itself, or each line of a JSON-lines file."""
  if not path.name.lower().endswith(JSON_SUFFIXES):
    yield name, path.read_bytes()
    return
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); every non-blank "
                        f"line of a {path.suffix} file must be one JSON object") from None
      except UnicodeDecodeError as e:
        raise DataError(f"{path} line {lineno} is not valid UTF-8 JSON (byte {e.start}: {e.reason}); every "
                        f"non-blank line of a {path.suffix} file must be one JSON object") from None
      if not isinstance(obj, dict):
        raise DataError(f"{path} line {lineno} is a JSON {_json_type(obj)}, not an object with a "
                        f"{text_field!r} field (task.textdir.text_field)")
      if text_field not in obj:
        fields = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise DataError(f"{path} line {lineno} has no field task.textdir.text_field={text_field!r} "
                        f"(its fields: {fields})")
      text = obj[text_field]
      if not isinstance(text, str):
        raise DataError(f"{path} line {lineno} has field {text_field!r} of JSON type {_json_type(text)}, "
                        f"but task.textdir.text_field must name a string")
      yield f"{name}:{lineno}", text.encode("utf-8", "surrogatepass")


def _hash_split(name: str, val: float, test: float) -> str:
  b = _bucket(name)
  return "test" if b < test * BUCKETS else "validation" if b < (test + val) * BUCKETS else "train"


def _rank_assign(names: list[str], val: float, test: float) -> dict[str, list[int]]:
  """The small-corpus rule (see the module docstring): indices of `names` per split, in order."""
  n = len(names)
  order = sorted(range(n), key=lambda i: (_bucket(names[i]), names[i]))
  n_test = max(1, round(n * test))
  n_val = max(1, round(n * val))
  while n_test + n_val > n - 1:  # train keeps at least one document
    if n_val >= n_test and n_val > 1:
      n_val -= 1
    else:
      n_test -= 1
  ranked = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
  return {s: sorted(v) for s, v in ranked.items()}


def _frozen(buf: bytearray) -> np.ndarray:
  a = np.frombuffer(buf, np.uint8)  # shares the bytearray's memory: no second copy of the corpus
  a.flags.writeable = False
  return a


def _load(root: Path, glob: str, text_field: str, val: float, test: float) -> tuple[tuple, _Corpus]:
  files = _list_files(root, glob)
  if not files:
    raise DataError(f"task.textdir.glob={glob!r} matches no files under task.textdir.path={str(root)!r}")
  stamp = []
  for name, p in files:
    st = p.stat()
    stamp.append((name, st.st_size, st.st_mtime_ns))
  key = (str(root), glob, text_field, val, test, tuple(stamp))
  with _cache_lock:
    if key in _cache:
      _cache.move_to_end(key)
      return key, _cache[key]
  # One pass, each document appended to its hash split as it is read.
  bufs = {s: bytearray() for s in SPLITS}
  docs = []  # (name, split, offset, length) in corpus order
  for name, p in files:
    for doc_name, blob in _documents(name, p, text_field):
      if blob:
        split = _hash_split(doc_name, val, test)
        docs.append((doc_name, split, len(bufs[split]), len(blob)))
        bufs[split] += blob
        bufs[split] += SEPARATOR
  if len(docs) < MIN_DOCUMENTS:
    raise DataError(f"task.textdir.path={str(root)!r} holds {len(docs)} non-empty document(s) matching "
                    f"task.textdir.glob={glob!r}, but at least {MIN_DOCUMENTS} are needed (one each for train, "
                    f"validation and test)")
  names = {s: [d[0] for d in docs if d[1] == s] for s in SPLITS}
  rule = "hash"
  if not all(names.values()):  # a small corpus: re-cut by rank, from the bytes already read
    rule = "rank"
    ids = _rank_assign([d[0] for d in docs], val, test)
    new = {s: bytearray() for s in SPLITS}
    for s, members in ids.items():
      for i in members:
        _, old, at, size = docs[i]
        new[s] += bufs[old][at:at + size]
        new[s] += SEPARATOR
    bufs = new
    names = {s: [docs[i][0] for i in members] for s, members in ids.items()}
  corpus = _Corpus({s: _frozen(b) for s, b in bufs.items()}, names, rule)
  with _cache_lock:
    _cache[key] = corpus
    while len(_cache) > _CACHE_SIZE:
      _cache.popitem(last=False)
  return key, corpus


class TextDir(Task):
  """Causal byte-level LM over a directory of text / JSON-lines files (see the module docstring)."""

  def __init__(self, seq_len: int, seed: int, path: str = "", glob: str = "**/*.txt", text_field: str = "text",
               validation_fraction: float = 0.05, test_fraction: float = 0.05):
    self.seed = int(seed)
    t = int(seq_len)
    if t < 1:
      raise DataError(f"task.seq_len={seq_len} must be at least 1")
    if not isinstance(path, str) or not path:
      raise DataError("task.textdir.path is not set; point it at a directory of text files, e.g. "
                      "--config.task.textdir.path=/my/corpus")
    root = Path(os.path.expanduser(path)).absolute()
    if not root.exists():
      raise DataError(f"task.textdir.path={path!r} does not exist (looked at {root})")
    if not root.is_dir():
      raise DataError(f"task.textdir.path={path!r} is not a directory (looked at {root}); give the folder that "
                      f"holds the text files")
    if not isinstance(glob, str):
      raise DataError(f"task.textdir.glob={glob!r} must be a string such as '**/*.txt'")
    if not isinstance(text_field, str) or not text_field:
      raise DataError(f"task.textdir.text_field={text_field!r} must name the JSON field holding each document's "
                      f"text, e.g. 'text'")
    val = _fraction("validation_fraction", validation_fraction)
    test = _fraction("test_fraction", test_fraction)
    if val + test >= 1.0:
      raise DataError(f"task.textdir.validation_fraction={validation_fraction} and task.textdir.test_fraction="
                      f"{test_fraction} sum to {val + test:g}, but must sum to less than 1 so train keeps documents")
    self.root, self.glob, self.text_field, self.fractions = root, glob, text_field, (val, test)
    self._key, corpus = _load(root, glob, text_field, val, test)
    self._set_corpus(corpus)
    for split in SPLITS:
      size = len(self.corpus[split])
      if size < t + 1:
        raise DataError(f"the {split} split of task.textdir.path={path!r} holds {size} bytes "
                        f"({self.num_documents(split)} documents), fewer than task.seq_len + 1 = {t + 1}; use a "
                        f"smaller task.seq_len or give that split more text")
    counts = np.bincount(self.corpus["validation"], minlength=256)
    top = int(counts.argmax())
    self.spec = TaskSpec(
        kind="lm", vocab_size=VOCAB, seq_len=t, num_classes=VOCAB,
        chance=float(counts[top] / counts.sum()),
        chance_note=(f"next-byte accuracy of always predicting the most frequent byte of the validation split "
                     f"({bytes([top])!r})"))

  def _set_corpus(self, corpus: _Corpus) -> None:
    self.corpus: dict[str, np.ndarray] = corpus.data  # raw bytes (uint8) of each split
    self.split_rule = corpus.rule  # "hash", or "rank" for a corpus too small for the hash rule
    self._names = corpus.names

  # Worker processes get the settings, not the corpus: they read it themselves (once per
  # process), and refuse to go on if the files changed since this process read them.
  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("corpus", "_names"):
      state.pop(k, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    val, test = self.fractions
    key, corpus = _load(self.root, self.glob, self.text_field, val, test)
    if key != self._key:
      raise DataError(f"the files of task.textdir.path={str(self.root)!r} changed after the task was built; "
                      f"restart so every process reads the same corpus")
    self._set_corpus(corpus)

  def num_documents(self, split: str) -> int:
    return len(self.documents(split))

  def documents(self, split: str) -> list[str]:
    """Names of the split's documents in corpus order: relative paths, `path:LINE` for JSON lines."""
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return list(self._names[split])

  def num_examples(self, split: str) -> int | None:
    """Held-out windows that score every target byte of the split once; None (endless) for train."""
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if split == "train":
      return None
    return -(-(len(self.corpus[split]) - 1) // self.spec.seq_len)

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    index = int(index)
    if index < 0:
      raise DataError(f"example index {index} of split {split!r} is negative; indices start at 0")
    t = self.spec.seq_len
    data = self.corpus[split]
    starts = len(data) - t  # windows of t + 1 bytes start at 0 .. len - t - 1
    weights = np.ones(t, np.float32)
    if split == "train":  # a random window: an endless stream of distinct examples
      start = int(split_rng(self.seed, split, index).integers(0, starts))
    else:  # held-out windows tile the split in order, the same ones every evaluation
      full = (len(data) - 1) // t  # whole windows, none overlapping
      if index < full:
        start = index * t
      elif index < self.num_examples(split):  # the tail: ends at the split's end, weighs only new bytes
        start = starts - 1
        weights[:full * t - start] = 0.0
      else:  # past the end: a filler that carries no weight
        start = (index * t) % starts
        weights[:] = 0.0
    window = data[start:start + t + 1].astype(np.int32) + 1
    return {
        "inputs": window[:-1].copy(),
        "targets": window[1:].copy(),
        "weights": weights,
        "segment_ids": np.ones(t, np.int32),
        "positions": np.arange(t, dtype=np.int32),
    }

  def decode(self, example) -> dict[str, Any]:
    text = bytes((example["inputs"] - 1).clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
    return {"text": text, "next_byte": chr(int(example["targets"][-1]) - 1)}
