"""Fault matrix: faults injected into real trainer runs, and what each cost.

    python scripts/fault_matrix.py [--quick] [--seed 0] [--only kill9,sigterm,...] [--keep]

Every run is a real `python -m trainer.train` subprocess (repository root as cwd, 8 fake CPU
devices: XLA_FLAGS=--xla_force_host_platform_device_count=8, JAX_PLATFORMS=cpu) of the smoke
config (`--config=configs/default.py:smoke --config.batch_size=8 --config.progress_bar=false
--config.eval_every=0 --config.log_every=1`), in a temporary directory removed at the end. The
script prints (on stdout) one markdown row per fault kind:

  | fault | injected | recovered | steps lost beyond the last checkpoint | clean one-line report |

and, under it, notes per kind and the details (stderr tail) of every injection that did not
recover or did not report cleanly. How each kind is injected and measured (counts are for the
full run; `--quick` halves them, rounding up):

1. kill9 (10): SIGKILL at random moments of a run that checkpoints every step asynchronously
   (keep_checkpoints=2, so most moments are mid-save). The kills form one chain on one
   workdir, all with the same command: each run is killed k (random, 1-4) steps after the
   step it resumed from plus a random 0-0.4 s, and the next run is the resume. From the files
   left right after each kill: L = the last step in metrics.jsonl, C = the newest finished
   (renamed, i.e. not `*.orbax-checkpoint-tmp*`) checkpoint directory; from the next run's
   stdout, R = "resuming from step R" (0 when it starts afresh). Steps lost beyond the last
   checkpoint = L - R - (L - C) = C - R. Recovered: the next run resumed from R = C and
   trained on, and the chain's last run (the resume after the last kill) reaches total_steps
   with exit 0 and every step once in metrics.jsonl.
2. sigterm (3): the same chain with SIGTERM and checkpoint_every=5 (so the stop is mostly
   between regular checkpoints). Recovered: exit 0, "stopped by SIGTERM after step S" on
   stdout, checkpoint S on disk, the next run resumes from S; lost = L - R.
3. flip (8): a finished run (6 steps, checkpoints 3 and 6) is kept as a pristine copy and
   resumed undamaged to step 9 (the reference). Each trial copies the pristine workdir, XORs
   4 bytes with 0x5A at a random offset of a random file under checkpoints/6/state/**/d/*, and
   resumes with the same command. Recovered: exit 0 and the step-9 train loss equal, bitwise,
   to the reference. Detected: the trainer set checkpoint 6 aside (its "is unreadable"
   warning / unreadable_checkpoints/); harmless: not detected and the run identical (bytes no
   restored array reads). Lost = (newest intact checkpoint: 3 if detected, else 6) - R.
4. delete (4): as 3, with manifest.ocdbt removed, _CHECKPOINT_METADATA truncated to half,
   meta/metadata's data_position changed (+8, valid JSON), or the whole state/ directory removed.
5. disk (3): the workdir on a real tmpfs of 2, 3 or 4 MiB (`mount -t tmpfs`, root only; the row
   is skipped with a note when the mount fails), total_steps=40, checkpoint_every=2,
   keep_checkpoints=40, so the disk fills. Clean: exit 75, exactly one stderr line starting
   "error: " naming the last good checkpoint on disk, no "Traceback". Recovered: after
   `mount -o remount,size=64m` the same command exits 0 with steps 1-40 once each, and
   metrics.jsonl is valid JSON lines before and after; lost = C - R. Always unmounted.
6. concurrent (3): a second trainer (seed 1) started on the same workdir together with the
   first, after the first's first step, and mid-run (after 5 steps); 30 steps, a checkpoint
   every step. Recovered: exactly one exits 0, metrics.jsonl holds each step 1-30 once, no
   orphan temporary checkpoint; clean: the other exits 2 with one "error: ... is in use by
   another trainer (pid ..." line and no traceback.
7. nonfinite (2): learning_rate=300, grad_clip=0, warmup_steps=0, checkpoint_every=1 (the
   second trial with log_every=50, so the loss is checked one step late, at the save).
   Clean: exit 2, one "error: " line naming the last finished checkpoint, no traceback.
   Recovered (the files are sound): no orphan `*.orbax-checkpoint-tmp*` directory, and every
   finished checkpoint (checkpoints/ and best_checkpoint/) restores with finite values only,
   read back with Orbax directly in a separate process.

Then a second table: the bad-input catalogues `tests/test_bad_inputs.py` and `tests/test_errors.py`
run through pytest (a subprocess, `-n 0 -p no:cacheprovider -rA`); every test case there is a
mistake that must be refused with one `error: ` sentence, exit 2 and no traceback (a few check
that a harmless change is accepted); cases counted per file from pytest's own summary.
Progress goes to stderr; the tables to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/default.py:smoke", "--config.batch_size=8", "--config.progress_bar=false"]
FAST = ["--config.eval_every=0", "--config.log_every=1"]
KINDS = ("kill9", "sigterm", "flip", "delete", "disk", "concurrent", "nonfinite", "badinputs")
RUN_TIMEOUT = 300  # seconds for any one trainer run


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _say(msg: str) -> None:
  print(f"[fault_matrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- trainer processes ------------------------------------------------------------------


class Trainer:
  """One `python -m trainer.train` subprocess; stdout/stderr go to files (read while it runs)."""

  def __init__(self, logs: str, name: str, workdir: str, *extra: str):
    self.argv = [sys.executable, "-m", "trainer.train", *TINY, f"--workdir={workdir}", *FAST, *extra]
    self.workdir = workdir
    self.name = name
    self._out_path = os.path.join(logs, f"{name}.out")
    self._err_path = os.path.join(logs, f"{name}.err")
    with open(self._out_path, "w") as out, open(self._err_path, "w") as err:
      self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=_env(), stdout=out, stderr=err)
    self.code: int | None = None

  def out(self) -> str:
    with open(self._out_path, errors="replace") as f:
      return f.read()

  def err(self) -> str:
    with open(self._err_path, errors="replace") as f:
      return f.read()

  def wait(self, timeout: float = RUN_TIMEOUT) -> int:
    try:
      self.code = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      self.code = -9999  # marks a run this script had to kill after `timeout`
      with open(self._err_path, "a") as f:
        f.write(f"\n[fault_matrix: killed after a {timeout} s timeout]\n")
    return self.code

  def signal(self, sig) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  def alive(self) -> bool:
    return self.proc.poll() is None

  def resumed_from(self) -> int:
    m = re.search(r"resuming from step (\d+)", self.out())
    return int(m.group(1)) if m else 0


def run_trainer(logs, name, workdir, *extra, timeout=RUN_TIMEOUT) -> Trainer:
  t = Trainer(logs, name, workdir, *extra)
  t.wait(timeout)
  return t


def wait_until(cond, timeout: float, proc: Trainer | None = None, poll: float = 0.02) -> bool:
  """Polls `cond()` until true (True), the timeout, or `proc` exiting first (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return True
    if proc is not None and not proc.alive():
      return cond()
    time.sleep(poll)
  return False


def wait_for_start(proc: Trainer, timeout: float = 120) -> int | None:
  """Waits for the trainer's start-up line; returns the step it resumed from (0: fresh), or None."""
  if not wait_until(lambda: "seqmix: task" in proc.out(), timeout, proc):
    return None
  time.sleep(0.2)  # the "resuming from step N" line is printed right after the start-up line
  return proc.resumed_from()


# -- files --------------------------------------------------------------------------------


def metric_rows(workdir: str) -> list[dict]:
  """metrics.jsonl's rows, skipping a torn (unparsable) line."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path, errors="replace") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


def train_steps(workdir: str) -> list[int]:
  return [r["step"] for r in metric_rows(workdir) if "train/loss" in r]


def last_step(workdir: str) -> int:
  return max(train_steps(workdir), default=0)


def train_loss(workdir: str, step: int) -> float | None:
  for r in metric_rows(workdir):
    if r.get("step") == step and "train/loss" in r:
      return r["train/loss"]
  return None


def jsonl_problem(workdir: str) -> str | None:
  """None when metrics.jsonl is whole JSON lines, else what is wrong."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return "metrics.jsonl missing"
  with open(path, "rb") as f:
    raw = f.read()
  if raw and not raw.endswith(b"\n"):
    return "metrics.jsonl ends in a torn line"
  for i, line in enumerate(raw.splitlines()):
    try:
      json.loads(line)
    except ValueError:
      return f"metrics.jsonl line {i + 1} is not JSON: {line[:80]!r}"
  return None


def steps_once(workdir: str, total: int) -> str | None:
  """None when metrics.jsonl's train rows are exactly steps 1..total, else what is wrong."""
  got = train_steps(workdir)
  if got == list(range(1, total + 1)):
    return None
  dup = sorted({s for s in got if got.count(s) > 1})
  missing = sorted(set(range(1, total + 1)) - set(got))
  return f"train rows are not steps 1..{total} once each (duplicated {dup[:8]}, missing {missing[:8]}, {len(got)} rows)"


def finished_checkpoints(workdir: str, sub: str = "checkpoints") -> list[int]:
  root = os.path.join(workdir, sub)
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def orphan_temporaries(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "*", "*.orbax-checkpoint-tmp*"))


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("error: ")]


def report_problems(proc: Trainer, code: int, needles=()) -> list[str]:
  """What keeps `proc` from having exited `code` with exactly one clean `error: ` line holding `needles`."""
  err = proc.err()
  lines = error_lines(err)
  problems = []
  if proc.code != code:
    problems.append(f"exit {proc.code}, not {code}")
  if len(lines) != 1:
    problems.append(f"{len(lines)} 'error: ' lines")
  if "Traceback" in err:
    problems.append(f"{err.count('Traceback')} traceback(s) on stderr")
  for needle in needles:
    if not lines or needle not in lines[0]:
      problems.append(f"the error line lacks {needle!r}")
  return problems


def tail(text: str, n: int = 12) -> str:
  lines = text.rstrip().splitlines()[-n:]
  return "\n".join("      " + line[:300] for line in lines) or "      (empty)"


# -- results ------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  fault: str
  injected: int = 0
  recovered: int = 0
  lost: list = dataclasses.field(default_factory=list)  # per injection; None where not applicable
  lost_na: str = ""  # the reason when the column does not apply
  clean: int = 0
  clean_note: str = ""
  notes: list = dataclasses.field(default_factory=list)
  failures: list = dataclasses.field(default_factory=list)
  skipped: str = ""
  recovered_note: str = ""

  def fail(self, what: str, proc: Trainer | None = None, text: str | None = None) -> None:
    detail = what
    if proc is not None:
      detail += f"\n    exit {proc.code}; stderr tail ({proc.name}):\n{tail(proc.err())}"
    if text:
      detail += f"\n{tail(text)}"
    self.failures.append(detail)

  def cells(self) -> list[str]:
    if self.skipped:
      return [self.fault, "0", "skipped", "-", f"skipped: {self.skipped}"]
    lost_known = [x for x in self.lost if x is not None]
    if self.lost_na and not lost_known:
      lost = f"n/a ({self.lost_na})"
    elif lost_known and all(x == 0 for x in lost_known):
      lost = f"0 (all {len(lost_known)})"
    elif lost_known:
      lost = f"max {max(lost_known)}: " + ", ".join(str(x) for x in self.lost)
    else:
      lost = "not measured"
    clean = f"{self.clean}/{self.injected}" + (f" ({self.clean_note})" if self.clean_note else "")
    recovered = f"{self.recovered}/{self.injected}" + (f" ({self.recovered_note})" if self.recovered_note else "")
    return [self.fault, str(self.injected), recovered, lost, clean]


def half(items: list, quick: bool) -> list:
  return items[::2] if quick else items


def count(n: int, quick: bool) -> int:
  return max(1, math.ceil(n / 2)) if quick else n


# -- 1 and 2: signals at random moments, a resume chain --------------------------------------


def _signal_chain(ctx, row: Row, name: str, sig, n: int, checkpoint_every: int) -> None:
  """n runs on one workdir with the same command, each stopped by `sig` k (1-4) steps after the
  step it started from plus 0-0.4 s; the run after each is its resume; the last resume runs to
  the end. Each injection is judged by the files right after it and by the next run's resume."""
  wd = os.path.join(ctx.tmp, name)
  total = 5 * n + 10
  args = [f"--config.total_steps={total}", f"--config.checkpoint_every={checkpoint_every}",
          "--config.keep_checkpoints=2"]
  term = sig == signal.SIGTERM
  procs: list[Trainer] = []
  shots: list[dict] = []  # one per injection
  for i in range(n + 1):
    proc = Trainer(ctx.logs, f"{name}-{i}", wd, *args)
    procs.append(proc)
    start = wait_for_start(proc)
    if shots:
      shots[-1]["R"] = start  # the step the resume started from (None: it never started)
    if i == n:
      proc.wait()
      break
    if start is None:
      proc.signal(signal.SIGKILL)
      proc.wait()
      row.fail(f"{name} run {i}: never started", proc)
      break
    k, delay = ctx.rng.randint(1, 4), ctx.rng.uniform(0.0, 0.4)
    if not wait_until(lambda: last_step(wd) >= start + k, 120, proc):
      proc.wait(60)
      row.fail(f"{name} run {i}: ended before step {start + k}", proc)
      break
    time.sleep(delay)
    proc.signal(sig)
    code = proc.wait(120)
    row.injected += 1
    ckpts = finished_checkpoints(wd)
    shot = {"i": i, "start": start, "k": k, "delay": delay, "code": code, "L": last_step(wd),
            "C": max(ckpts, default=0), "ckpts": ckpts}
    if term:
      m = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved", proc.out())
      shot["S"] = int(m.group(1)) if m else None
      shot["clean"] = code == 0 and m is not None and "Traceback" not in proc.err() and not error_lines(proc.err())
    shots.append(shot)

  final = procs[-1]
  problems = []
  if len(shots) < n or final.code != 0:
    problems.append(f"exit {final.code}" if len(shots) == n else "the chain broke off")
  elif (p := steps_once(wd, total)) is not None:
    problems.append(p)
  aside = os.path.join(wd, "unreadable_checkpoints")
  if os.path.isdir(aside):
    problems.append(f"checkpoints set aside as unreadable: {sorted(os.listdir(aside))}")
  final_ok = not problems
  if problems:
    row.fail(f"{name}: the last resume did not finish cleanly: {'; '.join(problems)}", final)

  for j, shot in enumerate(shots):
    R, L, C = shot.get("R"), shot["L"], shot["C"]
    if term:
      S = shot["S"]
      stopped_ok = shot["code"] == 0 and S is not None and S == L and S in shot["ckpts"]
      expect = S if S is not None else C
      row.lost.append(None if R is None else L - R)
      row.clean += int(shot["clean"])
      if not stopped_ok:
        row.fail(f"{name} #{j + 1}: SIGTERM at step {L}: exit {shot['code']}, stopped at {S}, finished "
                 f"checkpoints {shot['ckpts']}", procs[j])
    else:
      stopped_ok, expect = True, C
      # lost = L - R - (L - C): the last logged step, minus the step resumed from, minus the steps
      # the kill legitimately cost (those after the newest finished checkpoint)
      row.lost.append(None if R is None else L - R - (L - C))
      resume_err = procs[j + 1].err()
      row.clean += int("Traceback" not in resume_err and not error_lines(resume_err))
    resumed_ok = R is not None and R == expect
    if not resumed_ok:
      row.fail(f"{name} #{j + 1}: after the signal at step {L} (newest finished checkpoint {C}) the next run "
               f"resumed from {R}, not {expect}", procs[j + 1])
    row.recovered += int(stopped_ok and resumed_ok and final_ok)
  row.notes.append(f"one workdir, one command: total_steps={total}, checkpoint_every={checkpoint_every}, "
                   f"keep_checkpoints=2; run i signalled k=1-4 steps after the step it started from, plus 0-0.4 s")
  row.notes.append("per injection (started at step + k + delay -> last logged step L, newest finished checkpoint "
                   "C, next run resumed from R): " + ", ".join(
                       f"{s['start']}+{s['k']}+{s['delay']:.2f}s -> L{s['L']} C{s['C']} R{s.get('R')}" for s in shots))
  row.notes.append(f"last resume: exit {final.code}, "
                   + (f"steps 1..{total} once each in metrics.jsonl" if final_ok else "; ".join(problems)))


def fault_kill9(ctx) -> Row:
  row = Row("kill -9 at a random moment (async save every step)")
  row.clean_note = "killed process reports nothing; counted: resumes with no traceback/error"
  _signal_chain(ctx, row, "kill9", signal.SIGKILL, count(10, ctx.quick), checkpoint_every=1)
  return row


def fault_sigterm(ctx) -> Row:
  row = Row("SIGTERM at a random moment")
  row.clean_note = "exit 0 with the 'stopped by SIGTERM after step S; checkpoint saved' line"
  _signal_chain(ctx, row, "sigterm", signal.SIGTERM, count(3, ctx.quick), checkpoint_every=5)
  return row


# -- 3 and 4: damaged checkpoints ---------------------------------------------------------------

DAMAGE_ARGS = ["--config.checkpoint_every=3"]
DAMAGE_TOTAL = 9


def _damage_base(ctx) -> dict | None:
  """A finished 6-step run (checkpoints 3 and 6, best 6) and its undamaged resume to step 9."""
  if "damage" in ctx.results:
    return ctx.results["damage"]
  pristine = os.path.join(ctx.tmp, "damage-pristine")
  first = run_trainer(ctx.logs, "damage-base", pristine, *DAMAGE_ARGS, "--config.total_steps=6")
  ref = os.path.join(ctx.tmp, "damage-reference")
  info = None
  if first.code == 0 and finished_checkpoints(pristine) == [3, 6]:
    shutil.copytree(pristine, ref)
    again = run_trainer(ctx.logs, "damage-reference", ref, *DAMAGE_ARGS, f"--config.total_steps={DAMAGE_TOTAL}")
    want = train_loss(ref, DAMAGE_TOTAL)
    if again.code == 0 and again.resumed_from() == 6 and want is not None:
      info = {"pristine": pristine, "want": want}
    else:
      info = {"error": f"the undamaged resume failed (exit {again.code}, resumed from {again.resumed_from()})",
              "proc": again}
  else:
    info = {"error": f"the base run failed (exit {first.code}, checkpoints {finished_checkpoints(pristine)})",
            "proc": first}
  ctx.results["damage"] = info
  return info


def _damaged_trial(ctx, row: Row, name: str, damage) -> None:
  base = _damage_base(ctx)
  if "error" in base:
    row.fail(f"{name}: {base['error']}", base["proc"])
    return
  wd = os.path.join(ctx.tmp, name)
  shutil.copytree(base["pristine"], wd)
  what = damage(wd)
  row.injected += 1
  proc = run_trainer(ctx.logs, name, wd, *DAMAGE_ARGS, f"--config.total_steps={DAMAGE_TOTAL}")
  err = proc.err()
  got = train_loss(wd, DAMAGE_TOTAL)
  aside = os.path.join(wd, "unreadable_checkpoints")
  detected = (re.search(r"checkpoint 6 in \S+ is unreadable", err) is not None
              or (os.path.isdir(aside) and any(n.startswith("6-") for n in os.listdir(aside))))
  resumed = proc.resumed_from()
  same = got is not None and got.hex() == base["want"].hex()
  recovered = proc.code == 0 and same
  row.recovered += int(recovered)
  row.lost.append(max(0, (3 if detected else 6) - resumed))
  dirty = []
  if "Traceback" in err:
    dirty.append(f"{err.count('Traceback')} traceback(s) on stderr")
  if error_lines(err):
    dirty.append(f"{len(error_lines(err))} 'error: ' lines")
  if detected and not re.search(r"checkpoint 6 in \S+ is unreadable \(.+\); trying the previous one", err):
    dirty.append("no one-line 'checkpoint 6 ... is unreadable (...); trying the previous one' warning")
  clean = proc.code == 0 and not dirty
  row.clean += int(clean)
  stats = ctx.results.setdefault(row.fault, {"detected": 0, "harmless": 0, "silent": 0, "resumed": []})
  stats["resumed"].append(resumed)
  if detected:
    stats["detected"] += 1
  elif same:
    stats["harmless"] += 1
  else:
    stats["silent"] += 1
  verdict = "detected" if detected else ("harmless" if same else "NOT DETECTED, run changed")
  loss_note = "identical" if same else f"{got!r} vs {base['want']!r}"
  row.notes.append(f"{name}: {what}: {verdict}; resumed from {resumed}; step-{DAMAGE_TOTAL} loss {loss_note}")
  if not recovered:
    row.fail(f"{name}: {what}: exit {proc.code}, step-{DAMAGE_TOTAL} loss {got!r} (undamaged resume: "
             f"{base['want']!r}), {verdict}", proc)
  elif not clean:
    row.fail(f"{name}: {what}: recovered, but the report is not clean: {'; '.join(dirty)}", proc)


def _summarize_damage(ctx, row: Row) -> None:
  s = ctx.results.get(row.fault)
  if s:
    row.recovered_note = f"detected {s['detected']}, harmless {s['harmless']}, undetected and changed {s['silent']}"
    row.notes.insert(0, f"detected (set aside) {s['detected']}, harmless (bytes no array reads) {s['harmless']}, "
                        f"undetected and changed {s['silent']}; resumed from steps {s['resumed']}")


def fault_flip(ctx) -> Row:
  row = Row("4 bytes XOR 0x5A in a checkpoint's array data")
  row.clean_note = "exit 0, no traceback; a detected one named in one 'is unreadable ... trying the previous one' warning"
  for i in range(count(8, ctx.quick)):
    def flip(wd, i=i):
      files = sorted(p for p in glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "d", "*"),
                                          recursive=True) if os.path.isfile(p) and os.path.getsize(p) >= 4)
      path = ctx.rng.choice(files)
      size = os.path.getsize(path)
      offset = ctx.rng.randrange(0, size - 3)
      with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(4)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in b))
      return f"{os.path.relpath(path, os.path.join(wd, 'checkpoints', '6'))} ({size} B) at byte {offset}"
    _damaged_trial(ctx, row, f"flip-{i}", flip)
  _summarize_damage(ctx, row)
  return row


def _remove_manifests(wd):
  found = glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "manifest.ocdbt"), recursive=True)
  for p in found:
    os.remove(p)
  return f"{len(found)} manifest.ocdbt removed"


def _truncate_checkpoint_metadata(wd):
  path = os.path.join(wd, "checkpoints", "6", "_CHECKPOINT_METADATA")
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  return f"_CHECKPOINT_METADATA truncated {size} -> {size // 2} B"


def _wrong_data_position(wd):
  path = os.path.join(wd, "checkpoints", "6", "meta", "metadata")
  with open(path) as f:
    m = json.load(f)
  old = m["data_position"]
  m["data_position"] = old + 8
  with open(path, "w") as f:
    json.dump(m, f)
  return f"meta/metadata data_position {old} -> {old + 8}"


def _remove_state(wd):
  shutil.rmtree(os.path.join(wd, "checkpoints", "6", "state"))
  return "checkpoints/6/state removed"


def fault_delete(ctx) -> Row:
  row = Row("checkpoint files deleted / truncated / edited")
  row.clean_note = "as above"
  damages = [_remove_manifests, _truncate_checkpoint_metadata, _wrong_data_position, _remove_state]
  for i, damage in enumerate(half(damages, ctx.quick)):
    _damaged_trial(ctx, row, f"delete-{i}", damage)
  _summarize_damage(ctx, row)
  return row


# -- 5: a full disk -----------------------------------------------------------------------------


def fault_disk(ctx) -> Row:
  row = Row("full disk (real tmpfs)")
  row.clean_note = "exit 75, one 'error: ' line naming the last good checkpoint, no traceback"
  total = 40
  args = [f"--config.total_steps={total}", "--config.checkpoint_every=2", "--config.keep_checkpoints=40"]
  if os.geteuid() != 0 or not shutil.which("mount"):
    row.skipped = "mounting a tmpfs needs root and mount(8)"
    return row
  for size in half(["2m", "3m", "4m"], ctx.quick):
    mnt = os.path.join(ctx.tmp, f"disk-{size}")
    os.makedirs(mnt)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True, text=True)
    if m.returncode != 0:
      row.skipped = f"mount -t tmpfs failed: {(m.stderr or m.stdout).strip()[:200]}"
      return row
    try:
      wd = os.path.join(mnt, "run")
      first = run_trainer(ctx.logs, f"disk-{size}-full", wd, *args)
      row.injected += 1
      err = first.err()
      lines = error_lines(err)
      ckpts = finished_checkpoints(wd)
      C = max(ckpts, default=0)
      named = (f"the last good checkpoint is step {C} in" if ckpts else "there is no finished checkpoint")
      dirty = report_problems(first, 75, ("error: no space left on device on ", named))
      row.clean += int(not dirty)
      if dirty:
        row.fail(f"disk {size}: the full disk was not reported cleanly: {'; '.join(dirty)}", first)
      problems = []
      if first.code == 0:
        problems.append("the disk never filled")
      if (p := jsonl_problem(wd)) is not None:
        problems.append(f"after the fault: {p}")
      if orphan := orphan_temporaries(wd):
        problems.append(f"orphan temporaries after the fault: {orphan}")
      L = last_step(wd)
      grow = subprocess.run(["mount", "-o", "remount,size=64m", mnt], capture_output=True, text=True)
      if grow.returncode != 0:
        row.fail(f"disk {size}: mount -o remount,size=64m failed: {grow.stderr.strip()[:200]}")
        continue
      again = run_trainer(ctx.logs, f"disk-{size}-resume", wd, *args)
      R = again.resumed_from()
      row.lost.append(C - R)
      if again.code != 0:
        problems.append(f"the resume exited {again.code}")
      if (p := jsonl_problem(wd)) is not None:
        problems.append(f"after the resume: {p}")
      elif (p := steps_once(wd, total)) is not None:
        problems.append(p)
      if R != C:
        problems.append(f"resumed from {R}, newest finished checkpoint {C}")
      row.notes.append(f"{size}: stopped at step {L}, exit {first.code}, stderr {len(err.splitlines())} line(s): "
                       f"{(lines[0] if lines else err.strip()[-200:]).replace(ctx.tmp, '$TMP')[:200]!r}...; checkpoints {ckpts}; resumed from {R}, "
                       f"exit {again.code}")
      if problems:
        row.fail(f"disk {size}: not recovered: {'; '.join(problems)}", again)
      else:
        row.recovered += 1
    finally:
      u = subprocess.run(["umount", mnt], capture_output=True)
      if u.returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
  return row


# -- 6: two trainers on one workdir -------------------------------------------------------------


def fault_concurrent(ctx) -> Row:
  row = Row("two trainers on one workdir")
  row.lost_na = "the refused trainer trains nothing"
  row.clean_note = "the refused one: exit 2, one 'error: ... is in use by another trainer (pid' line"
  total = 30
  args = [f"--config.total_steps={total}", "--config.checkpoint_every=1", "--config.keep_checkpoints=2"]
  for timing, want in half([("together", 0), ("after the first's first step", 1), ("mid-run (step 5)", 5)], ctx.quick):
    wd = os.path.join(ctx.tmp, f"concurrent-{want}")
    first = Trainer(ctx.logs, f"concurrent-{want}-a", wd, *args)
    if want:
      wait_until(lambda: last_step(wd) >= want, 120, first)
    at = last_step(wd)
    second = Trainer(ctx.logs, f"concurrent-{want}-b", wd, *args, "--config.seed=1")
    for p in (first, second):
      p.wait()
    row.injected += 1
    codes = sorted((first.code, second.code))
    refused = next((p for p in (first, second) if p.code == 2), None)
    winner = next((p for p in (first, second) if p.code == 0), None)
    problems = []
    if codes != [0, 2]:
      problems.append(f"exit codes {first.code} (first) and {second.code} (second)")
    if (p := jsonl_problem(wd)) is not None:
      problems.append(p)
    elif (p := steps_once(wd, total)) is not None:
      problems.append(p)
    if orphan := orphan_temporaries(wd):
      problems.append(f"orphan temporaries {orphan}")
    if problems:
      row.fail(f"concurrent ({timing}): {'; '.join(problems)}", refused or second)
    else:
      row.recovered += 1
    if refused is not None:
      dirty = report_problems(refused, 2, ("is in use by another trainer (pid ",))
      row.clean += int(not dirty)
      if dirty:
        row.fail(f"concurrent ({timing}): the refusal is not one clean line: {'; '.join(dirty)}", refused)
    row.notes.append(f"{timing} (second started at step {at}): first exit {first.code}, second exit {second.code}"
                     + (f"; winner {'first' if winner is first else 'second'}" if winner else ""))
  return row


# -- 7: a non-finite loss during an asynchronous save -------------------------------------------

VERIFY = r"""
import json, sys
import numpy as np
import jax
import orbax.checkpoint as ocp
result = {}
for path in sys.argv[1:]:
  try:
    tree = ocp.StandardCheckpointer().restore(path)
    bad, n = [], 0
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        continue
      a = np.asarray(x)
      n += 1
      if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
        bad.append(jax.tree_util.keystr(kp))
    result[path] = {"arrays": n, "nonfinite": bad}
  except Exception as e:
    result[path] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
print("VERIFY " + json.dumps(result))
"""


def _verify_finite(paths: list[str]) -> dict:
  if not paths:
    return {}
  p = subprocess.run([sys.executable, "-c", VERIFY, *paths], cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=RUN_TIMEOUT)
  for line in p.stdout.splitlines():
    if line.startswith("VERIFY "):
      return json.loads(line[len("VERIFY "):])
  return {path: {"error": f"verifier exit {p.returncode}: {p.stderr.strip()[-300:]}"} for path in paths}


def fault_nonfinite(ctx) -> Row:
  row = Row("non-finite loss during an async save")
  row.lost_na = "the run diverged; nothing to resume"
  row.clean_note = "exit 2, one 'error: ' line naming the last good checkpoint, no traceback"
  boom = ["--config.optimizer.learning_rate=300", "--config.optimizer.grad_clip=0",
          "--config.optimizer.warmup_steps=0", "--config.checkpoint_every=1", "--config.total_steps=40"]
  for i, log_every in enumerate(half([1, 50], ctx.quick)):
    wd = os.path.join(ctx.tmp, f"nonfinite-{i}")
    proc = run_trainer(ctx.logs, f"nonfinite-{i}", wd, *boom, f"--config.log_every={log_every}")
    row.injected += 1
    err = proc.err()
    lines = error_lines(err)
    ckpts = finished_checkpoints(wd)
    named = (f"the last good checkpoint is step {max(ckpts)}" if ckpts else "there is no finished checkpoint")
    dirty = report_problems(proc, 2, (named,))
    if "schedule new futures" in err:
      dirty.append("'cannot schedule new futures' on stderr")
    row.clean += int(not dirty)
    if dirty:
      row.fail(f"nonfinite #{i} (log_every={log_every}): not one clean line: {'; '.join(dirty)}", proc)
    paths = [os.path.join(wd, sub, str(s), "state") for sub in ("checkpoints", "best_checkpoint")
             for s in finished_checkpoints(wd, sub)]
    checked = _verify_finite(paths)
    problems = []
    if orphan := orphan_temporaries(wd):
      problems.append(f"orphan temporaries {orphan}")
    for path, res in checked.items():
      if "error" in res:
        problems.append(f"{os.path.relpath(path, wd)} does not restore: {res['error']}")
      elif res["nonfinite"]:
        problems.append(f"{os.path.relpath(path, wd)} holds non-finite values in {res['nonfinite'][:3]}")
    if problems:
      row.fail(f"nonfinite #{i} (log_every={log_every}): {'; '.join(problems)}", proc)
    else:
      row.recovered += 1
    row.notes.append(f"log_every={log_every}: exit {proc.code}, {(lines[0] if lines else '(no error line)').replace(ctx.tmp, '$TMP')[:200]!r}...; "
                     f"finished checkpoints {ckpts}, best {finished_checkpoints(wd, 'best_checkpoint')}, "
                     f"{len(checked)} read back, all finite: {not problems}")
  return row


# -- bad inputs -----------------------------------------------------------------------------


BAD_INPUT_FILES = ["tests/test_bad_inputs.py", "tests/test_errors.py"]


def bad_inputs(ctx) -> tuple[list[list[str]], list[str], str]:
  cmd = [sys.executable, "-m", "pytest", *BAD_INPUT_FILES, "-q", "-n", "0", "-p", "no:cacheprovider", "-rA"]
  shown = "python -m pytest " + " ".join(cmd[3:])
  try:
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    out += "\n[fault_matrix: pytest killed after 900 s]"
  per_file = {f: {"tried": 0, "ok": 0} for f in BAD_INPUT_FILES}
  per_func: dict[str, list[int]] = {}
  failed = []
  for line in out.splitlines():
    m = re.match(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+?\.py)::(\S+)", line)
    if not m:
      continue
    outcome, path, test = m.groups()
    if outcome == "SKIPPED" or path not in per_file:
      continue
    per_file[path]["tried"] += 1
    func = test.split("[")[0]
    per_func.setdefault(func, [0, 0])[0] += 1
    if outcome == "PASSED":
      per_file[path]["ok"] += 1
      per_func[func][1] += 1
    else:
      failed.append(line.strip()[:300])
  summary = next((line.strip("= ").strip() for line in reversed(out.splitlines())
                  if re.search(r"\d+ (passed|failed)", line)), "no pytest summary line found")
  rows = [[f, str(v["tried"]), str(v["ok"])] for f, v in per_file.items()]
  rows.append(["**total**", str(sum(v["tried"] for v in per_file.values())),
               str(sum(v["ok"] for v in per_file.values()))])
  notes = [f"pytest summary: {summary}",
           "cases per test function (tried/passed): " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in per_func.items())]
  notes += [f"NOT REFUSED CLEANLY: {line}" for line in failed]
  if not any(v["tried"] for v in per_file.values()):
    notes.append("pytest output tail:\n" + tail(out, 30))
  return rows, notes, shown


# -- main -------------------------------------------------------------------------------------


def markdown(header: list[str], rows: list[list[str]]) -> str:
  esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def sources_digest() -> str:
  """A digest of the trainer's sources, to notice an edit during the run."""
  import hashlib
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(ROOT, "trainer", "**", "*.py"), recursive=True)):
    with open(path, "rb") as f:
      h.update(path.encode() + b"\0" + f.read())
  return h.hexdigest()[:12]


def git_state() -> str:
  def git(*a):
    p = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""
  head = git("rev-parse", "--short", "HEAD") or "?"
  dirty = git("status", "--porcelain", "--", "trainer")
  return f"git {head}" + (" with uncommitted changes in trainer/" if dirty else "")


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


class Context:
  def __init__(self, tmp: str, quick: bool, seed: int):
    self.tmp = tmp
    self.logs = os.path.join(tmp, "logs")
    os.makedirs(self.logs)
    self.quick = quick
    self.rng = random.Random(seed)
    self.results: dict = {}


FAULTS = {"kill9": fault_kill9, "sigterm": fault_sigterm, "flip": fault_flip, "delete": fault_delete,
          "disk": fault_disk, "concurrent": fault_concurrent, "nonfinite": fault_nonfinite}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--quick", action="store_true", help="half the injections of each kind (about 6 min)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random moments, files and offsets")
  parser.add_argument("--only", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
  parser.add_argument("--keep", action="store_true", help="keep the temporary directory (workdirs and logs)")
  args = parser.parse_args(argv)
  only = [k.strip() for k in args.only.split(",") if k.strip()]
  unknown = sorted(set(only) - set(KINDS))
  if unknown:
    parser.error(f"unknown kinds {unknown}; choose from {','.join(KINDS)}")

  t0 = time.time()
  digest = sources_digest()
  tmp = tempfile.mkdtemp(prefix="fault_matrix-")
  ctx = Context(tmp, args.quick, args.seed)
  rows: list[Row] = []
  bad = None
  try:
    for kind in KINDS:
      if kind not in only or kind == "badinputs":
        continue
      _say(f"{kind} ...")
      t = time.time()
      row = FAULTS[kind](ctx)
      rows.append(row)
      _say(f"{kind}: {row.recovered}/{row.injected} recovered, {row.clean} clean, {time.time() - t:.0f} s")
    if "badinputs" in only:
      _say("bad inputs (pytest) ...")
      t = time.time()
      bad = bad_inputs(ctx)
      _say(f"bad inputs: {time.time() - t:.0f} s")
  finally:
    for mnt in glob.glob(os.path.join(tmp, "disk-*")):  # never leave a mount behind
      if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    if args.keep:
      _say(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)
  wall = time.time() - t0
  digest_after = sources_digest()

  out = []
  if rows:
    out.append(markdown(["fault", "injected", "recovered", "steps lost beyond the last checkpoint",
                         "clean one-line report"], [r.cells() for r in rows]))
    out.append("")
    for r in rows:
      if r.notes:
        out.append(f"- **{r.fault}**:")
        out += [f"  - {n}" for n in r.notes]
    failures = [(r.fault, f) for r in rows for f in r.failures]
    out.append("")
    if failures:
      out.append("Did not recover or did not report cleanly:")
      out += [f"- [{fault}] {f}" for fault, f in failures]
    else:
      out.append("Every injection recovered and was reported cleanly.")
  if bad is not None:
    table, notes, shown = bad
    out += ["", markdown(["file", "bad inputs tried (test cases)", "refused with one clean sentence (passed)"], table),
            ""]
    out += [f"- {n}" for n in notes]
    out.append(f"- command: `{shown}`")
  out += ["", "($TMP: this run's temporary directory)",
          f"command: `{' '.join(['python', 'scripts/fault_matrix.py', *(argv if argv is not None else sys.argv[1:])])}`"
              f" (seed {args.seed}); trainer runs: `XLA_FLAGS=--xla_force_host_platform_device_count=8 "
              f"JAX_PLATFORMS=cpu python -m trainer.train {' '.join(TINY)} --workdir=DIR {' '.join(FAST)} ...`",
          f"jax {_version('jax')}, jaxlib {_version('jaxlib')}, orbax-checkpoint {_version('orbax-checkpoint')}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, wall time {wall / 60:.1f} min",
          f"trainer sources: {git_state()}, digest {digest}"
          + ("" if digest_after == digest else f" -> {digest_after} (CHANGED DURING THIS RUN: rows may mix versions)")]
  print("\n".join(out).replace(tmp, "$TMP"), flush=True)
  failed = any(r.failures for r in rows) or (bad is not None and any("NOT REFUSED" in n for n in bad[1]))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
