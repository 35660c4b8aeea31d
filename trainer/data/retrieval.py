"""Long Range Arena "Retrieval": do two ACL Anthology Network papers cite each other?

The data is the LRA release's AAN citation pairs, three TSV files in one directory:

    new_aan_pairs.train.tsv   new_aan_pairs.eval.tsv   new_aan_pairs.test.tsv

Get them by downloading ``lra_release.gz`` from
https://github.com/google-research/long-range-arena, unpacking it, and pointing
``task.retrieval.data_dir`` at its ``lra_release/tsv_data`` directory:

    python -m trainer.train --config=... --config.task.name=retrieval \\
        --config.task.retrieval.data_dir=/data/lra_release/tsv_data --config.task.seq_len=4000

Layout, as LRA's own reader (lra_benchmarks/matching/input_pipeline.py) parses it:
one pair per line, no header, five tab-separated fields with no quoting,

    label <TAB> id1 <TAB> id2 <TAB> text1 <TAB> text2

where the label is read as a float (1 = the papers are linked by a citation, 0 = not)
and cast to int32, and the texts are used exactly as stored (LRA's char-level setting
byte-encodes the field string with tfds' ByteTextEncoder, ids = byte + 1). Third-party
loaders read the released text fields as Python bytes literals (``b'...'`` with
backslash escapes); like LRA, this reader does not unescape them. The ids are not used.

Encoding: each text's UTF-8 bytes + 1 (0 is padding), truncated to task.seq_len (LRA:
4000 per document), right-padded; segment ids are 1 on real tokens, positions count
them. Kind "match": inputs/segment_ids/positions for text1, the same with suffix 2 for
text2, label [] int32 and label_weights [] float32.

Reading: each file is indexed once per process (cached by path, size and mtime): one
scan in binary chunks finds the line starts and counts every line's tabs (a line
without exactly four is rejected with its line number), and the first field of every
line is read and checked as a 0/1 label. An example then reads its one line with
os.pread, on a descriptor each process opens for itself (reopened after a fork;
never pickled). Blank lines are skipped; line numbers in messages are the file's own.

Example order: train example i is line perm_e[i % N] with e = i // N, where perm_e is a
permutation drawn from ``np.random.default_rng([seed, e])``, so every epoch visits
each line exactly once, in a new order. Held-out example i is line i; for i >= N it is
a filler (a copy of line i % N) with label_weights 0, so evaluation rounds up to whole
batches without counting any pair twice (`num_examples` gives N).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.base import SPLITS, DataError, Task, TaskSpec

VOCAB = 257  # bytes shifted by one; 0 is padding
FIELDS = ("label", "id1", "id2", "text1", "text2")
DEFAULT_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
                 "test": "new_aan_pairs.test.tsv"}
SETTING_OF_SPLIT = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
HOW_TO_GET = ("download lra_release.gz from https://github.com/google-research/long-range-arena, unpack it, and "
              "point task.retrieval.data_dir at its lra_release/tsv_data directory")
CHUNK = 1 << 24  # bytes per read while indexing
MAX_LABEL_BYTES = 32  # a first field longer than this is not a label


@dataclasses.dataclass(frozen=True)
class LineIndex:
  """Where each pair of one TSV file lies, and its label."""
  path: str
  stamp: tuple[int, int]  # (size, mtime_ns) of the file indexed
  starts: np.ndarray  # int64 [N]: byte offset of each line
  ends: np.ndarray  # int64 [N]: offset of its "\n" (or the end of the file)
  lines: np.ndarray  # int64 [N]: its 1-based line number in the file
  labels: np.ndarray  # int8 [N]: 0 or 1

  def __len__(self) -> int:
    return len(self.starts)


def _scan(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Line starts, line ends, tabs per line and the first tab's offset (-1: none), by chunks."""
  starts, ends, tabs, firsts = [], [], [], []
  pos = 0  # file offset of the chunk
  line_start, pend_tabs, pend_first = 0, 0, -1  # the line still open at the chunk's start
  with open(path, "rb") as f:
    while True:
      chunk = f.read(CHUNK)
      if not chunk:
        break
      a = np.frombuffer(chunk, np.uint8)
      nl = np.flatnonzero(a == 10)
      tb = np.flatnonzero(a == 9)
      k = len(nl)
      # Slot j < k is the line ending at nl[j]; slot k is the line left open after the chunk.
      slot = np.searchsorted(nl, tb)
      count = np.bincount(slot, minlength=k + 1).astype(np.int64)
      first = np.full(k + 1, -1, np.int64)
      used, at = np.unique(slot, return_index=True)
      first[used] = tb[at] + pos
      count[0] += pend_tabs  # slot 0 continues the line open before this chunk
      if pend_first >= 0:
        first[0] = pend_first
      if k:
        s = np.empty(k, np.int64)
        s[0] = line_start
        s[1:] = nl[:-1] + pos + 1
        starts.append(s)
        ends.append(nl.astype(np.int64) + pos)
        tabs.append(count[:k])
        firsts.append(first[:k])
        line_start = int(nl[-1]) + pos + 1
      pend_tabs, pend_first = int(count[k]), int(first[k])
      pos += len(chunk)
  if pos > line_start:  # a last line without "\n"
    starts.append(np.array([line_start], np.int64))
    ends.append(np.array([pos], np.int64))
    tabs.append(np.array([pend_tabs], np.int64))
    firsts.append(np.array([pend_first], np.int64))
  cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
  return cat(starts), cat(ends), cat(tabs), cat(firsts)


def _parse_label(raw: bytes, path: str, line: int) -> int:
  text = raw.strip().decode("utf-8", "replace")
  try:
    value = float(text)
  except ValueError:
    value = None
  if value not in (0.0, 1.0):
    raise DataError(f"{path} line {line} has label {text[:MAX_LABEL_BYTES]!r}, but the first field must be 0 or 1 "
                    f"(or 0.0 / 1.0)")
  return int(value)


def build_index(path: str) -> LineIndex:
  """Indexes and checks one TSV file (see the module docstring)."""
  st = os.stat(path)
  starts, ends, tabs, firsts = _scan(path)
  lines = np.arange(1, len(starts) + 1, dtype=np.int64)
  with open(path, "rb") as f:
    fd = f.fileno()
    # Blank lines ("" or a lone "\r") are skipped.
    blank = ends == starts
    for i in np.flatnonzero((ends - starts == 1) & (tabs == 0)):
      blank[i] = os.pread(fd, 1, int(starts[i])) == b"\r"
    keep = ~blank
    starts, ends, tabs, firsts, lines = starts[keep], ends[keep], tabs[keep], firsts[keep], lines[keep]
    bad = np.flatnonzero(tabs != len(FIELDS) - 1)
    if len(bad):
      i = int(bad[0])
      raise DataError(f"{path} line {int(lines[i])} has {int(tabs[i]) + 1} tab-separated fields, but every line must "
                      f"have {len(FIELDS)}: {' <TAB> '.join(FIELDS)}")
    labels = np.empty(len(starts), np.int8)
    seen: dict[bytes, int] = {}
    for i, (s, t) in enumerate(zip(starts.tolist(), firsts.tolist())):
      raw = os.pread(fd, min(t - s, MAX_LABEL_BYTES + 1), s)
      label = seen.get(raw)
      if label is None:
        label = seen[raw] = _parse_label(raw, path, int(lines[i]))
      labels[i] = label
  return LineIndex(path=path, stamp=(st.st_size, st.st_mtime_ns), starts=starts, ends=ends, lines=lines,
                   labels=labels)


_index_cache: dict[tuple, LineIndex] = {}
_index_lock = threading.Lock()


def index_file(path: str) -> LineIndex:
  """`build_index`, once per process for each (path, size, mtime)."""
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
  with _index_lock:
    hit = _index_cache.get(key)
  if hit is None:
    hit = build_index(path)
    with _index_lock:
      _index_cache[key] = hit
  return hit


def _encode(text: bytes, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  b = np.frombuffer(text[:t], np.uint8)
  n = len(b)
  ids = np.zeros(t, np.int32)
  ids[:n] = b.astype(np.int32) + 1
  seg = np.zeros(t, np.int32)
  seg[:n] = 1
  pos = np.zeros(t, np.int32)
  pos[:n] = np.arange(n, dtype=np.int32)
  return ids, seg, pos


class AANRetrieval(Task):
  """LRA Retrieval: binary matching of two byte-level documents (see the module docstring)."""

  def __init__(self, seq_len: int, seed: int, data_dir: str = "", train_file: str = DEFAULT_FILES["train"],
               validation_file: str = DEFAULT_FILES["validation"], test_file: str = DEFAULT_FILES["test"]):
    self.seed = int(seed)
    t = int(seq_len)
    if t < 1:
      raise DataError(f"task.seq_len={seq_len} must be at least 1")
    if not isinstance(data_dir, str) or not data_dir:
      raise DataError(f"task.retrieval.data_dir is not set; {HOW_TO_GET}")
    root = Path(os.path.expanduser(data_dir)).absolute()
    if not root.is_dir():
      what = "is not a directory" if root.exists() else "does not exist"
      raise DataError(f"task.retrieval.data_dir={data_dir!r} {what} (looked at {root}); {HOW_TO_GET}")
    names = {"train": train_file, "validation": validation_file, "test": test_file}
    self.paths: dict[str, str] = {}
    for split, name in names.items():
      setting = f"task.retrieval.{SETTING_OF_SPLIT[split]}"
      if not isinstance(name, str) or not name:
        raise DataError(f"{setting}={name!r} must name a TSV file in task.retrieval.data_dir, e.g. "
                        f"{DEFAULT_FILES[split]!r}")
      path = root / name
      if not path.is_file():
        present = sorted(p.name for p in root.glob("*.tsv"))[:6]
        raise DataError(f"{setting}={name!r} is not a file (looked at {path}); the directory holds "
                        f"{', '.join(present) if present else 'no .tsv files'}, and the LRA release names it "
                        f"{DEFAULT_FILES[split]!r} ({HOW_TO_GET})")
      self.paths[split] = str(path)
    self.index: dict[str, LineIndex] = {split: index_file(p) for split, p in self.paths.items()}
    for split, idx in self.index.items():
      if not len(idx):
        raise DataError(f"{idx.path} (task.retrieval.{SETTING_OF_SPLIT[split]}) holds no pairs; expected one line "
                        f"per pair: {' <TAB> '.join(FIELDS)}")
    val = self.index["validation"]
    counts = np.bincount(val.labels, minlength=2)
    majority = int(counts.argmax())
    self.spec = TaskSpec(
        kind="match", vocab_size=VOCAB, seq_len=t, num_classes=2,
        chance=float(counts[majority] / counts.sum()),
        chance_note=(f"frequency of the majority label ({majority}) among the {len(val)} pairs of "
                     f"{os.path.basename(val.path)}"))
    self._reset_process_state()

  # -- per-process state: open descriptors and the current epoch's permutation --------

  def _reset_process_state(self) -> None:
    self._pid = os.getpid()
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()
    self._perm: tuple[int, np.ndarray] | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_pid", "_fds", "_lock", "_perm"):
      state.pop(k, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_process_state()

  def _fd(self, split: str) -> int:
    if self._pid != os.getpid():  # a forked child: its descriptors are the parent's; open its own
      inherited = self._fds
      self._reset_process_state()
      for fd in inherited.values():
        try:
          os.close(fd)
        except OSError:
          pass
    fd = self._fds.get(split)
    if fd is None:
      with self._lock:
        fd = self._fds.get(split)
        if fd is None:
          idx = self.index[split]
          fd = os.open(idx.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
          st = os.fstat(fd)
          if (st.st_size, st.st_mtime_ns) != idx.stamp:
            os.close(fd)
            raise DataError(f"{idx.path} changed after it was indexed (size or modification time differs); "
                            f"restart so every process reads the same data")
          self._fds[split] = fd
    return fd

  def close(self) -> None:
    """Closes this process's descriptors (they reopen on the next example)."""
    if self._pid == os.getpid():
      for fd in self._fds.values():
        try:
          os.close(fd)
        except OSError:
          pass
    self._reset_process_state()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass

  # -- examples ------------------------------------------------------------------------

  def num_examples(self, split: str) -> int:
    """Pairs in the split's file (train: one epoch)."""
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return len(self.index[split])

  def _epoch_order(self, epoch: int) -> np.ndarray:
    cached = self._perm
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index["train"])))
      self._perm = cached
    return cached[1]

  def line_of(self, split: str, index: int) -> int:
    """Row of the split's index (0-based, blank lines skipped) that example `index` reads."""
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    index = int(index)
    if index < 0:
      raise DataError(f"example index {index} of split {split!r} is negative; indices start at 0")
    n = len(self.index[split])
    if split == "train":
      return int(self._epoch_order(index // n)[index % n])
    return index % n

  def read_pair(self, split: str, row: int) -> tuple[bytes, bytes]:
    """(text1, text2) of row `row` of the split's index, as stored."""
    idx = self.index[split]
    start, end = int(idx.starts[row]), int(idx.ends[row])
    raw = os.pread(self._fd(split), end - start, start)
    fields = (raw[:-1] if raw.endswith(b"\r") else raw).split(b"\t")
    if len(raw) != end - start or len(fields) != len(FIELDS):
      raise DataError(f"{idx.path} line {int(idx.lines[row])} no longer has {len(FIELDS)} tab-separated fields; "
                      f"the file changed after it was indexed, so restart")
    return fields[3], fields[4]

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    row = self.line_of(split, index)
    t = self.spec.seq_len
    text1, text2 = self.read_pair(split, row)
    inputs, seg, pos = _encode(text1, t)
    inputs2, seg2, pos2 = _encode(text2, t)
    real = split == "train" or int(index) < len(self.index[split])
    return {
        "inputs": inputs, "segment_ids": seg, "positions": pos,
        "inputs2": inputs2, "segment_ids2": seg2, "positions2": pos2,
        "label": np.asarray(self.index[split].labels[row], np.int32),
        "label_weights": np.asarray(1.0 if real else 0.0, np.float32),
    }

  def decode(self, example) -> dict[str, Any]:
    def text(ids, seg):
      return bytes((ids[seg > 0] - 1).clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
    return {"label": int(example["label"]), "text1": text(example["inputs"], example["segment_ids"]),
            "text2": text(example["inputs2"], example["segment_ids2"])}
