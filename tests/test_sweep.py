"""scripts/sweep.py, which produces the published per-mixer tables: a real two-mixer sweep."""

import os
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402


def test_sweep_table_reports_runs_curves_grid_and_failures(tmp_path, capsys):
  sweep.main(["--config=configs/mqar.py:smoke", "--mixers=linear,nosuchmixer", "--parallel=2",
              f"--workdir_root={tmp_path}", "--set", "total_steps=4", "--set", "eval_every=2",
              "--set", "batch_size=8", "--grid", "optimizer.learning_rate=1e-3,3e-2", "--threshold=0"])
  out = capsys.readouterr().out
  rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
  names = [f"mqar-{m}-learning_rate-{v}" for m in ("linear", "nosuchmixer") for v in ("1e-3", "3e-2")]
  assert set(os.listdir(tmp_path)) == {n + ".log" for n in names} | set(names[:2])  # workdirs of the runs that started
  low, high = ([c.strip() for c in rows[f"linear learning_rate={v}"].split("|")] for v in ("1e-3", "3e-2"))
  assert low[2] != high[2] or low[3] != high[3], "the grid values did not reach the runs"
  best = [c.strip() for c in rows["linear"].split("|")]  # the best-run summary row
  assert best[2] in ("linear learning_rate=1e-3", "linear learning_rate=3e-2")
  assert float(best[3]) == max(float(low[2]), float(high[2]))
  linear = low
  assert linear[4] == "4" and linear[7] == "ok", rows["linear"]
  curve = [point.split(":") for point in linear[8].split()]
  assert [step for step, _ in curve] == ["2", "4"], rows["linear"]
  assert float(curve[-1][1]) == round(float(linear[2]), 3), rows["linear"]  # the last point is the final result
  assert linear[9] == "2" and best[4] == "2", rows  # threshold 0: reached at the first evaluation
  assert "exit 2" in rows["nosuchmixer learning_rate=1e-3"] and rows["nosuchmixer"].split("|")[2].strip() == "-"
  assert "nosuchmixer learning_rate=3e-2 (exit 2): " in out and "'nosuchmixer' is not a known mixer" in out


def test_steps_to_threshold_is_the_first_evaluation_at_or_above_it():
  curve = [(250, 0.3), (500, 0.91), (750, 0.88), (1000, 0.99)]
  assert sweep.steps_to(curve, 0.9) == 500 and sweep.steps_to(curve, 0.95) == 1000
  assert sweep.steps_to(curve, 0.999) is None and sweep.steps_to([], 0.5) is None
