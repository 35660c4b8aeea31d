"""Checks of the LRA Retrieval (AAN) reader against a plain full read of small TSV files.

Every expectation comes from the rows the test itself wrote (or from splitting the
whole file on "\\n" and "\\t"), never from the task's own index, so a wrong offset, a
tab miscounted across a chunk boundary or an off-by-one in the epoch order shows up as
a mismatch in the texts or labels.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import trainer.data.retrieval as retrieval
from trainer.data.base import SPLITS, DataError
from trainer.data.retrieval import DEFAULT_FILES, AANRetrieval

T = 48  # tokens per document: shorter than most texts below, longer than some

WORDS = ["citation", "network", "parsing", "translation", "naïve", "Ünïcödé", "阅读", "graph", "lexicon",
         "b'escaped\\\\n'", "corpus", "—", "tagging"]


def _text(rng: np.random.Generator, tag: str) -> str:
  n = int(rng.integers(0, 30))
  return tag + " " + " ".join(rng.choice(WORDS, n).tolist())


def make_rows(seed: int, n: int, split: str) -> list[tuple[str, str, str, str, str]]:
  rng = np.random.default_rng(seed)
  labels = ["0", "1", "1.0", "0.0", "1", "1"]
  return [(labels[int(rng.integers(0, len(labels)))], f"P{split[:2]}{i}a", f"P{split[:2]}{i}b",
           _text(rng, f"<{split}:{i}:one>"), _text(rng, f"<{split}:{i}:two>")) for i in range(n)]


def write_tsv(path, rows, *, newline: str = "\n", trailing: bool = True, blank_lines=()) -> None:
  lines = ["\t".join(r) for r in rows]
  for at in sorted(blank_lines, reverse=True):
    lines.insert(at, "")
  body = newline.join(lines) + (newline if trailing else "")
  with open(path, "wb") as f:
    f.write(body.encode("utf-8"))


def reference(path) -> list[list[bytes]]:
  """A plain full read: every non-blank line split into its fields."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  out = []
  for line in lines:
    line = line[:-1] if line.endswith(b"\r") else line
    if line:
      out.append(line.split(b"\t"))
  return out


SIZES = {"train": 23, "validation": 17, "test": 11}


@pytest.fixture()
def data_dir(tmp_path):
  for k, split in enumerate(SPLITS):
    write_tsv(tmp_path / DEFAULT_FILES[split], make_rows(k, SIZES[split], split))
  return tmp_path


def expected_tokens(text: bytes, t: int = T):
  cut = np.frombuffer(text[:t], np.uint8).astype(np.int32) + 1
  ids = np.zeros(t, np.int32)
  ids[:len(cut)] = cut
  return ids, len(cut)


def assert_matches_row(ex, fields: list[bytes]):
  for key, text in (("", fields[3]), ("2", fields[4])):
    ids, n = expected_tokens(text)
    np.testing.assert_array_equal(ex["inputs" + key], ids)
    np.testing.assert_array_equal(ex["segment_ids" + key], (np.arange(T) < n).astype(np.int32))
    np.testing.assert_array_equal(ex["positions" + key][:n], np.arange(n))
    assert not ex["positions" + key][n:].any()
    assert ex["inputs" + key].dtype == ex["segment_ids" + key].dtype == ex["positions" + key].dtype == np.int32
  assert int(ex["label"]) == int(float(fields[0]))
  assert ex["label"].shape == () and ex["label"].dtype == np.int32
  assert ex["label_weights"].shape == () and ex["label_weights"].dtype == np.float32


def test_held_out_examples_equal_the_file(data_dir):
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  for split in ("validation", "test"):
    rows = reference(data_dir / DEFAULT_FILES[split])
    assert task.num_examples(split) == len(rows) == SIZES[split]
    for i, fields in enumerate(rows):
      ex = task.example(split, i)
      assert_matches_row(ex, fields)
      assert float(ex["label_weights"]) == 1.0
      decoded = task.decode(ex)
      assert decoded == {"label": int(float(fields[0])),
                         "text1": fields[3][:T].decode("utf-8", "replace"),
                         "text2": fields[4][:T].decode("utf-8", "replace")}
  # Some texts are longer than T and some shorter, so truncation and padding both ran.
  lengths = [len(r[3]) for r in reference(data_dir / DEFAULT_FILES["validation"])]
  assert min(lengths) < T < max(lengths)


def test_full_length_texts_are_not_cut(data_dir):
  task = AANRetrieval(seq_len=4000, seed=0, data_dir=str(data_dir))
  rows = reference(data_dir / DEFAULT_FILES["test"])
  for i, fields in enumerate(rows):
    decoded = task.decode(task.example("test", i))
    assert decoded["text1"] == fields[3].decode() and decoded["text2"] == fields[4].decode()


def test_fillers_past_the_end_weigh_nothing(data_dir):
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  n = SIZES["validation"]
  real = task.example("validation", n - 1)
  for i in range(n, n + 7):
    ex = task.example("validation", i)
    assert float(ex["label_weights"]) == 0.0
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
  # A batch rounded up past the end: its weights count each real pair exactly once.
  batch = task.batch("validation", np.arange(0, 24))
  assert batch["label_weights"].sum() == n and batch["label_weights"].shape == (24,)
  train = [float(task.example("train", i)["label_weights"]) for i in range(3 * SIZES["train"])]
  assert train == [1.0] * len(train)


def _train_tags(task, first: int, count: int) -> list[bytes]:
  out = []
  for i in range(first, first + count):
    ex = task.example("train", i)
    text = bytes((ex["inputs"][ex["segment_ids"] > 0] - 1).astype(np.uint8))
    out.append(text.split(b" ")[0])  # the row's unique tag, e.g. b"<train:7:one>"
  return out


def test_train_epochs_visit_every_line_once(data_dir):
  task = AANRetrieval(seq_len=T, seed=3, data_dir=str(data_dir))
  rows = reference(data_dir / DEFAULT_FILES["train"])
  n = len(rows)
  every = sorted(r[3].split(b" ")[0] for r in rows)
  epochs = [_train_tags(task, e * n, n) for e in range(3)]
  for tags in epochs:
    assert sorted(tags) == every
  assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
  assert epochs[0] != sorted(epochs[0])  # and shuffled, not file order
  # Labels travel with their line.
  by_tag = {r[3].split(b" ")[0]: int(float(r[0])) for r in rows}
  for i in range(n + 5):
    ex = task.example("train", i)
    assert int(ex["label"]) == by_tag[_train_tags(task, i, 1)[0]]
  # Deterministic per (seed, index), in any access order, and different for another seed.
  again = AANRetrieval(seq_len=T, seed=3, data_dir=str(data_dir))
  assert _train_tags(again, 2 * n, n) == epochs[2]
  assert _train_tags(again, 0, n) == epochs[0]
  other = AANRetrieval(seq_len=T, seed=4, data_dir=str(data_dir))
  assert _train_tags(other, 0, n) != epochs[0]


def test_chance_is_the_validation_majority(data_dir):
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  labels = [int(float(r[0])) for r in reference(data_dir / DEFAULT_FILES["validation"])]
  majority = max(labels.count(0), labels.count(1)) / len(labels)
  assert majority > 0.5  # the labels are unbalanced, so a wrong count would show
  spec = task.spec
  assert spec.chance == pytest.approx(majority)
  assert (spec.kind, spec.vocab_size, spec.seq_len, spec.num_classes) == ("match", 257, T, 2)
  assert str(len(labels)) in spec.chance_note and DEFAULT_FILES["validation"] in spec.chance_note
  # A validation file where 0 is the majority (4 of 7): chance follows it.
  rows = [("0.0" if i < 4 else "1", "a", "b", f"t{i}", "u") for i in range(7)]
  write_tsv(data_dir / DEFAULT_FILES["validation"], rows)
  os.utime(data_dir / DEFAULT_FILES["validation"], ns=(2, 2))
  spec = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir)).spec
  assert spec.chance == pytest.approx(4 / 7) and "majority label (0) among the 7 pairs" in spec.chance_note


@pytest.mark.parametrize("tail", [b"", b"\r\n\r\n\n"])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 24])
def test_index_is_the_same_for_any_chunk_size(tmp_path, monkeypatch, chunk, tail):
  # CRLF endings, blank lines inside, and either a last line without a newline or blank
  # lines after it: small chunks put line breaks and tabs on every side of a boundary.
  rows = make_rows(7, 9, "test")
  path = tmp_path / "pairs.tsv"
  write_tsv(path, rows, newline="\r\n", trailing=False, blank_lines=(0, 4, 5))
  with open(path, "ab") as f:
    f.write(tail)
  monkeypatch.setattr(retrieval, "CHUNK", chunk)
  idx = retrieval.build_index(str(path))
  raw = path.read_bytes()
  want = reference(path)
  assert len(idx) == len(want) == len(rows)
  for i, fields in enumerate(want):
    line = raw[idx.starts[i]:idx.ends[i]]
    assert line.rstrip(b"\r").split(b"\t") == fields
    assert idx.labels[i] == int(float(fields[0]))
  # Line numbers are the file's own, counting the blank lines.
  physical = raw.split(b"\n")
  for i, fields in enumerate(want):
    assert physical[int(idx.lines[i]) - 1].rstrip(b"\r").split(b"\t") == fields


def test_pread_reads_agree_with_a_full_read(tmp_path, monkeypatch):
  monkeypatch.setattr(retrieval, "CHUNK", 3)
  for k, split in enumerate(SPLITS):
    write_tsv(tmp_path / DEFAULT_FILES[split], make_rows(10 + k, 8, split), newline="\r\n", trailing=False)
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path))
  for split in ("validation", "test"):
    for i, fields in enumerate(reference(tmp_path / DEFAULT_FILES[split])):
      assert task.read_pair(split, i) == (fields[3], fields[4])
      assert_matches_row(task.example(split, i), fields)


def test_pickled_and_forked_copies_read_the_same(data_dir, monkeypatch):
  task = AANRetrieval(seq_len=T, seed=1, data_dir=str(data_dir))
  first = [task.example("test", i) for i in range(4)]
  assert task._fds  # a descriptor is open in this process
  copy = pickle.loads(pickle.dumps(task))
  assert not copy._fds  # descriptors never travel
  for i in range(4):
    for k, v in copy.example("test", i).items():
      np.testing.assert_array_equal(v, first[i][k])
  # After a fork the child sees another pid: it must open (and count on) its own
  # descriptor, closing the inherited copy rather than leaking one per fork.
  opened = []
  real_open = os.open
  monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
  fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
  for _ in range(5):
    task._pid = -1  # what a forked child sees: a pid that is not its own
    ex = task.example("test", 2)
    assert task._pid == os.getpid() and "test" in task._fds
    for k, v in ex.items():
      np.testing.assert_array_equal(v, first[2][k])
  assert opened == [str(data_dir / DEFAULT_FILES["test"])] * 5
  if fds_before is not None:
    assert len(os.listdir("/proc/self/fd")) == fds_before
  task.example("test", 3)
  assert len(opened) == 5  # same process: the descriptor is reused
  task.close()


def test_a_file_changed_after_indexing_is_refused(data_dir):
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  path = data_dir / DEFAULT_FILES["test"]
  rows = make_rows(99, 5, "test")
  write_tsv(path, rows)
  os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
  with pytest.raises(DataError, match="changed"):
    task.example("test", 0)
  fresh = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  assert fresh.num_examples("test") == 5
  assert fresh.read_pair("test", 4) == (rows[4][3].encode(), rows[4][4].encode())


def test_other_file_names(tmp_path):
  for k, split in enumerate(SPLITS):
    write_tsv(tmp_path / f"{split}.tsv", make_rows(k, 4, split))
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path), train_file="train.tsv",
                      validation_file="validation.tsv", test_file="test.tsv")
  assert task.read_pair("validation", 3)[0] == reference(tmp_path / "validation.tsv")[3][3]


def _write(tmp_path, split: str, body: bytes):
  for k, s in enumerate(SPLITS):
    if not (tmp_path / DEFAULT_FILES[s]).exists():
      write_tsv(tmp_path / DEFAULT_FILES[s], make_rows(k, 3, s))
  (tmp_path / DEFAULT_FILES[split]).write_bytes(body)


@pytest.mark.parametrize("body, named", [
    (b"1\ta\tb\tx\ty\n0\ta\tb\tx\n1\ta\tb\tx\ty\n", r"new_aan_pairs\.eval\.tsv line 2 has 4 tab-separated fields"),
    (b"1\ta\tb\tx\ty\n\n0\ta\tb\tx\ty\textra\n", r"line 3 has 6 tab-separated fields"),
    (b"1\ta\tb\tx\ty\n2\ta\tb\tx\ty\n", r"line 2 has label '2'"),
    (b"0.5\ta\tb\tx\ty\n", r"line 1 has label '0.5'"),
    (b"label\tid1\tid2\ttext1\ttext2\n1\ta\tb\tx\ty\n", r"line 1 has label 'label'"),
    (b"\ta\tb\tx\ty\n", r"line 1 has label ''"),
    (b"", r"new_aan_pairs\.eval\.tsv \(task\.retrieval\.validation_file\) holds no pairs"),
    (b"\n\r\n", r"holds no pairs"),
])
def test_bad_lines_raise(tmp_path, body, named):
  _write(tmp_path, "validation", body)
  with pytest.raises(DataError, match=named):
    AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path))


def test_missing_data_raises(tmp_path):
  with pytest.raises(DataError, match=r"task\.retrieval\.data_dir is not set.*lra_release\.gz.*tsv_data"):
    AANRetrieval(seq_len=T, seed=0)
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=rf"data_dir='{missing}' does not exist \(looked at {missing}\).*lra_release\.gz"):
    AANRetrieval(seq_len=T, seed=0, data_dir=str(missing))
  (tmp_path / "afile").write_text("x")
  with pytest.raises(DataError, match="is not a directory"):
    AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path / "afile"))
  _write(tmp_path, "validation", b"1\ta\tb\tx\ty\n")
  os.remove(tmp_path / DEFAULT_FILES["test"])
  with pytest.raises(DataError, match=rf"task\.retrieval\.test_file='new_aan_pairs\.test\.tsv' is not a file "
                                      rf"\(looked at {tmp_path / DEFAULT_FILES['test']}\)"):
    AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"task\.retrieval\.train_file=''"):
    AANRetrieval(seq_len=T, seed=0, data_dir=str(tmp_path), train_file="")


def test_bad_split_index_and_seq_len_raise(data_dir):
  task = AANRetrieval(seq_len=T, seed=0, data_dir=str(data_dir))
  with pytest.raises(DataError, match="'valid'"):
    task.example("valid", 0)
  with pytest.raises(DataError, match="index -1"):
    task.example("test", -1)
  with pytest.raises(DataError, match="seq_len=0"):
    AANRetrieval(seq_len=0, seed=0, data_dir=str(data_dir))
