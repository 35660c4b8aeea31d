"""A catalogue of user mistakes on the trainer's command line, and what each must give.

For every case, `trainer.train.main(argv)` must return 2, print exactly one `error: ...` line on
stderr (no traceback) naming the bad key (and the bad value, where one was given), and touch no
files: a fresh workdir is not created, and a finished run's files (names, sizes, mtimes) stay
as they were. Messages are matched on the key and value they name, never on their wording.

Refusals must come before any compiling. So that a mistake the trainer still accepts fails in
about a second instead of training, the step that would start the work (state init for a new
workdir; compiling for a resumed one) is replaced by one that raises `_Accepted`, which the
test reports as "ACCEPTED".
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from tests.helpers import train


class _Accepted(Exception):
  """The run got past every check and was about to start work."""


def _snapshot(path) -> dict:
  """Every entry under `path`: directories by name, files by (size, mtime_ns)."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _diff(before: dict, after: dict) -> str:
  added = sorted(set(after) - set(before))
  removed = sorted(set(before) - set(after))
  changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
  return f"added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"


def _guard(monkeypatch, *methods) -> None:
  from trainer.experiment import Experiment

  def accepted(self, *args, **kwargs):
    raise _Accepted

  for name in methods:
    monkeypatch.setattr(Experiment, name, accepted, raising=False)


def _scrub(text: str, *paths) -> str:
  """`text` without the given paths, so a digit in a temp dir's name never counts as a value."""
  for p in sorted(map(str, paths), key=len, reverse=True):
    text = text.replace(p, "<path>")
  return text


def _refused(workdir, extra, capsys, *, keys=(), values=(), scrub=(), patterns=()) -> list[str]:
  """Runs the trainer; returns what is wrong with how it refused (empty: refused as it should)."""
  problems = []
  code = None
  try:
    code = train(str(workdir), *extra)
  except _Accepted:
    problems.append("ACCEPTED: got past every check and was about to start work")
  except Exception as e:  # noqa: BLE001 -- any other exception is a traceback for the user
    problems.append(f"TRACEBACK: {type(e).__name__}: {str(e)[:300]}")
  err = capsys.readouterr().err
  if code is not None and code != 2:
    problems.append(f"EXIT CODE {code} (want 2)")
  lines = err.strip().splitlines()
  if "Traceback" in err:
    problems.append("TRACEBACK on stderr")
  if len(lines) != 1 or not lines[0].startswith("error: "):
    if code is not None or lines:
      problems.append(f"STDERR is not one 'error: ' line: {err[-600:]!r}")
  message = "\n".join(lines)
  if message:
    for key in keys:
      if key not in message:
        problems.append(f"MESSAGE LACKS KEY {key!r}: {message[:400]!r}")
    clean = _scrub(message, *scrub)
    for value in values:
      if not re.search(rf"(?<![\w.]){re.escape(value)}(?![\w])", clean):
        problems.append(f"MESSAGE LACKS VALUE {value!r}: {message[:400]!r}")
    for pattern in patterns:
      if not re.search(pattern, message):
        problems.append(f"MESSAGE LACKS {pattern!r}: {message[:400]!r}")
  return problems


# -- config values: refused by validation, before the workdir exists ----------------------------

def _value(override: str, key: str | None = None, value: str | None = None, *, id=None):
  """A `KEY=VALUE` override; the message must name KEY and VALUE (defaults: both sides of it)."""
  k, v = override.split("=", 1)
  return pytest.param(override, key or k, v if value is None else value, id=id or override)


VALUE_CASES = [
    _value("model.remat=everything"),
    _value("seed=-1"),
    _value("model.dropout=1.5"),
    _value("model.dropout=-0.1"),
    _value("model.dropout=nan"),
    _value("optimizer.warmup_steps=-5"),
    _value("optimizer.grad_clip=-1"),
    _value("optimizer.grad_clip=nan"),
    _value("optimizer.learning_rate=nan"),
    _value("optimizer.learning_rate=inf"),
    _value("optimizer.learning_rate=-1"),
    _value("optimizer.learning_rate=0"),
    _value("optimizer.b1=1.5"),
    _value("optimizer.b1=-0.1"),
    _value("optimizer.b2=-0.1"),
    _value("optimizer.b2=1.5"),
    _value("optimizer.eps=0"),
    _value("optimizer.eps=-1e-08"),
    _value("optimizer.weight_decay=-1"),
    _value("optimizer.weight_decay=nan"),
    _value("optimizer.end_lr_ratio=nan"),
    _value("optimizer.end_lr_ratio=-0.5"),
    _value("eval_split=valid"),
    _value("eval_split=train"),  # train is not held out
    _value("total_steps=0"),
    _value("batch_size=-8"),
    _value("eval_examples=0"),
    _value("eval_every=-1"),
    _value("log_every=-1"),
    _value("checkpoint_every=-1"),
    _value("keep_checkpoints=-1"),
    _value("task.seq_len=0"),
    _value("task.packing_window=0"),
    _value("task.packing_window=-1"),
    _value("model.mlp_ratio=0"),
    _value("model.num_layers=0"),
    _value("model.d_model=0"),
    _value("model.num_heads=0"),
    _value("model.num_kv_heads=-1"),
    _value("max_skipped=-1"),  # consecutive skipped non-finite steps tolerated under on_nonfinite=skip
    _value('mesh.rules=(("batch", ("data", "nope")),)', "mesh.rules", "nope", id="mesh.rules-missing-axis"),
    _value("mesh.rules=5", "mesh.rules", "5", id="mesh.rules-int"),
    _value('mesh.rules=("batch", "data")', "mesh.rules", "", id="mesh.rules-flat-pair"),
    _value('mesh.rules=(("batch", "data", "fsdp"),)', "mesh.rules", "", id="mesh.rules-triple"),
    _value("mesh.fsdp=0"),
    _value("data.threads=-1"),
    _value("data.prefetch=-1"),
    _value("data.workers=-1"),
]


@pytest.mark.parametrize("override,key,value", VALUE_CASES)
def test_bad_config_value(tmp_path, capsys, monkeypatch, override, key, value):
  _guard(monkeypatch, "restore_or_init", "compiled_train_step")
  wd = tmp_path / "run"
  problems = _refused(wd, [f"--config.{override}"], capsys, keys=[key], values=[value] if value else [],
                      scrub=[tmp_path])
  if wd.exists():
    problems.append(f"WORKDIR CREATED: {sorted(os.listdir(wd))}")
  assert not problems, "\n".join(problems)


# -- config files -------------------------------------------------------------------------------

_GOOD_HEAD = "from configs import default\n\n"
CONFIG_FILES = {
    # name: (source, extra text the message must hold besides the file's path)
    "syntax_error": (_GOOD_HEAD + "def get_config(arg=None)\n  return default.get_config('smoke')\n", []),
    "raises_key_error": (_GOOD_HEAD + "def get_config(arg=None):\n  raise KeyError('dataset_root')\n",
                         ["dataset_root"]),
    "raises_runtime_error": (_GOOD_HEAD + "def get_config(arg=None):\n  raise RuntimeError('set SEQMIX_DATA first')\n",
                             ["SEQMIX_DATA"]),
    "returns_none": (_GOOD_HEAD + "def get_config(arg=None):\n  default.get_config('smoke')\n", []),
    "returns_dict": (_GOOD_HEAD + "def get_config(arg=None):\n  return dict(default.get_config('smoke'))\n", []),
    "no_get_config": (_GOOD_HEAD + "def get_cfg(arg=None):\n  return default.get_config('smoke')\n",
                      ["get_config"]),
    "import_error": ("import seqmix_no_such_module\n" + _GOOD_HEAD +
                     "def get_config(arg=None):\n  return default.get_config('smoke')\n", ["seqmix_no_such_module"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_bad_config_file(tmp_path, capsys, monkeypatch, name):
  _guard(monkeypatch, "restore_or_init", "compiled_train_step")
  source, needles = CONFIG_FILES[name]
  path = tmp_path / f"{name}.py"
  path.write_text(source)
  patterns = []
  if name == "syntax_error":  # the message gives the line: "line 3" or "FILE:3"
    with pytest.raises(SyntaxError) as info:
      compile(source, str(path), "exec")
    line = info.value.lineno
    patterns.append(rf"(\bline {line}\b|{re.escape(str(path))}:{line}\b)")
  wd = tmp_path / "run"
  problems = _refused(wd, [f"--config={path}"], capsys, keys=[str(path), *needles], patterns=patterns)
  if wd.exists():
    problems.append(f"WORKDIR CREATED: {sorted(os.listdir(wd))}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("spec,needles", [
    pytest.param("configs/no_such_config.py", ["configs/no_such_config.py"], id="missing-file"),
    pytest.param("configs/default.py:nonsense", ["configs/default.py", "nonsense"], id="bad-arg"),
])
def test_bad_config_spec(tmp_path, capsys, monkeypatch, spec, needles):
  _guard(monkeypatch, "restore_or_init", "compiled_train_step")
  wd = tmp_path / "run"
  problems = _refused(wd, [f"--config={spec}"], capsys, keys=needles)
  if wd.exists():
    problems.append(f"WORKDIR CREATED: {sorted(os.listdir(wd))}")
  assert not problems, "\n".join(problems)


# -- resuming a finished run with a different config --------------------------------------------

@pytest.fixture(scope="module")
def _finished(tmp_path_factory):
  """A finished 6-step run, its snapshot, and a pristine copy (mtimes kept) to restore it from."""
  base = tmp_path_factory.mktemp("finished")
  wd, backup = base / "run", base / "pristine"
  assert train(str(wd), "--config.eval_every=0") == 0
  shutil.copytree(wd, backup)
  return wd, backup, _snapshot(wd)


@pytest.fixture
def finished_run(_finished):
  """The finished run, as it was made (restored if an earlier case wrote to it)."""
  wd, backup, snap = _finished
  if _snapshot(wd) != snap:
    shutil.rmtree(wd)
    shutil.copytree(backup, wd)
  assert _snapshot(wd) == snap
  return wd


DRIFT_CASES = [
    # `linear` has exactly attention's parameters (names and shapes), so only a config check can tell.
    pytest.param("model.mixer=linear", "model.mixer", "linear", id="mixer"),
    pytest.param("model.mixer_schedule=linear", "model.mixer_schedule", "linear", id="mixer_schedule"),
    pytest.param("batch_size=16", "batch_size", "16", id="batch_size"),
    pytest.param("task.seq_len=64", "task.seq_len", "64", id="seq_len"),
    pytest.param("seed=1", "seed", "1", id="seed"),
]


@pytest.mark.parametrize("override,key,value", DRIFT_CASES)
def test_resume_with_changed_config_is_refused(finished_run, capsys, monkeypatch, override, key, value):
  _guard(monkeypatch, "compiled_train_step", "compiled_eval_step")
  before = _snapshot(finished_run)
  problems = _refused(finished_run, ["--config.total_steps=9", f"--config.{override}"], capsys, keys=[key],
                      values=[value], scrub=[finished_run])
  after = _snapshot(finished_run)
  if after != before:
    problems.append(f"FILES CHANGED: {_diff(before, after)}")
  assert not problems, "\n".join(problems)


def _resumed_ok(wd, capsys, *extra, last_step):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    old = len(f.readlines())
  code = train(str(wd), *extra)
  err = capsys.readouterr().err
  assert code == 0, err
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    new = [json.loads(line) for line in f.readlines()[old:]]
  steps = [m["step"] for m in new if "train/loss" in m]
  assert steps and min(steps) > 6 and max(steps) == last_step, f"did not resume from step 6: {steps}"


@pytest.mark.parametrize("extra", [
    pytest.param(["--config.total_steps=8"], id="total_steps"),
    pytest.param(["--config.total_steps=8", "--config.eval_every=1"], id="eval_every"),
    pytest.param(["--config.total_steps=8", "--config.log_every=1"], id="log_every"),
    pytest.param(["--config.total_steps=8", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
                 id="mesh"),
    pytest.param(["--config.total_steps=8", "--config.model.attention_impl=flash"], id="attention_impl"),
])
def test_harmless_changes_resume(_finished, tmp_path, capsys, extra):
  copy = tmp_path / "copy"
  shutil.copytree(_finished[0], copy)
  _resumed_ok(copy, capsys, *extra, last_step=8)


def test_allow_config_change_resumes_with_a_new_batch_size(_finished, tmp_path, capsys):
  copy = tmp_path / "copy"
  shutil.copytree(_finished[0], copy)
  _resumed_ok(copy, capsys, "--config.allow_config_change=true", "--config.batch_size=16", "--config.total_steps=8",
              last_step=8)
