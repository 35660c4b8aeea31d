"""Checks of the your-own-text LM task against a corpus the test writes and splits itself.

The expected split of every document is recomputed here from the documented rule
(crc32 of its name into 1000 buckets), and each split's bytes are rebuilt from the
files the test wrote, so windows, separators and held-out tiling are checked against
facts that do not come from the task's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import pickle
import zlib

import numpy as np
import pytest

from trainer.data.base import SPLITS, DataError
from trainer.data.textdir import TextDir

T = 32
VAL, TEST = 0.2, 0.15  # large enough that the hash rule fills every split of the corpus below


def _prose(rng: np.random.Generator, tag: str) -> str:
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "naïve", "über", "數據", "x", "  ", "\n"]
  return f"[{tag}] " + " ".join(rng.choice(words, int(rng.integers(10, 60))).tolist()) + f" [/{tag}]"


def make_corpus(root, n_txt: int = 40, n_jsonl: int = 30, seed: int = 0) -> dict[str, bytes]:
  """Writes files under `root`; returns every document's name -> its bytes (as the docs define them)."""
  rng = np.random.default_rng(seed)
  docs = {}
  for i in range(n_txt):
    name = f"{'sub/' if i % 3 else ''}{'deep/' if i % 5 == 0 else ''}doc{i}.txt"
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _prose(rng, name).encode()
    path.write_bytes(data)
    docs[name] = data
  lines = []
  for j in range(n_jsonl):
    lines.append(json.dumps({"id": j, "text": _prose(rng, f"j{j}"), "meta": "NOT-THE-TEXT"}))
    if j == 4:
      lines.append("")  # a blank line: skipped, but still counted in line numbers
  (root / "data").mkdir(exist_ok=True)
  (root / "data" / "part.jsonl").write_text("\n".join(lines) + "\n")
  lineno = 0
  for raw in lines:
    lineno += 1
    if raw:
      docs[f"data/part.jsonl:{lineno}"] = json.loads(raw)["text"].encode()
  # Not valid UTF-8: kept byte for byte.
  bad = b"[latin1] caf\xe9 \xff\xfe bytes that are not UTF-8 " * 3
  (root / "latin1.txt").write_bytes(bad)
  docs["latin1.txt"] = bad
  (root / "empty.txt").write_bytes(b"")  # empty: skipped
  (root / "notes.md").write_text("never matched by the glob")
  return docs


def expected_split(name: str, val: float = VAL, test: float = TEST) -> str:
  b = zlib.crc32(name.encode()) % 1000
  return "test" if b < 1000 * test else "validation" if b < 1000 * (test + val) else "train"


def expected_bytes(docs: dict[str, bytes], split: str) -> bytes:
  """The split's documents in corpus order (files by name, JSON lines in order), each + "\\n\\n"."""
  def order(name):
    path, _, line = name.partition(":")
    return (path, int(line or 0))
  return b"".join(docs[n] + b"\n\n" for n in sorted(docs, key=order) if expected_split(n) == split)


GLOB = "**/*.txt, **/*.jsonl"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  docs = make_corpus(root)
  task = TextDir(seq_len=T, seed=0, path=str(root), glob=GLOB, validation_fraction=VAL, test_fraction=TEST)
  return root, docs, task


def window_bytes(ex) -> bytes:
  ids = np.concatenate([ex["inputs"], ex["targets"][-1:]])
  assert (ids >= 1).all() and (ids <= 256).all()
  return bytes((ids - 1).astype(np.uint8))


def test_documents_go_to_their_hash_split(corpus):
  root, docs, task = corpus
  assert task.split_rule == "hash"
  for split in SPLITS:
    want = sorted(n for n in docs if expected_split(n) == split)
    assert sorted(task.documents(split)) == want
    assert task.num_documents(split) == len(want) > 0
  named = [n for s in SPLITS for n in task.documents(s)]
  assert len(named) == len(set(named)) == len(docs)  # no document in two splits, none lost
  assert "empty.txt" not in named and "notes.md" not in named


def test_split_bytes_are_the_documents_joined(corpus):
  root, docs, task = corpus
  for split in SPLITS:
    assert task.corpus[split].tobytes() == expected_bytes(docs, split)
  # Every document's text lies in exactly one split.
  for name, data in docs.items():
    holders = [s for s in SPLITS if data in task.corpus[s].tobytes()]
    assert holders == [expected_split(name)], name


def test_jsonl_documents_are_the_text_field(corpus):
  root, docs, task = corpus
  everything = b"".join(task.corpus[s].tobytes() for s in SPLITS)
  assert b"NOT-THE-TEXT" not in everything and b'"text"' not in everything
  names = [n for s in SPLITS for n in task.documents(s) if n.startswith("data/part.jsonl:")]
  assert len(names) == 30
  # Line numbers count the blank line 6 (skipped): the 30 documents are lines 1-5 and 7-31.
  assert sorted(int(n.rpartition(":")[2]) for n in names) == [*range(1, 6), *range(7, 32)]
  assert "über".encode() in everything and "數據".encode() in everything  # JSON escapes decoded, then UTF-8
  assert b"caf\xe9 \xff\xfe" in everything  # invalid UTF-8 kept as is


def test_held_out_windows_tile_each_split_once(corpus):
  root, docs, task = corpus
  for split in ("validation", "test"):
    data = expected_bytes(docs, split)
    n = task.num_examples(split)
    assert n == -(-(len(data) - 1) // T) and (len(data) - 1) % T  # a partial last window exists
    scored = np.zeros(len(data), np.int64)
    for i in range(n):
      ex = task.example(split, i)
      w = window_bytes(ex)
      start = data.find(w) if i == n - 1 else i * T
      assert data[start:start + T + 1] == w
      scored[start + 1:start + T + 1] += ex["weights"].astype(np.int64)
      assert set(np.unique(ex["weights"]).tolist()) <= {0.0, 1.0}
    # Every byte after the first is a weighted target exactly once.
    assert scored[0] == 0 and (scored[1:] == 1).all()
    # Fillers past the end weigh nothing; windows are the same on every call.
    for i in range(n, n + 5):
      assert not task.example(split, i)["weights"].any()
    for i in (0, n // 2, n - 1, n + 2):
      a, b = task.example(split, i), task.example(split, i)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  assert task.num_examples("train") is None


def test_train_windows_are_seeded_and_from_train_only(corpus):
  root, docs, task = corpus
  train, held = expected_bytes(docs, "train"), expected_bytes(docs, "validation") + expected_bytes(docs, "test")
  starts = set()
  for i in range(200):
    w = window_bytes(task.example("train", i))
    at = train.find(w)
    assert at >= 0 and w not in held
    starts.add(at)
  assert len(starts) > 150  # random windows, not a few repeated ones
  again = TextDir(seq_len=T, seed=0, path=str(root), glob=GLOB, validation_fraction=VAL, test_fraction=TEST)
  other = TextDir(seq_len=T, seed=1, path=str(root), glob=GLOB, validation_fraction=VAL, test_fraction=TEST)
  for i in (7, 0, 150, 7):
    a, b = task.example("train", i), again.example("train", i)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert sum(np.array_equal(task.example("train", i)["inputs"], other.example("train", i)["inputs"])
             for i in range(50)) == 0


def test_example_layout_spec_and_decode(corpus):
  root, docs, task = corpus
  ex = task.example("validation", 3)
  assert ex["inputs"].shape == ex["targets"].shape == (T,)
  assert ex["inputs"].dtype == ex["targets"].dtype == ex["segment_ids"].dtype == ex["positions"].dtype == np.int32
  assert ex["weights"].dtype == np.float32 and ex["weights"].all()
  np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
  np.testing.assert_array_equal(ex["segment_ids"], np.ones(T))
  np.testing.assert_array_equal(ex["positions"], np.arange(T))
  decoded = task.decode(ex)
  assert decoded["text"] == window_bytes(ex)[:-1].decode("utf-8", "replace")
  assert decoded["next_byte"] == chr(window_bytes(ex)[-1])
  spec = task.spec
  assert (spec.kind, spec.vocab_size, spec.seq_len, spec.num_classes) == ("lm", 257, T, 257)
  counts = np.bincount(np.frombuffer(expected_bytes(docs, "validation"), np.uint8), minlength=256)
  assert spec.chance == pytest.approx(counts.max() / counts.sum())
  assert repr(bytes([counts.argmax()])) in spec.chance_note


def test_default_glob_reads_text_files_only(corpus):
  root, docs, _ = corpus
  task = TextDir(seq_len=T, seed=0, path=str(root), validation_fraction=VAL, test_fraction=TEST)
  named = sorted(n for s in SPLITS for n in task.documents(s))
  assert named == sorted(n for n in docs if n.endswith(".txt"))


def test_adding_files_moves_no_document(tmp_path):
  docs = make_corpus(tmp_path, n_txt=40, n_jsonl=0)
  kw = dict(seq_len=T, seed=0, path=str(tmp_path), validation_fraction=VAL, test_fraction=TEST)
  before = {s: set(TextDir(**kw).documents(s)) for s in SPLITS}
  for i in range(40, 70):
    (tmp_path / f"more{i}.txt").write_text(f"another document {i} " * 5)
  after_task = TextDir(**kw)
  assert after_task.split_rule == "hash"
  for s in SPLITS:
    assert before[s] <= set(after_task.documents(s))
  assert sum(after_task.num_documents(s) for s in SPLITS) == len([n for n in docs if n.endswith(".txt")]) + 30


def test_small_corpus_falls_back_to_the_rank_rule(tmp_path):
  names = [f"f{i}.txt" for i in range(5)]
  for n in names:
    (tmp_path / n).write_text(f"document {n} " * 20)
  # With 5% fractions the hash rule leaves a held-out split empty for these names.
  assert {expected_split(n, 0.05, 0.05) for n in names} != set(SPLITS)
  task = TextDir(seq_len=8, seed=0, path=str(tmp_path))
  assert task.split_rule == "rank"
  ranked = sorted(names, key=lambda n: (zlib.crc32(n.encode()) % 1000, n))
  assert task.documents("test") == [ranked[0]]
  assert task.documents("validation") == [ranked[1]]
  assert task.documents("train") == sorted(ranked[2:])
  # Three documents are enough: one per split.
  for n in names[3:]:
    os.remove(tmp_path / n)
  three = TextDir(seq_len=8, seed=0, path=str(tmp_path))
  assert [three.num_documents(s) for s in SPLITS] == [1, 1, 1]


def test_pickled_copy_rereads_the_same_corpus(corpus, tmp_path):
  root, docs, task = corpus
  state = pickle.dumps(task)
  assert len(state) < 10_000  # the corpus itself does not travel
  copy = pickle.loads(state)
  for split, i in (("train", 5), ("test", 1)):
    a, b = task.example(split, i), copy.example(split, i)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # A corpus changed between building and unpickling is refused.
  make_corpus(tmp_path, n_txt=20, n_jsonl=10)
  small = TextDir(seq_len=T, seed=0, path=str(tmp_path), glob=GLOB, validation_fraction=VAL, test_fraction=TEST)
  blob = pickle.dumps(small)
  (tmp_path / "doc0.txt").write_text("edited")
  with pytest.raises(DataError, match="changed"):
    pickle.loads(blob)


def _bad(tmp_path, **kw):
  settings = dict(seq_len=T, seed=0, path=str(tmp_path))
  settings.update(kw)
  return TextDir(**settings)


def test_bad_settings_raise(tmp_path):
  with pytest.raises(DataError, match=r"task\.textdir\.path is not set"):
    TextDir(seq_len=T, seed=0)
  missing = tmp_path / "absent"
  with pytest.raises(DataError, match=rf"path='{missing}' does not exist \(looked at {missing}\)"):
    _bad(tmp_path, path=str(missing))
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(DataError, match=r"a\.txt' is not a directory"):
    _bad(tmp_path, path=str(tmp_path / "a.txt"))
  with pytest.raises(DataError, match=r"task\.textdir\.glob='\*\*/\*\.csv' matches no files"):
    _bad(tmp_path, glob="**/*.csv")
  with pytest.raises(DataError, match=r"task\.textdir\.glob='/abs/\*\.txt' is not a valid"):
    _bad(tmp_path, glob="/abs/*.txt")
  with pytest.raises(DataError, match=r"text_field=''"):
    _bad(tmp_path, text_field="")
  with pytest.raises(DataError, match=r"holds 1 non-empty document\(s\).*at least 3"):
    _bad(tmp_path)
  (tmp_path / "b.txt").write_text("y")
  (tmp_path / "c.txt").write_text("")
  with pytest.raises(DataError, match=r"holds 2 non-empty document"):
    _bad(tmp_path)


@pytest.mark.parametrize("kw, named", [
    (dict(validation_fraction=0.0), r"validation_fraction=0\.0 must be a number strictly between 0 and 1"),
    (dict(test_fraction=1.5), r"test_fraction=1\.5 must be"),
    (dict(test_fraction=-0.1), r"test_fraction=-0\.1 must be"),
    (dict(validation_fraction="0.1"), r"validation_fraction='0\.1' must be a number"),
    (dict(validation_fraction=True), r"validation_fraction=True must be"),
    (dict(validation_fraction=0.6, test_fraction=0.4), r"validation_fraction=0\.6 and .*test_fraction=0\.4 sum to 1"),
    (dict(seq_len=0), r"task\.seq_len=0"),
])
def test_bad_fractions_raise(tmp_path, kw, named):
  for i in range(5):
    (tmp_path / f"d{i}.txt").write_text("text " * 40)
  with pytest.raises(DataError, match=named):
    _bad(tmp_path, **kw)


@pytest.mark.parametrize("line, named", [
    (b"{not json}", r"bad\.jsonl line 2 is not valid JSON"),
    (b'{"body": "x"}', r"bad\.jsonl line 2 has no field task\.textdir\.text_field='text' \(its fields: 'body'\)"),
    (b'["text"]', r"bad\.jsonl line 2 is a JSON array"),
    (b'{"text": 5}', r"bad\.jsonl line 2 has field 'text' of JSON type number"),
    (b'{"text": null}', r"bad\.jsonl line 2 has field 'text' of JSON type null"),
    (b'{"text": "caf\xe9"}', r"bad\.jsonl line 2 is not valid UTF-8 JSON"),
])
def test_bad_jsonl_lines_raise(tmp_path, line, named):
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n' + line + b"\n")
  with pytest.raises(DataError, match=named):
    _bad(tmp_path, glob="*.jsonl")


def test_a_split_shorter_than_a_window_raises(tmp_path):
  for i in range(5):
    (tmp_path / f"d{i}.txt").write_text("short")
  # Ranked: test and validation get one document (7 bytes with the separator), train three.
  with pytest.raises(DataError, match=r"the validation split .* holds 7 bytes \(1 documents\), fewer than "
                                      r"task\.seq_len \+ 1 = 11"):
    _bad(tmp_path, seq_len=10)
  with pytest.raises(DataError, match=r"the train split .* holds 21 bytes \(3 documents\)"):
    _bad(tmp_path, seq_len=21)
  # Exactly seq_len + 1 bytes is enough: one window.
  task = _bad(tmp_path, seq_len=6)
  assert task.num_examples("test") == 1
  assert window_bytes(task.example("test", 0)) == b"short\n\n"
  assert window_bytes(task.example("train", 3)) in b"short\n\n" * 3


def test_bad_split_and_index_raise(corpus):
  _, _, task = corpus
  with pytest.raises(DataError, match="'valid'"):
    task.example("valid", 0)
  with pytest.raises(DataError, match="'dev'"):
    task.num_documents("dev")
  with pytest.raises(DataError, match="index -2"):
    task.example("validation", -2)
