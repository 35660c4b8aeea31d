"""scripts/sweep.py, which produces the published per-mixer tables: a real two-mixer sweep."""

import os
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402


def test_sweep_table_reports_runs_curves_and_failures(tmp_path, capsys):
  sweep.main(["--config=configs/mqar.py:smoke", "--mixers=linear,nosuchmixer", "--parallel=2",
              f"--workdir_root={tmp_path}", "--set", "total_steps=4", "--set", "eval_every=2",
              "--set", "batch_size=8"])
  out = capsys.readouterr().out
  rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
  linear = [c.strip() for c in rows["linear"].split("|")]
  assert linear[4] == "4" and linear[7] == "ok", rows["linear"]
  curve = [point.split(":") for point in linear[8].split()]
  assert [step for step, _ in curve] == ["2", "4"], rows["linear"]
  assert float(curve[-1][1]) == round(float(linear[2]), 3), rows["linear"]  # the last point is the final result
  assert "exit 2" in rows["nosuchmixer"]
  assert "nosuchmixer (exit 2): " in out and "'nosuchmixer' is not a known mixer" in out
