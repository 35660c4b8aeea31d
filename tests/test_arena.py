"""The arena (trainer/arena.py): a mixers x tasks grid of real `trainer.train` runs, resumable, and its report."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from trainer import arena

SMOKE = "configs/arena/cpu.py:smoke"


def _arena(*args) -> int:
  return arena.main(list(args))


def _records(root) -> dict:
  with open(os.path.join(root, "results.jsonl")) as f:
    return {r["cell"]: r for r in map(json.loads, f)}


def _table(text: str, title_start: str) -> dict:
  """{first column: [cells]} of the markdown table under the heading that starts with `title_start`."""
  section = text.split(f"## {title_start}", 1)[1].split("\n## ", 1)[0]
  rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("|---")][1:]  # no header
  return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


TWO_BY_TWO = """
def get_config(arg=None):
  return {"name": "two", "parallel": 2,
          "tasks": {"mqar": {"config": "configs/mqar.py:smoke"},
                    "text": {"config": "configs/default.py:smoke", "set": ["batch_size=8"]}},
          "mixers": {"attention": {}, "linear": {}},
          "memory": {"task": "text", "lengths": [32, 64]}}
"""


def test_a_two_by_two_arena_trains_reports_and_a_second_run_trains_nothing(tmp_path):
  spec = tmp_path / "two.py"
  spec.write_text(TWO_BY_TWO)
  root = str(tmp_path / "arena")
  assert _arena(f"--config={spec}", f"--root={root}", "--quiet") == 0
  recs = _records(root)
  assert sorted(recs) == sorted(f"{t}-{m}-s0" for t in ("mqar", "text") for m in ("attention", "linear"))
  for r in recs.values():
    assert r["status"] == "done" and r["step"] == 6 and r["best_step"] in (3, 6), r
    assert 0.0 <= r["test"]["accuracy"] <= 1.0 and r["validation"]["loss"] > 0, r
    assert r["tokens_per_sec"] > 0 and r["temp_bytes"] > 0 and r["num_params"] > 0
    assert [s for s, _ in r["curve"]] == [3, 6]
    # The cell is an ordinary workdir: the test metrics are the trainer's own evaluation of its best checkpoint.
    with open(os.path.join(r["workdir"], "eval_results.json")) as f:
      saved = json.load(f)
    assert saved["test/accuracy"] == r["test"]["accuracy"] and saved["step"] == r["best_step"]
  with open(os.path.join(root, "results.md")) as f:
    text = f.read()
  acc = _table(text, "Test accuracy")
  assert set(acc) == {"chance", "attention", "linear"}
  for m in ("attention", "linear"):
    want = [f"{recs[f'{t}-{m}-s0']['test']['accuracy']:.3f}" for t in ("mqar", "text")]
    assert acc[m][:2] == want, (m, acc[m])
    assert float(acc[m][2]) == pytest.approx(sum(map(float, want)) / 2, abs=1e-3)
  eff = _table(text, "Efficiency")
  assert eff["attention"][0].startswith("1.00x") and eff["attention"][1].startswith("1.00x")
  mem = _table(text, "Compiled train-step memory")
  assert set(mem) == {"attention", "linear"} and all(float(v) > 0 for row in mem.values() for v in row)
  assert float(mem["attention"][1]) > float(mem["attention"][0])  # L=64 needs more than L=32
  assert {"mqar.png", "text.png", "memory.png"} <= set(os.listdir(root))

  # `trainer.evaluate --best` reads the same checkpoint the cell's own end-of-run evaluation read.
  from trainer import evaluate
  cell = next(c for c in arena.cells(arena.load_arena(str(spec))) if c.name == "text-linear-s0")
  argv = [f"--config={cell.config}", f"--workdir={recs[cell.name]['workdir']}", f"--output={tmp_path}/best.json"]
  argv += [f"--config.{o}" for o in cell.overrides]
  assert evaluate.main(argv + ["--best"]) == 0
  with open(tmp_path / "best.json") as f:
    best = json.load(f)
  assert best["step"] == recs[cell.name]["best_step"]
  assert best["test/accuracy"] == pytest.approx(recs[cell.name]["test"]["accuracy"], abs=1e-6)
  assert evaluate.main(argv + ["--best", "--step=2"]) == 2

  # A second invocation trains nothing: no cell's log or metrics change. A filtered one (--mixers) runs
  # only its cells and still reports the whole arena.
  logs = {n: os.path.getsize(os.path.join(root, "logs", n)) for n in os.listdir(os.path.join(root, "logs"))}
  metrics = {c: os.path.getmtime(os.path.join(r["workdir"], "metrics.jsonl")) for c, r in recs.items()}
  t0 = time.time()
  assert _arena(f"--config={spec}", f"--root={root}", "--quiet") == 0
  assert _arena(f"--config={spec}", f"--root={root}", "--quiet", "--mixers=linear") == 0
  assert time.time() - t0 < 40
  assert logs == {n: os.path.getsize(os.path.join(root, "logs", n)) for n in os.listdir(os.path.join(root, "logs"))}
  assert metrics == {c: os.path.getmtime(os.path.join(r["workdir"], "metrics.jsonl")) for c, r in recs.items()}
  with open(os.path.join(root, "results.md")) as f:
    assert _table(f.read(), "Test accuracy") == acc
  # Changing a cell's settings makes it unfinished again (the trainer then resumes or refuses, as by hand).
  assert not arena.is_done(arena.cells(dict(arena.load_arena(str(spec)), set=["total_steps=8"], root=root))[0], root)


def _arena_cmd(root, steps):
  return [sys.executable, "-m", "trainer.arena", "--task=configs/mqar.py:smoke", "--mixers=linear", f"--root={root}",
          "--quiet", "--set", f"total_steps={steps}", "--set", "checkpoint_every=4", "--set", "eval_every=4",
          "--set", "async_checkpointing=false"]


@pytest.mark.slow
def test_killing_the_arena_mid_cell_and_rerunning_gives_the_uninterrupted_results(tmp_path):
  steps = 40
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  assert subprocess.run(_arena_cmd(whole, steps), cwd=ROOT, capture_output=True, timeout=600).returncode == 0
  proc = subprocess.Popen(_arena_cmd(killed, steps), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = os.path.join(killed, "cells", "mqar-linear-s0", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)  # the arena and its cell, mid-run
  proc.wait()
  cell = os.path.join(killed, "cells", "mqar-linear-s0")
  assert not os.path.exists(os.path.join(cell, "arena_done.json"))
  first = [r["step"] for r in arena.read_jsonl(os.path.join(cell, "metrics.jsonl")) if "eval/accuracy" in r]
  assert max(first, default=0) < steps, "the kill came after the cell had finished: nothing was interrupted"
  assert subprocess.run(_arena_cmd(killed, steps), cwd=ROOT, capture_output=True, timeout=600).returncode == 0
  a, b = (_records(r)["mqar-linear-s0"] for r in (whole, killed))
  assert b["status"] == "done"
  for key in ("validation", "test", "best_step", "curve", "step"):
    assert a[key] == b[key], key
  with open(os.path.join(killed, "logs", "train-mqar-linear-s0.log")) as f:
    assert "resuming from step" in f.read()


def test_a_failing_cell_is_retried_once_reported_and_the_others_finish(tmp_path, capsys):
  root = str(tmp_path / "arena")
  empty = tmp_path / "empty"
  empty.mkdir()
  spec = tmp_path / "arena_cfg.py"
  # `textdir` over a directory with no text fails when the run starts (not when its config is read).
  spec.write_text(
      "def get_config(arg=None):\n"
      "  return {'name': 'f', 'tasks': {'lm': {'config': 'configs/default.py:smoke', 'set': ['batch_size=8']}},\n"
      f"          'mixers': {{'linear': {{}}, 'broken': {{'mixer': 'linear', 'set': ['task.name=textdir',\n"
      f"                      'task.textdir.path={empty}']}}}}}}\n")
  assert _arena(f"--config={spec}", f"--root={root}", "--quiet") == 1
  err = capsys.readouterr().err
  assert "cell lm-broken-s0 failed twice; last error: exit 2: error:" in err
  with open(os.path.join(root, "logs", "train-lm-broken-s0.log")) as f:
    assert f.read().count("== ") == 2  # started twice
  recs = _records(root)
  assert recs["lm-linear-s0"]["status"] == "done" and recs["lm-broken-s0"]["status"] == "failed"
  with open(os.path.join(root, "results.md")) as f:
    text = f.read()
  assert _table(text, "Test accuracy")["broken"] == ["-", "-"]
  assert "`lm-broken-s0`: failed" in text


def _fake_cell(root, cell, curve, val, test, tps, temp, total=100):
  """A finished cell's workdir as the trainer and arena leave it, with chosen numbers."""
  wd = cell.workdir(root)
  os.makedirs(wd)
  rows = [{"step": 0, "compile/temp_bytes": temp, "compile/num_params": 1000}]
  rows += [{"step": s, "train/tokens_per_sec": tps} for s, _ in curve]
  rows += [{"step": s, "eval/accuracy": acc, "eval/loss": 1 - acc} for s, acc in curve]
  rows += [{"step": total, "best/step": total, "best/validation/accuracy": val, "best/validation/loss": 1 - val,
            "best/test/accuracy": test, "best/test/loss": 1 - test}]
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump({"total_steps": total, "model": {"mixer": cell.mixer}, "task": {"seq_len": 64}}, f)
  with open(os.path.join(wd, "eval_results.json"), "w") as f:
    json.dump({"chance_accuracy": 0.25}, f)
  with open(os.path.join(wd, "arena_done.json"), "w") as f:
    json.dump({"overrides": cell.overrides}, f)


def test_the_report_of_recorded_runs_is_a_known_table_chosen_by_validation_never_by_test(tmp_path):
  root = str(tmp_path)
  a = arena.check_arena({"name": "t", "root": root, "seeds": [0, 1], "threshold": 0.5,
                         "tasks": {"x": {"config": "configs/mqar.py:smoke"}},
                         "mixers": {"attention": {}, "linear": {}}, "grid": {"optimizer.learning_rate": [0.1, 0.2]}})
  todo = arena.cells(a)
  assert [c.name for c in todo][:4] == ["x-attention-learning_rate=0.1-s0", "x-attention-learning_rate=0.1-s1",
                                        "x-attention-learning_rate=0.2-s0", "x-attention-learning_rate=0.2-s1"]
  # (validation, test) per (mixer, lr, seed): linear's lr 0.2 has the better test accuracy but the worse
  # validation accuracy, so lr 0.1 must be chosen.
  numbers = {("attention", 0.1): [(0.6, 0.5), (0.8, 0.7)], ("attention", 0.2): [(0.9, 0.9), (0.9, 0.8)],
             ("linear", 0.1): [(0.5, 0.4), (0.7, 0.6)], ("linear", 0.2): [(0.4, 0.99), (0.5, 0.99)]}
  for c in todo:
    lr = c.grid["optimizer.learning_rate"]
    val, test = numbers[(c.mixer, lr)][c.seed]
    tps = {"attention": 1000.0, "linear": 3000.0}[c.mixer]
    _fake_cell(root, c, [(50, val / 2), (100, val)], val, test, tps, temp=2**20 * (2 if c.mixer == "linear" else 4))
  assert "optimizer.learning_rate=0.2" in todo[2].overrides  # the grid value reaches the cell's trainer command
  text = arena.report(a, todo)
  acc = _table(text, "Test accuracy")
  assert acc["chance"] == ["0.250", "0.250"]
  assert acc["attention"] == ["0.850 ± 0.071", "0.850"]  # lr 0.2: mean(0.9, 0.8), stdev 0.0707
  assert acc["linear"] == ["0.500 ± 0.141", "0.500"]  # lr 0.1 (validation 0.6 > 0.45), not 0.2's test 0.99
  assert "attention on x: learning_rate=0.2; linear on x: learning_rate=0.1" in text
  steps = _table(text, "Steps to 0.5")
  assert steps["attention"] == ["100 (2/2)"] and steps["linear"] == ["100 (2/2)"]  # 50: half the final accuracy
  eff = _table(text, "Efficiency")
  assert eff["linear"] == ["3.00x (3.0k tok/s)", "0.50x (2.0 MiB)"]
  recs = _records(root)
  assert len(recs) == 8 and recs["x-linear-learning_rate=0.2-s1"]["test"] == {"accuracy": 0.99, "loss": 0.010000000000000009}


def test_bad_arena_input_is_one_sentence_and_exit_2(tmp_path, capsys):
  spec = tmp_path / "bad.py"
  spec.write_text("def get_config(arg=None):\n  return {'tasks': {'a': {'config': 'configs/mqar.py:smoke'}}, "
                  "'mixers': {'attention': {}}, 'paralel': 2}\n")
  assert _arena(f"--config={spec}", f"--root={tmp_path}/r") == 2
  assert "arena key 'paralel' is not known; valid keys:" in capsys.readouterr().err
  assert _arena(f"--config={SMOKE}", "--mixers=nosuch", f"--root={tmp_path}/r") == 2
  assert "--mixers names 'nosuch', not a mixer of this arena" in capsys.readouterr().err
  assert _arena(f"--config={SMOKE}", "--set", "model.d_modl=8", f"--root={tmp_path}/r") == 2
  assert "unknown config key 'model.d_modl'" in capsys.readouterr().err
  assert _arena(f"--config={SMOKE}", "--only=zzz*", f"--root={tmp_path}/r") == 2
  assert _arena(f"--config={SMOKE}", "--set", "eval_split=test", f"--root={tmp_path}/r") == 2
  assert "the arena picks each cell's best checkpoint by validation" in capsys.readouterr().err
  assert _arena("--task=configs/mqar.py:smoke", f"--root={tmp_path}/r") == 2
  assert "--task needs --mixers" in capsys.readouterr().err
  from trainer import cli
  assert cli.main(["arena", f"--config={spec}", f"--root={tmp_path}/r"]) == 2  # `seqmix arena`
  assert not os.path.exists(tmp_path / "r" / "cells")  # nothing ran


def test_slurm_launcher_writes_an_array_job_of_the_cells(tmp_path, capsys):
  root = str(tmp_path / "r")
  assert _arena(f"--config={SMOKE}", "--tasks=mqar", "--mixers=attention,mamba", f"--root={root}",
                "--launcher=slurm", "--parallel=3") == 0
  with open(os.path.join(root, "arena.sbatch")) as f:
    text = f.read()
  # 2 training cells (mqar x 2 mixers); the memory probes are on `text`, filtered out with it.
  assert "#SBATCH --array=0-1%3" in text and "#   1: mqar-mamba-s0" in text
  assert '--cell="$SLURM_ARRAY_TASK_ID"' in text and "--launcher" not in text.split("exec ", 1)[1]
  assert not os.path.exists(os.path.join(root, "cells"))
  assert _arena(f"--config={SMOKE}", "--tasks=mqar", "--mixers=attention,mamba", f"--root={root}", "--cell=2") == 2
  assert "--cell=2 is not a cell index; this arena has cells 0 to 1" in capsys.readouterr().err
  # What an array task runs: `--cell=I` trains cell I alone, with its grid value.
  grid = ["--task=configs/mqar.py:smoke", "--mixers=linear", "--grid", "optimizer.learning_rate=1e-2,2e-2",
          f"--root={tmp_path}/g"]
  assert _arena(*grid, "--launcher", "slurm", "--parallel", "3") == 0
  with open(tmp_path / "g" / "arena.sbatch") as f:
    tokens = shlex.split(f.read().split("exec ", 1)[1])
  assert tokens[:3] == ["python", "-m", "trainer.arena"] and tokens[-1] == "--cell=$SLURM_ARRAY_TASK_ID"
  assert not {"--launcher", "slurm", "--parallel", "3"} & set(tokens) and "optimizer.learning_rate=1e-2,2e-2" in tokens
  assert _arena(*grid, "--cell=1") == 0
  assert os.listdir(tmp_path / "g" / "cells") == ["mqar-linear-learning_rate=0.02-s0"]
  with open(tmp_path / "g" / "cells" / "mqar-linear-learning_rate=0.02-s0" / "config.json") as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.02
  assert _records(str(tmp_path / "g"))["mqar-linear-learning_rate=0.02-s0"]["status"] == "done"


def test_readme_block_is_replaced_by_the_tables(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- arena:t -->\nold\n<!-- /arena:t -->\nend\n")
  arena.update_readme(str(readme), {"name": "t"}, "# Arena `t`\n\n## Test accuracy\n\n| a | b |\n")
  assert readme.read_text() == "intro\n<!-- arena:t -->\n#### Test accuracy\n\n| a | b |\n<!-- /arena:t -->\nend\n"
  with pytest.raises(arena.UserError, match="no block between <!-- arena:u -->"):
    arena.update_readme(str(readme), {"name": "u"}, "x")


@pytest.mark.parametrize("spec", ["configs/arena/cpu.py", "configs/arena/cpu.py:smoke", "configs/arena/recall.py",
                                  "configs/arena/lra.py", "configs/arena/lra.py:small", "configs/arena/difficulty.py:mqar",
                                  "configs/arena/difficulty.py:selcopy"])
def test_every_built_in_arena_loads_and_all_its_cells_validate(spec):
  a = arena.load_arena(spec)
  todo = arena.cells(a)
  arena.check_cells(todo)  # the trainer's own config validation, cell by cell
  train = [c for c in todo if c.kind == "train"]
  assert len(train) == len(a["tasks"]) * sum(
      len(a["seeds"]) * math.prod(len(v) for v in (m["grid"] if "grid" in m else a["grid"]).values())
      for m in a["mixers"].values())
  assert len({c.name for c in todo}) == len(todo)  # no two cells share a workdir
  if spec == "configs/arena/cpu.py":
    assert len(a["mixers"]) >= 8 and len(a["tasks"]) >= 4


def test_cell_names_never_collide_and_the_error_line_is_the_last_attempts(tmp_path):
  a = arena.check_arena({"name": "d", "root": str(tmp_path), "tasks": {"a-b": {"config": "x.py"}, "a": {"config": "x.py"}},
                         "mixers": {"c": {}, "b-c": {"mixer": "linear"}}})
  with pytest.raises(arena.UserError, match="would share the workdir 'a-b-c-s0'"):
    arena.cells(a)
  log = tmp_path / "cell.log"
  log.write_text("\n== 2026 python -m trainer.train\nerror: first attempt's sentence\n"
                 "\n== 2026 python -m trainer.train\nstep 3\nValueError: boom\n  more\n")
  assert arena.last_error_line(str(log)) == "ValueError: boom"
  log.write_text(log.read_text() + "\n== 2026 python -m trainer.train\n")
  assert arena.last_error_line(str(log)) == "no output (killed?)"
