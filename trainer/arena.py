"""The arena: train a mixers x tasks grid and make its tables and plots.

    python -m trainer.arena --config=configs/arena/cpu.py [--parallel=N] [--report] [--launcher=slurm]
    python -m trainer.arena --task=configs/mqar.py --mixers=attention,linear [--set KEY=VALUE ...] \
        [--grid optimizer.learning_rate=1e-3,3e-3] [--seeds=0,1]          # a one-task arena, no file

An arena config (`configs/arena/*.py`, `get_config(arg=None)` returning a dict) names:

  tasks    {label: {"config": "configs/NAME.py[:ARG]", "set": ["KEY=VALUE", ...]}}
  mixers   {label: {"mixer": NAME (default: the label), "set": [...], "grid": {KEY: [values]}}}
  seeds    [0, ...]                   one cell per seed
  grid     {KEY: [values]}            each mixer's grid unless it has its own (Zoology reports the
                                      best learning rate per mixer); the product of the keys' values
  set      ["KEY=VALUE", ...]         for every cell (after the task's and the mixer's)
  parallel cells trained at once on this machine (on one GPU each gets an equal memory share)
  threshold  held-out accuracy whose first step the tables report (steps to X)
  baseline   the mixer label efficiency is relative to (default "attention")
  memory   {"task": label, "lengths": [...]}: compiled train-step memory per mixer at each
           length (`trainer.train --dry_run`, nothing trained)
  root     where the cells live (default runs/arena/<name>)

Each cell is an ordinary `trainer.train` workdir, ROOT/cells/<task>-<mixer>[-<grid>]-s<seed>, trained
with `eval_best_at_end=true` (the best checkpoint by validation, evaluated on validation and test):
it can be inspected, evaluated or resumed by hand. Re-running the command skips finished cells,
resumes unfinished ones from their checkpoints and retries a failed cell once; a cell that fails
twice is reported with its last error line and the others go on. After every finished cell, and
with `--report` at any time, ROOT/results.jsonl, ROOT/results.md and ROOT/*.png are rewritten
(selection by validation, never by test). `--launcher=slurm` writes ROOT/arena.sbatch, an array
job whose tasks are the cells (`--cell=I` trains cell I).
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import datetime
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from trainer.config import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARENA_KEYS = ("name", "tasks", "mixers", "seeds", "grid", "set", "parallel", "threshold", "baseline", "memory", "root")
TASK_KEYS = ("config", "set")
MIXER_KEYS = ("mixer", "set", "grid")
RETRIES = 1  # a failed cell is started once more in the same invocation


# ------------------------------------------------------------------ the grid


@dataclass
class Cell:
  """One `trainer.train` run (kind "train") or one compile-only memory probe (kind "memory")."""
  name: str
  kind: str
  task: str
  mixer: str  # the mixer's label in the arena
  config: str
  overrides: list[str]
  seed: int = 0
  grid: dict = field(default_factory=dict)
  seq_len: int | None = None  # memory probes

  def workdir(self, root: str) -> str:
    return os.path.join(root, "cells" if self.kind == "train" else "memory", self.name)

  def argv(self, root: str) -> list[str]:
    cmd = ["-m", "trainer.train", f"--config={self.config}", f"--workdir={self.workdir(root)}"]
    cmd += [f"--config.{o}" for o in self.overrides]
    return cmd + (["--dry_run"] if self.kind == "memory" else [])


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


def _short(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _as_list(value, what: str) -> list:
  if isinstance(value, (list, tuple)):
    return list(value)
  raise UserError(f"{what} is {value!r}; it must be a list")


def load_arena(spec: str) -> dict:
  """Reads an arena config file `path.py[:arg]` into a checked plain dict."""
  from trainer.config import run_get_config
  path = spec.partition(":")[0]
  raw = run_get_config(spec, "arena config", "arenas live in configs/arena/*.py")
  if hasattr(raw, "to_dict"):
    raw = raw.to_dict()
  if not isinstance(raw, dict):
    raise UserError(f"arena config {path!r}: get_config returned {type(raw).__name__}, not a dict")
  raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
  return check_arena(raw)


def check_arena(a: dict) -> dict:
  """Fills defaults and checks the arena's own keys (each cell's config is checked by the trainer's loader)."""
  for key in a:
    if key not in ARENA_KEYS:
      raise UserError(f"arena key {key!r} is not known; valid keys: {', '.join(ARENA_KEYS)}")
  a = dict(a)
  a.setdefault("seeds", [0])
  a.setdefault("grid", {})
  a.setdefault("set", [])
  a.setdefault("parallel", 1)
  a.setdefault("threshold", 0.9)
  a.setdefault("baseline", "attention")
  a.setdefault("memory", None)
  a.setdefault("root", os.path.join("runs", "arena", _slug(str(a["name"]))))
  for what in ("tasks", "mixers"):
    if not isinstance(a.get(what), dict) or not a[what]:
      raise UserError(f"arena {what} is {a.get(what)!r}; it must map at least one label to its settings")
  for label, t in a["tasks"].items():
    if not isinstance(t, dict) or "config" not in t:
      raise UserError(f"arena task {label!r} is {t!r}; it must be a dict with a 'config' (configs/NAME.py[:ARG])")
    for key in t:
      if key not in TASK_KEYS:
        raise UserError(f"arena task {label!r} has key {key!r}; valid keys: {', '.join(TASK_KEYS)}")
    t["set"] = [str(s) for s in _as_list(t.get("set", []), f"arena task {label!r}'s set")]
  for label, m in list(a["mixers"].items()):
    m = {} if m is None else m
    if not isinstance(m, dict):
      raise UserError(f"arena mixer {label!r} is {m!r}; it must be a dict (mixer, set, grid) or empty")
    for key in m:
      if key not in MIXER_KEYS:
        raise UserError(f"arena mixer {label!r} has key {key!r}; valid keys: {', '.join(MIXER_KEYS)}")
    m.setdefault("mixer", label)
    m["set"] = [str(s) for s in _as_list(m.get("set", []), f"arena mixer {label!r}'s set")]
    a["mixers"][label] = m
  seeds = _as_list(a["seeds"], "arena seeds")
  if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
    raise UserError(f"arena seeds {a['seeds']!r} must be a non-empty list of integers >= 0")
  if not isinstance(a["parallel"], int) or a["parallel"] < 1:
    raise UserError(f"arena parallel={a['parallel']!r} must be an integer >= 1")
  for where, grid in [("arena grid", a["grid"])] + [(f"arena mixer {k!r}'s grid", m["grid"])
                                                     for k, m in a["mixers"].items() if "grid" in m]:
    if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
      raise UserError(f"{where} is {grid!r}; it must map config keys to non-empty lists of values")
  for s in a["set"] + [s for t in a["tasks"].values() for s in t["set"]] + \
      [s for m in a["mixers"].values() for s in m["set"]]:
    if "=" not in s:
      raise UserError(f"arena override {s!r} must look like KEY=VALUE")
  if a["memory"] is not None:
    mem = a["memory"]
    if not isinstance(mem, dict) or mem.get("task") not in a["tasks"] or not mem.get("lengths"):
      raise UserError(f"arena memory={mem!r} must name one of the tasks ({', '.join(a['tasks'])}) and a list of lengths")
  return a


def cells(a: dict) -> list[Cell]:
  """Every cell of the arena in a fixed order: tasks, then mixers, grid points, seeds; memory probes last."""
  out = []
  for t_label, t in a["tasks"].items():
    for m_label, m in a["mixers"].items():
      grid = m["grid"] if "grid" in m else a["grid"]
      keys = list(grid)
      for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for seed in a["seeds"]:
          suffix = "".join(f"-{_short(k)}={v}" for k, v in point.items())
          name = _slug(f"{t_label}-{m_label}{suffix}-s{seed}")
          overrides = (t["set"] + [f"model.mixer={m['mixer']}"] + m["set"] + [f"{k}={v}" for k, v in point.items()]
                       + a["set"] + [f"seed={seed}", "eval_best_at_end=true", "progress_bar=false"])
          out.append(Cell(name, "train", t_label, m_label, t["config"], overrides, seed, point))
  if a["memory"]:
    t = a["tasks"][a["memory"]["task"]]
    for m_label, m in a["mixers"].items():
      for length in a["memory"]["lengths"]:
        overrides = t["set"] + [f"model.mixer={m['mixer']}"] + m["set"] + a["set"] + [f"task.seq_len={length}"]
        out.append(Cell(_slug(f"{m_label}-L{length}"), "memory", a["memory"]["task"], m_label, t["config"],
                        overrides, seq_len=int(length)))
  seen: dict[str, Cell] = {}
  for c in out:
    if (c.kind, c.name) in seen:
      raise UserError(f"two cells of this arena would share the workdir {c.name!r}; rename a task or mixer label")
    seen[(c.kind, c.name)] = c
  return out


def check_cells(todo: list[Cell]) -> None:
  """Every cell's config loads and validates (the trainer's own one-sentence errors) before anything runs."""
  from trainer.config import load_config
  seen = {}
  for c in todo:
    key = (c.config, tuple(c.overrides))
    if key in seen:
      continue
    try:
      cfg = seen[key] = load_config(c.config, c.overrides)
    except UserError as e:
      raise UserError(f"cell {c.name}: {e}") from None
    if c.kind == "train" and (cfg.eval_split != "validation" or not cfg.keep_best):
      raise UserError(f"cell {c.name} has eval_split={cfg.eval_split!r}, keep_best={cfg.keep_best}; the arena picks "
                      f"each cell's best checkpoint by validation, so it needs eval_split=validation and keep_best=true")


# ------------------------------------------------------------------ reading a cell's workdir


def read_jsonl(path: str) -> list[dict]:
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest of the file still counts
          continue
  except FileNotFoundError:
    pass
  return rows


def steps_to(curve, threshold: float):
  """The step of the first evaluation with held-out accuracy >= threshold, or None."""
  return next((step for step, acc in curve if acc >= threshold), None)


def cell_record(cell: Cell, root: str, threshold: float) -> dict:
  """What the tables need from one training cell's metrics.jsonl and config.json."""
  wd = cell.workdir(root)
  rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  rec = {"cell": cell.name, "task": cell.task, "mixer": cell.mixer, "seed": cell.seed, "grid": cell.grid,
         "config": cell.config, "overrides": cell.overrides, "workdir": wd}
  # The config in force: the newest one a resume wrote (total_steps may have been raised), else the first.
  resumed = sorted((int(m.group(1)), n) for n in (os.listdir(wd) if os.path.isdir(wd) else [])
                   for m in [re.fullmatch(r"config_resumed_at_(\d+)\.json", n)] if m)
  try:
    with open(os.path.join(wd, resumed[-1][1] if resumed else "config.json")) as f:
      cfg = json.load(f)
    rec["mixer_name"] = cfg["model"]["mixer"]
    rec["total_steps"] = cfg["total_steps"]
    rec["seq_len"] = cfg["task"]["seq_len"]
  except (OSError, ValueError, KeyError):
    pass
  # A resumed run repeats the steps after its last checkpoint: the last row written for a step wins.
  curve = {}
  tps, wall = [], 0.0
  for r in rows:
    if "eval/accuracy" in r:
      curve[int(r["step"])] = (float(r["eval/accuracy"]), float(r.get("eval/loss", math.nan)))
    if "train/tokens_per_sec" in r:
      tps.append(float(r["train/tokens_per_sec"]))
    if "time/wall_seconds" in r:
      wall += float(r["time/wall_seconds"])
    for k in ("compile/temp_bytes", "compile/num_params", "compile/flops_per_step"):
      if k in r:
        rec[k.split("/", 1)[1]] = r[k]
    if "best/test/accuracy" in r:
      rec["best_step"] = int(r["best/step"])
      rec["best_at"] = int(r["step"])  # the step at which that evaluation ran (the end of an invocation)
      for split in ("validation", "test"):
        rec[split] = {m: r[f"best/{split}/{m}"] for m in ("accuracy", "loss") if f"best/{split}/{m}" in r}
  rec["step"] = max([int(r["step"]) for r in rows if "step" in r], default=0)
  rec["curve"] = sorted((s, a) for s, (a, _) in curve.items())
  rec["steps_to_threshold"] = steps_to(rec["curve"], threshold)
  # Train steps only (each window's wall time less evaluation and checkpoints, as the trainer logs it);
  # the median keeps one slow window (the first after compiling, a busy machine) from moving it.
  rec["tokens_per_sec"] = statistics.median(tps) if tps else None
  rec["wall_seconds"] = wall
  try:
    with open(os.path.join(wd, "eval_results.json")) as f:
      rec["chance"] = json.load(f).get("chance_accuracy")
  except (OSError, ValueError):
    pass
  failure = read_failure(cell, root)
  if failure:
    rec["error"] = failure["error"]
  return rec


def memory_record(cell: Cell, root: str) -> dict | None:
  try:
    with open(os.path.join(cell.workdir(root), "compile.json")) as f:
      stats = json.load(f)
  except (OSError, ValueError):
    return None
  return {"mixer": cell.mixer, "seq_len": cell.seq_len, "temp_bytes": stats.get("temp_bytes"),
          "total_bytes": stats.get("total_bytes")}


def is_done(cell: Cell, root: str) -> bool:
  """A cell is done when the arena recorded its clean, complete exit for these same overrides."""
  try:
    with open(os.path.join(cell.workdir(root), "arena_done.json")) as f:
      return json.load(f).get("overrides") == cell.overrides
  except (OSError, ValueError):
    return False


def failure_path(cell: Cell, root: str) -> str:
  return os.path.join(root, "failures", f"{cell.kind}-{cell.name}.json")


def read_failure(cell: Cell, root: str) -> dict | None:
  try:
    with open(failure_path(cell, root)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_atomic(path: str, text: str) -> None:
  # Several array tasks (on several nodes) may report at once: each its own temporary.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def last_error_line(log_path: str) -> str:
  """The last attempt's error: its `error:` sentence, else its last exception line, else its last line."""
  try:
    with open(log_path, errors="replace") as f:
      text = f.read()
  except OSError:
    return "no log"
  lines = [ln.strip() for ln in text.split("\n== ")[-1].splitlines()[1:] if ln.strip()]
  for pick in (lambda ln: ln.startswith("error:"), lambda ln: re.match(r"^\w+(\.\w+)*(Error|Exception)\b", ln)):
    hit = [ln for ln in lines if pick(ln)]
    if hit:
      return hit[-1]
  return lines[-1] if lines else "no output (killed?)"


# ------------------------------------------------------------------ the report


def _shown(path: str) -> str:
  """A path as the report prints it: relative to the working directory when it lies inside it."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def _fmt_mean(values: list[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def select(records: list[dict]) -> dict:
  """{(task, mixer): (grid point, [records of its seeds])}: each mixer's grid point with the best
  mean validation accuracy over seeds (ties: lower validation loss), among finished cells."""
  groups: dict = {}
  for r in records:
    if "test" in r and "validation" in r:
      groups.setdefault((r["task"], r["mixer"]), {}).setdefault(json.dumps(r["grid"], sort_keys=True), []).append(r)
  out = {}
  for key, points in groups.items():
    def score(item):
      runs = item[1]
      return (statistics.mean(r["validation"].get("accuracy", 0.0) for r in runs),
              -statistics.mean(r["validation"].get("loss", 0.0) for r in runs))
    point, runs = max(points.items(), key=score)
    out[key] = (json.loads(point), runs)
  return out


def _rel(value, base) -> str:
  return "-" if value is None or not base else f"{value / base:.2f}x"


def report(a: dict, todo: list[Cell], status: dict | None = None, spec: str = "") -> str:
  """Writes ROOT/results.jsonl, ROOT/results.md and the plots; returns the markdown."""
  root = a["root"]
  status = status or {}
  train = [c for c in todo if c.kind == "train"]
  records = []
  for c in train:
    rec = cell_record(c, root, a["threshold"])
    rec["status"] = status.get(c.name) or ("done" if is_done(c, root) else "failed" if "error" in rec
                                           else "started" if rec["step"] else "not started")
    records.append(rec)
  mem = [m for c in todo if c.kind == "memory" and is_done(c, root) for m in [memory_record(c, root)] if m]
  os.makedirs(root, exist_ok=True)
  _write_atomic(os.path.join(root, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
  tasks, mixers = list(a["tasks"]), list(a["mixers"])
  chosen = select([r for r in records if r["status"] == "done"])
  chance = {}
  for r in records:
    if r.get("chance") is not None:
      chance.setdefault(r["task"], r["chance"])
  seeds = len(a["seeds"])
  lines = [f"# Arena `{a['name']}`", "",
           f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `python -m trainer.arena {spec}` "
           f"from {sum(r['status'] == 'done' for r in records)} of {len(records)} finished cells in `{_shown(root)}`.", "",
           f"## Test accuracy (best checkpoint by validation; mean ± std over {seeds} seed(s)"
           + ("; each mixer's grid point chosen by mean validation accuracy" if any(c.grid for c in train) else "") + ")",
           "", "| mixer | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
  avg_chance = [chance.get(t) for t in tasks]
  lines.append("| chance | " + " | ".join("-" if v is None else f"{v:.3f}" for v in avg_chance) + " | "
               + ("-" if None in avg_chance else f"{statistics.mean(avg_chance):.3f}") + " |")
  grid_notes = []
  for m in mixers:
    cols, means = [], []
    for t in tasks:
      if (t, m) not in chosen:
        cols.append("-")
        continue
      point, runs = chosen[(t, m)]
      accs = [r["test"]["accuracy"] for r in runs]
      means.append(statistics.mean(accs))
      cols.append(_fmt_mean(accs) + (f" ({len(runs)}/{seeds} seeds)" if len(runs) < seeds else ""))
      if point:
        grid_notes.append(f"{m} on {t}: " + ", ".join(f"{_short(k)}={v}" for k, v in point.items()))
    avg = f"{statistics.mean(means):.3f}" if len(means) == len(tasks) else "-"
    lines.append(f"| {m} | " + " | ".join(cols) + f" | {avg} |")
  if grid_notes:
    lines += ["", "Best grid point per mixer and task (by validation): " + "; ".join(grid_notes) + "."]
  thr = a["threshold"]
  lines += ["", f"## Steps to {thr:g} held-out accuracy (first evaluation at or above it; mean over seeds "
            "that reached it, and how many did)", "",
            "| mixer | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for m in mixers:
    cols = []
    for t in tasks:
      if (t, m) not in chosen:
        cols.append("-")
        continue
      hit = [r["steps_to_threshold"] for r in chosen[(t, m)][1] if r["steps_to_threshold"] is not None]
      n = len(chosen[(t, m)][1])
      cols.append("not reached" if not hit else f"{statistics.mean(hit):.0f}" + (f" ({len(hit)}/{n})" if n > 1 else ""))
    lines.append(f"| {m} | " + " | ".join(cols) + " |")
  base = a["baseline"]
  lines += ["", f"## Efficiency relative to `{base}` on the same task and length (train tokens/s: the median of "
            "the trainer's log windows, train steps only, with the arena's other cells sharing the machine; compiled "
            "temporary memory of the train step per device)", "",
            "| mixer | " + " | ".join(f"{t} speed | {t} memory" for t in tasks) + " |",
            "|---|" + "---|---|" * len(tasks)]
  def medians(t, m):
    runs = chosen.get((t, m), (None, []))[1]
    tps = [r["tokens_per_sec"] for r in runs if r.get("tokens_per_sec")]
    mem_b = [r["temp_bytes"] for r in runs if r.get("temp_bytes")]
    return (statistics.median(tps) if tps else None), (statistics.median(mem_b) if mem_b else None)
  for m in mixers:
    cols = []
    for t in tasks:
      tps, mb = medians(t, m)
      btps, bmb = medians(t, base)
      cols.append(f"{_rel(tps, btps)} ({tps / 1e3:.1f}k tok/s)" if tps else "-")
      cols.append(f"{_rel(mb, bmb)} ({mb / 2**20:.1f} MiB)" if mb else "-")
    lines.append(f"| {m} | " + " | ".join(cols) + " |")
  if mem:
    lengths = sorted({m["seq_len"] for m in mem})
    by = {(m["mixer"], m["seq_len"]): m["temp_bytes"] for m in mem}
    lines += ["", f"## Compiled train-step memory against length (`{a['memory']['task']}`, temporaries per device, MiB; "
              "`--dry_run`, nothing trained)", "", "| mixer | " + " | ".join(f"L={n}" for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for m in mixers:
      lines.append(f"| {m} | " + " | ".join("-" if by.get((m, n)) is None else f"{by[(m, n)] / 2**20:.1f}"
                                              for n in lengths) + " |")
  unfinished = [r for r in records if r["status"] not in ("done", "not started")]
  waiting = sum(r["status"] == "not started" for r in records)
  if unfinished or waiting:
    lines += ["", "## Cells not finished", ""] + ([f"- {waiting} cell(s) not started"] if waiting else [])
    lines += [f"- `{r['cell']}`: {r['status']} (step {r['step']}"
              + (f" of {r['total_steps']}" if r.get("total_steps") else "")
              + (f"; last held-out accuracy {r['curve'][-1][1]:.3f} at step {r['curve'][-1][0]}" if r["curve"] else "")
              + ")" + (f"; last error: {r['error']}" if r.get("error") and r["status"] != "done" else "")
              for r in unfinished]
  lines += ["", "Cells: `" + os.path.join(_shown(root), "cells") + "/<task>-<mixer>[-grid]-s<seed>` (ordinary workdirs); "
            "one record per cell in `results.jsonl`; plots beside this file.", ""]
  text = "\n".join(lines)
  _write_atomic(os.path.join(root, "results.md"), text)
  plots(a, records, chosen, mem)
  return text


def plots(a: dict, records: list[dict], chosen: dict, mem: list[dict]) -> list[str]:
  """PNG files: held-out curves per task, accuracy against tokens/s per task, memory against length."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - a declared dependency
    return []
  root, out = a["root"], []
  cmap = plt.cm.tab10 if len(a["mixers"]) <= 10 else plt.cm.tab20
  colours = {m: cmap(i % cmap.N) for i, m in enumerate(a["mixers"])}
  for t in a["tasks"]:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    drew = False
    for m in a["mixers"]:
      if (t, m) not in chosen:
        continue
      runs = chosen[(t, m)][1]
      steps = sorted(set.intersection(*(set(s for s, _ in r["curve"]) for r in runs)))
      if steps:
        means = [statistics.mean(dict(r["curve"])[s] for r in runs) for s in steps]
        ax1.plot(steps, means, marker="o", ms=3, label=m, color=colours[m])
        drew = True
      tps = [r["tokens_per_sec"] for r in runs if r.get("tokens_per_sec")]
      if tps:
        acc = statistics.mean(r["test"]["accuracy"] for r in runs)
        ax2.scatter([statistics.median(tps)], [acc], color=colours[m])
        ax2.annotate(m, (statistics.median(tps), acc), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if not drew:
      plt.close(fig)
      continue
    ax1.set(title=f"{t}: held-out accuracy during training", xlabel="step", ylabel="validation accuracy")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set(title=f"{t}: test accuracy against training speed", xlabel="train tokens/s", ylabel="test accuracy",
            xscale="log")
    fig.tight_layout()
    path = os.path.join(root, f"{_slug(t)}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    out.append(path)
  if mem:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in a["mixers"]:
      pts = sorted((r["seq_len"], r["temp_bytes"] / 2**20) for r in mem if r["mixer"] == m and r["temp_bytes"])
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=m, color=colours[m])
    ax.set(title="compiled train-step memory (temporaries per device)", xlabel="sequence length", ylabel="MiB",
           xscale="log", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(root, "memory.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    out.append(path)
  return out


def update_readme(readme: str, a: dict, text: str) -> None:
  """Replaces the block between `<!-- arena:NAME -->` and `<!-- /arena:NAME -->` with the results' tables."""
  start, end = f"<!-- arena:{a['name']} -->", f"<!-- /arena:{a['name']} -->"
  with open(readme) as f:
    body = f.read()
  if start not in body or end not in body:
    raise UserError(f"--readme={readme!r} has no block between {start} and {end}; add both markers where the "
                    f"tables go")
  tables = "\n".join(line.replace("## ", "#### ", 1) if line.startswith("## ") else line
                     for line in text.splitlines()[2:])  # without the title
  head, rest = body.split(start, 1)
  _, tail = rest.split(end, 1)
  _write_atomic(readme, f"{head}{start}\n{tables.strip()}\n{end}{tail}")


# ------------------------------------------------------------------ running cells


# Each cell starts through this prelude: it asks Linux for SIGTERM when the arena dies, so a killed
# arena leaves no orphan training on (the trainer checkpoints on SIGTERM and a re-run resumes it),
# then becomes the trainer. Done in the child's own interpreter rather than in a preexec_fn, which
# would run Python between fork and exec of the (multithreaded) arena. The cells stay in the arena's
# process group, so a terminal's Ctrl-C reaches each of them too.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "try:\n"
    "  ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "  pass\n"
    "if os.getppid() != parent:\n"
    "  sys.exit(143)  # the arena died before the request took effect\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


class Runner:
  """Runs cells as subprocesses, `parallel` at a time, with one retry each, and a live display."""

  def __init__(self, a: dict, todo: list[Cell], parallel: int, deadline_s: float | None, spec: str, quiet: bool,
               on_finish=None):
    self.a, self.todo, self.parallel, self.spec = a, todo, parallel, spec
    self.deadline = time.time() + deadline_s if deadline_s is not None else None
    self.quiet = quiet
    self.on_finish = on_finish
    self.status: dict[str, str] = {}
    self.errors: dict[str, str] = {}
    self.tty = sys.stdout.isatty()
    self.last_display = 0.0
    self.t0 = time.time()
    self.durations: dict[str, list[float]] = {"train": [], "memory": []}

  def log_path(self, c: Cell) -> str:
    return os.path.join(self.a["root"], "logs", f"{c.kind}-{c.name}.log")

  def start(self, c: Cell) -> subprocess.Popen:
    env = dict(os.environ)
    if self.parallel > 1:
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / self.parallel:.3f}")
    os.makedirs(os.path.dirname(self.log_path(c)), exist_ok=True)
    log = open(self.log_path(c), "a")
    log.write(f"\n== {datetime.datetime.now().isoformat(timespec='seconds')} python {shlex.join(c.argv(self.a['root']))}\n")
    log.flush()
    # The arena's own directory, so relative config paths mean what they meant to the arena's checks.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())] + c.argv(self.a["root"]),
                            env=env, stdout=log, stderr=subprocess.STDOUT)

  def finished_ok(self, c: Cell, wall: float) -> bool:
    """After a clean exit: did the cell reach its end (and its end-of-run evaluation)? Marks it done."""
    root = self.a["root"]
    if c.kind == "memory":
      if not os.path.exists(os.path.join(c.workdir(root), "compile.json")):
        return False
    else:
      rec = cell_record(c, root, self.a["threshold"])
      if ("test" not in rec or rec.get("total_steps") is None or rec["step"] < rec["total_steps"]
          or rec.get("best_at") != rec["step"]):
        return False  # a clean exit short of the end: stopped by a signal; a re-run resumes it
    with contextlib.suppress(FileNotFoundError):
      os.remove(failure_path(c, root))
    _write_atomic(os.path.join(c.workdir(root), "arena_done.json"),
                  json.dumps({"overrides": c.overrides, "finished": time.time(), "arena_wall_seconds": wall}))
    return True

  def run(self) -> dict:
    root = self.a["root"]
    pending = [c for c in self.todo if not is_done(c, root)]
    for c in self.todo:
      if is_done(c, root):
        self.status[c.name] = "done"
    attempts: dict[str, int] = {}
    running: dict[str, tuple[Cell, subprocess.Popen, float]] = {}
    self.display(pending, running, force=True)
    try:
      while pending or running:
        while pending and len(running) < self.parallel and not self.past_deadline():
          c = pending.pop(0)
          attempts[c.name] = attempts.get(c.name, 0) + 1
          self.status[c.name] = "running"
          running[c.name] = (c, self.start(c), time.time())
        time.sleep(0.5)
        if self.past_deadline():
          self.stop_all(running, "stopped at the deadline")
          for c in pending:
            self.status[c.name] = "not started (deadline)"
          pending, running = [], {}
          break
        for name, (c, proc, t0) in list(running.items()):
          if proc.poll() is None:
            continue
          del running[name]
          wall = time.time() - t0
          if proc.returncode == 0 and self.finished_ok(c, wall):
            self.status[name] = "done"
            self.durations[c.kind].append(wall)
          elif proc.returncode == 0:
            self.status[name] = "stopped (resumable)"
          else:
            self.errors[name] = f"exit {proc.returncode}: {last_error_line(self.log_path(c))}"
            os.makedirs(os.path.dirname(failure_path(c, root)), exist_ok=True)
            _write_atomic(failure_path(c, root), json.dumps({"error": self.errors[name], "attempts": attempts[name],
                                                             "overrides": c.overrides, "time": time.time()}))
            if attempts[name] <= RETRIES:
              self.status[name] = "retrying"
              pending.append(c)
            else:
              self.status[name] = "failed"
          if c.kind == "train" and self.on_finish and (pending or running):  # the last: the caller reports
            self.on_finish(self.status)
        self.display(pending, running)
    except KeyboardInterrupt:
      # The terminal's Ctrl-C reached every cell too (same process group): each saves a checkpoint.
      self.stop_all(running, "interrupted")
      raise
    self.display([], {}, force=True)
    return self.status

  def past_deadline(self) -> bool:
    return self.deadline is not None and time.time() > self.deadline

  def stop_all(self, running, why: str) -> None:
    """SIGTERM every running cell (each checkpoints and exits), one shared grace period, then SIGKILL."""
    for _, proc, _ in running.values():
      if proc.poll() is None:
        proc.terminate()
    grace = time.time() + 30
    for name, (c, proc, t0) in running.items():
      try:
        proc.wait(max(0.1, grace - time.time()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      # A cell that reached its end before the signal is done, not stopped.
      self.status[name] = "done" if proc.returncode == 0 and self.finished_ok(c, time.time() - t0) else why

  def progress(self, c: Cell) -> str:
    if c.kind == "memory":
      return "compiling"
    rows = read_jsonl(os.path.join(c.workdir(self.a["root"]), "metrics.jsonl"))
    step = max([int(r["step"]) for r in rows if "step" in r], default=0)
    acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    total = next((o.split("=", 1)[1] for o in reversed(c.overrides) if o.startswith("total_steps=")), None)
    try:
      with open(os.path.join(c.workdir(self.a["root"]), "config.json")) as f:
        total = json.load(f)["total_steps"]
    except (OSError, ValueError, KeyError):
      pass
    return f"step {step}" + (f"/{total}" if total else "") + (f", held-out {acc[-1]:.3f}" if acc else "")

  def display(self, pending, running, force: bool = False) -> None:
    if self.quiet:
      return
    now = time.time()
    if not force and now - self.last_display < (5 if self.tty else 30):
      return
    self.last_display = now
    done = sum(v == "done" for v in self.status.values())
    failed = sum(v == "failed" for v in self.status.values())
    eta = ""
    if self.durations.get("train") and (pending or running):
      # Each kind's mean so far (memory probes only compile); a running cell counts as half left.
      mean = {k: statistics.mean(v) for k, v in self.durations.items() if v}
      left = sum(mean.get(c.kind, mean["train"]) for c in pending)
      left += sum(mean.get(c.kind, mean["train"]) / 2 for c, _, _ in running.values())
      eta = f", ETA {datetime.timedelta(seconds=int(left / self.parallel))}"
    elapsed = datetime.timedelta(seconds=int(now - self.t0))
    lines = [f"[arena {self.a['name']} {elapsed}] {done}/{len(self.todo)} done, {len(running)} running, "
             f"{failed} failed, {len(pending)} waiting{eta}"]
    lines += [f"  {name}: {self.progress(c)}" for name, (c, _, _) in running.items()]
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------ slurm


def write_sbatch(a: dict, todo: list[Cell], arena_argv: list[str]) -> str:
  root = os.path.abspath(a["root"])
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  path = os.path.join(root, "arena.sbatch")
  args = " ".join(shlex.quote(x) for x in arena_argv)
  names = "\n".join(f"#   {i}: {c.name}" for i, c in enumerate(todo))
  text = f"""#!/bin/bash
# The arena {a['name']!r} as a SLURM array job: one task per cell ({len(todo)} cells), at most
# {a['parallel']} at once. Adjust the resource lines to your cluster, then: sbatch {path}
# Each task trains (or resumes) its cell and rewrites the arena's report; afterwards
#   python -m trainer.arena {args} --report
# rebuilds it once more. Re-submitting skips finished cells.
#SBATCH --job-name=arena-{_slug(str(a['name']))}
#SBATCH --array=0-{len(todo) - 1}%{a['parallel']}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output={root}/logs/slurm-%A_%a.log
# Cells:
{names}
set -euo pipefail
cd {shlex.quote(ROOT)}
[ -f .venv/bin/activate ] && source .venv/bin/activate
exec python -m trainer.arena {args} --cell="$SLURM_ARRAY_TASK_ID"
"""
  _write_atomic(path, text)
  os.chmod(path, 0o755)
  return path


# ------------------------------------------------------------------ entry point


def parse_grid(flags: list[str]) -> dict:
  grid = {}
  for g in flags:
    key, sep, values = g.partition("=")
    if not sep or not values:
      raise UserError(f"--grid={g!r} must look like KEY=v1,v2")
    grid[key] = [_literal(v) for v in values.split(",")]
  return grid


def _literal(text: str):
  """'1e-3' -> 0.001, '64' -> 64, 'true' stays a string: a grid value names its cell the same way
  whether it came from a config file (a number) or the command line."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def adhoc_arena(args) -> dict:
  """`--task=CONFIG --mixers=a,b [--grid KEY=v1,v2]`: a one-task arena without a file (what sweeps were)."""
  if not args.mixers:
    raise UserError("--task needs --mixers=NAME[,NAME...] (the mixers to compare)")
  grid = parse_grid(args.grid)
  stem = _slug(os.path.splitext(os.path.basename(args.task.split(":")[0]))[0])
  name = stem + (f"-{_slug(args.task.split(':', 1)[1])}" if ":" in args.task else "")
  return check_arena({"name": name, "tasks": {stem: {"config": args.task, "set": []}},
                      "mixers": {m: {} for m in args.mixers.split(",") if m}, "grid": grid,
                      "root": os.path.join("runs", "arena", name)})


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m trainer.arena", description=__doc__.splitlines()[0])
  p.add_argument("--config", help="arena config: configs/arena/NAME.py[:ARG]")
  p.add_argument("--task", help="instead of --config: one task config (configs/NAME.py[:ARG]) with --mixers")
  p.add_argument("--mixers", help="comma-separated mixer names (with --task), or a filter of the config's mixers")
  p.add_argument("--tasks", help="comma-separated filter of the config's tasks")
  p.add_argument("--seeds", help="comma-separated seeds, replacing the config's")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every cell (repeatable)")
  p.add_argument("--grid", action="append", default=[], help="KEY=v1,v2: a per-mixer grid (repeatable)")
  p.add_argument("--threshold", type=float, help="held-out accuracy whose first step the tables report")
  p.add_argument("--parallel", type=int, help="cells at once (default: the config's)")
  p.add_argument("--root", help="where the cells and the report go (default: the config's)")
  p.add_argument("--only", help="glob over cell names: run only the matching cells")
  p.add_argument("--deadline_s", type=float, default=None, help="stop running cells (checkpointed) after this long")
  p.add_argument("--report", action="store_true", help="only rebuild results.jsonl, results.md and the plots")
  p.add_argument("--readme", help="with the report: replace README's <!-- arena:NAME --> block with the tables")
  p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                 help="local: run cells here; slurm: write ROOT/arena.sbatch, an array job of the cells")
  p.add_argument("--cell", type=int, help="run cell I only (what each SLURM array task does)")
  p.add_argument("--quiet", action="store_true", help="no live display")
  return p.parse_args(argv)


def _strip_flags(argv: list[str], flags: tuple[str, ...], with_value: tuple[str, ...]) -> list[str]:
  """argv without `flags` (`--f`, `--f=v`, and `--f v` for those in `with_value`)."""
  out, skip = [], False
  for x in argv:
    if skip:
      skip = False
      continue
    name = x.split("=", 1)[0]
    if name in flags:
      skip = name in with_value and "=" not in x
      continue
    out.append(x)
  return out


def _interrupt(signum, frame):
  raise KeyboardInterrupt  # SIGTERM (a scheduler, `timeout`, kill): the same orderly stop as Ctrl-C


def run(argv) -> int:
  args = parse(argv)
  if bool(args.config) == bool(args.task):
    raise UserError("pass one of --config=configs/arena/NAME.py (an arena file) or --task=configs/NAME.py with "
                    "--mixers (a one-task arena)")
  a = load_arena(args.config) if args.config else adhoc_arena(args)
  if args.seeds:
    try:
      a["seeds"] = [int(s) for s in args.seeds.split(",")]
    except ValueError:
      raise UserError(f"--seeds={args.seeds!r} must be comma-separated integers") from None
  a["set"] = a["set"] + args.set
  for key, value in (("threshold", args.threshold), ("parallel", args.parallel), ("root", args.root)):
    if value is not None:
      a[key] = value
  if args.config and args.grid:
    a["grid"] = {**a["grid"], **parse_grid(args.grid)}
  a = check_arena(a)
  a["root"] = os.path.abspath(a["root"])
  every = cells(a)  # the report always covers the whole arena, whatever this invocation runs
  todo = every
  # --mixers / --tasks / --only choose what runs now (a config's mixers; --task's --mixers are its mixers).
  for flag, value, labels, attr in (("--mixers", args.mixers if args.config else None, a["mixers"], "mixer"),
                                    ("--tasks", args.tasks, a["tasks"], "task")):
    if value:
      keep = value.split(",")
      unknown = [k for k in keep if k not in labels]
      if unknown:
        what = "a mixer" if attr == "mixer" else "a task"
        raise UserError(f"{flag} names {unknown[0]!r}, not {what} of this arena; its {attr}s: {', '.join(labels)}")
      todo = [c for c in todo if getattr(c, attr) in keep]
  if args.only:
    todo = [c for c in todo if fnmatch.fnmatch(c.name, args.only)]
  if not todo:
    raise UserError(f"--only={args.only!r} and the filters match no cell; cells look like {every[0].name}")
  spec = " ".join(shlex.quote(x) for x in _strip_flags(argv, ("--cell", "--report", "--readme", "--launcher"),
                                                        ("--cell", "--readme", "--launcher")))
  if args.report:
    text = report(a, every, spec=spec)
    if args.readme:
      update_readme(args.readme, a, text)
    print(text)
    return 0
  check_cells(todo)
  if args.launcher == "slurm":
    task_argv = _strip_flags(argv, ("--cell", "--report", "--readme", "--launcher", "--parallel", "--quiet"),
                             ("--cell", "--readme", "--launcher", "--parallel"))
    path = write_sbatch(a, todo, task_argv)
    print(f"wrote {path} ({len(todo)} cells); submit it with: sbatch {path}")
    return 0
  if args.cell is not None:
    if not 0 <= args.cell < len(todo):
      raise UserError(f"--cell={args.cell} is not a cell index; this arena has cells 0 to {len(todo) - 1}")
    todo = [todo[args.cell]]
  parallel = 1 if args.cell is not None else a["parallel"]
  runner = Runner(a, todo, parallel, args.deadline_s, spec, args.quiet or args.cell is not None,
                  on_finish=lambda status: report(a, every, status, spec))
  previous = signal.signal(signal.SIGTERM, _interrupt)
  interrupted = False
  try:
    status = runner.run()
  except KeyboardInterrupt:
    status, interrupted = runner.status, True
  finally:
    signal.signal(signal.SIGTERM, previous)
  text = report(a, every, status, spec)
  if args.readme:
    update_readme(args.readme, a, text)
  if args.cell is None:
    print("\n" + text)
  failed = [n for n, s in status.items() if s == "failed"]
  for n in failed:
    print(f"cell {n} failed twice; last error: {runner.errors.get(n, '?')}  (log: "
          f"{runner.log_path(next(c for c in todo if c.name == n))})", file=sys.stderr)
  print(f"results: {os.path.join(a['root'], 'results.md')}")
  if interrupted:
    print("interrupted: running cells were stopped at a checkpoint; run the same command again to resume",
          file=sys.stderr)
    return 130
  return 1 if failed else 0


def main(argv=None) -> int:
  from trainer import launch
  return launch.run_entry(lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
