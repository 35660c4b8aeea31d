"""Multi-host runs on one machine: N processes with CPU devices, gloo collectives.

Every run here is a real `python -m trainer.train` subprocess (several of them for a
multi-process run), so each test is bounded by subprocess timeouts. The subprocesses set
their own device count (tests/conftest.py put 8 in XLA_FLAGS for this process).

Common settings: the smoke config with a constant learning rate from step 1 (warmup 0),
so that the compared steps really move the parameters and the learning rate does not
depend on `total_steps` (a 4-step run resumed to 6 steps and an uninterrupted 6-step run
follow the same schedule). `keep_best=false`: with it on, the latest and the best
checkpoint managers both save the final step at once and their Orbax barriers (named
by step only) collide across processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "scripts", "launch_local.sh")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
PYTHON = VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable

COMMON = ["--config=configs/default.py:smoke", "--config.log_every=1", "--config.batch_size=8",
          "--config.keep_best=false", "--config.optimizer.schedule=constant",
          "--config.optimizer.warmup_steps=0", "--config.progress_bar=false"]
# The same examples and the same 4-way data-parallel mesh either way; only the order in
# which the cross-device gradient sum is taken differs (in-process all-reduce vs gloo
# between processes), i.e. float32 rounding: ~1 ulp of the loss (~5e-7 at loss ~5.8),
# growing slowly through the steps. 1e-5 relative is ~20 ulps: tight enough that a wrong
# data slice, a missing gradient all-reduce or a lost optimizer state fails it by orders
# of magnitude.
RTOL = 1e-5
RUN_TIMEOUT = 150  # seconds for one (multi-process) training run on 2 busy cores
DEAD_PEER_BOUND = 60  # seconds from kill -9 to the survivor's exit (heartbeat timeout 10 s)
HEARTBEAT = 10


def _env(devices: int | None = None) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        assert row["step"] not in out, f"step {row['step']} logged twice in {workdir}"
        out[row["step"]] = row["train/loss"]
  return out


def _single_process(workdir: str, *args: str) -> subprocess.CompletedProcess:
  r = subprocess.run([PYTHON, "-m", "trainer.train", f"--workdir={workdir}", *COMMON, *args], cwd=ROOT,
                     env=_env(4), capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _launch(workdir: str, *args: str) -> subprocess.CompletedProcess:
  """2 processes x 2 CPU devices through scripts/launch_local.sh."""
  env = _env() | {"SEQMIX_LOCAL_DEVICES": "2"}
  r = subprocess.run(["bash", LAUNCH, "2", f"--workdir={workdir}", *COMMON, *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + _logs(workdir)
  return r


def _logs(workdir: str) -> str:
  """The tails of the per-process logs, for assertion messages."""
  logdir = os.path.join(workdir, "logs")
  out = []
  for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
    with open(os.path.join(logdir, name), errors="replace") as f:
      out.append(f"\n--- {name}\n" + f.read()[-2000:])
  return "".join(out)


def _assert_close(got: dict[int, float], want: dict[int, float], rtol: float) -> float:
  assert sorted(got) == sorted(want), (got, want)
  worst = 0.0
  for step in want:
    rel = abs(got[step] - want[step]) / abs(want[step])
    worst = max(worst, rel)
    assert rel <= rtol, f"step {step}: loss {got[step]!r} vs {want[step]!r} (relative difference {rel:.2e} > {rtol})"
  return worst


@pytest.fixture(scope="module")
def two_process_4_steps(tmp_path_factory):
  """A 2-process x 2-device run of 4 steps (checkpoints at 3 and 4), shared by the tests."""
  workdir = str(tmp_path_factory.mktemp("mh") / "two_4")
  r = _launch(workdir, "--config.total_steps=4")
  return workdir, r


@pytest.mark.slow
def test_two_processes_match_one_process(two_process_4_steps, tmp_path):
  workdir, r = two_process_4_steps
  assert "2 process(es)" in r.stdout  # process 0's output reaches the launcher's terminal
  for i in range(2):
    assert os.path.getsize(os.path.join(workdir, "logs", f"process_{i}.log")) > 0
  single = str(tmp_path / "one")
  _single_process(single, "--config.total_steps=4")
  want = _train_losses(single)
  assert sorted(want) == [1, 2, 3, 4]
  worst = _assert_close(_train_losses(workdir), want, RTOL)
  print(f"2x2 vs 1x4: largest relative loss difference {worst:.2e}")


@pytest.mark.slow
def test_two_processes_resume(two_process_4_steps, tmp_path):
  src, _ = two_process_4_steps
  resumed = str(tmp_path / "resumed")
  shutil.copytree(src, resumed)
  r = _launch(resumed, "--config.total_steps=6")
  assert "resuming from step 4" in r.stdout, r.stdout[-3000:]
  assert os.path.exists(os.path.join(resumed, "config_resumed_at_4.json"))
  got = _train_losses(resumed)  # steps 1-4 from the first run, 5-6 from the resumed one, none twice
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  compile_steps = [row["step"] for row in rows if "compile/seconds" in row]
  assert compile_steps == [0, 4], compile_steps  # the second run started at step 4

  straight = str(tmp_path / "straight")
  _launch(straight, "--config.total_steps=6")
  want = _train_losses(straight)
  worst = _assert_close({s: got[s] for s in (5, 6)}, {s: want[s] for s in (5, 6)}, RTOL)
  print(f"resumed vs uninterrupted: largest relative loss difference {worst:.2e}")


def _wait_for_step(workdir: str, step: int, procs, timeout: float) -> None:
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and any(s >= step for s in _train_losses(workdir)):
      return
    for p in procs:
      assert p.poll() is None, f"a process exited early with {p.returncode}" + _logs(workdir)
    time.sleep(0.2)
  raise AssertionError(f"no train step {step} within {timeout} s" + _logs(workdir))


LONG_RUN = ["--config.total_steps=100000", "--config.eval_every=0", "--config.checkpoint_every=0"]


@pytest.mark.slow
def test_dead_peer_stops_the_survivor(tmp_path):
  """kill -9 process 1 mid-run: process 0 exits non-zero with JAX's error, promptly.

  The coordination service (in process 0) notices the missing heartbeats after
  --heartbeat_timeout seconds and tells the survivors to stop, unless a gloo collective
  of process 0 fails on the dead peer's socket first. (`_kill_one(tmp_path, 0)`:
  the survivors lose their connection to the service and stop at once, in < 1 s; not
  run here to keep this file short.)
  """
  _kill_one(tmp_path, victim=1)


def _kill_one(tmp_path, victim: int) -> None:
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "logs"))
  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(2):
      log = open(os.path.join(workdir, "logs", f"process_{i}.log"), "w")
      logs.append(log)
      procs.append(subprocess.Popen(
          [PYTHON, "-m", "trainer.train", f"--workdir={workdir}", *COMMON, *LONG_RUN,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           f"--heartbeat_timeout={HEARTBEAT}"],
          cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT))
    _wait_for_step(workdir, 3, procs, RUN_TIMEOUT)
    survivor = procs[1 - victim]
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.time()
    try:
      rc = survivor.wait(timeout=DEAD_PEER_BOUND)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process {1 - victim} still running {DEAD_PEER_BOUND} s after process {victim} "
                           f"was killed" + _logs(workdir)) from None
    elapsed = time.time() - t0
    print(f"victim {victim}: survivor exited with {rc} after {elapsed:.1f} s")
    assert rc != 0
    with open(os.path.join(workdir, "logs", f"process_{1 - victim}.log"), errors="replace") as f:
      text = f.read()
    # Two legitimate ways to learn of the dead peer, whichever comes first: the
    # coordination service's missed-heartbeat verdict, or the next gloo collective
    # failing on the closed socket (then our run_entry names the failed process).
    by_service = "JAX distributed service detected fatal errors" in text
    by_collective = (f"seqmix: process {1 - victim} failed (JaxRuntimeError)" in text
                     and "Gloo" in text and "failed" in text)
    assert by_service or by_collective, text[-3000:]
    if victim == 1 and not by_collective:  # the service's verdict on a dead worker names the heartbeats
      assert "stopped sending heartbeats" in text or "heartbeat timeout" in text, text[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
    for log in logs:
      log.close()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """SIGTERM to process 1 only: JAX's preemption sync point (trainer/train.py `_Preemption`,
  no per-step collective) tells process 0 through the coordination service; both finish the
  same step, save it together (one complete checkpoint) and exit 0."""
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "logs"))
  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(2):
      log = open(os.path.join(workdir, "logs", f"process_{i}.log"), "w")
      logs.append(log)
      procs.append(subprocess.Popen(
          [PYTHON, "-m", "trainer.train", f"--workdir={workdir}", *COMMON, *LONG_RUN,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           f"--heartbeat_timeout={HEARTBEAT}"],
          cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT))
    _wait_for_step(workdir, 3, procs, RUN_TIMEOUT)
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    rcs = []
    for i, p in enumerate(procs):
      try:
        rcs.append(p.wait(timeout=DEAD_PEER_BOUND))
      except subprocess.TimeoutExpired:
        raise AssertionError(f"process {i} still running {DEAD_PEER_BOUND} s after SIGTERM" + _logs(workdir)) from None
    print(f"both processes exited {rcs} {time.time() - t0:.1f} s after SIGTERM to process 1")
    assert rcs == [0, 0], _logs(workdir)
    with open(os.path.join(workdir, "logs", "process_0.log"), errors="replace") as f:
      m = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved", f.read())
    assert m, _logs(workdir)
    stopped = int(m.group(1))
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    assert max(_train_losses(workdir)) == stopped
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
    for log in logs:
      log.close()


def _find_process(workdir: str, process_id: int) -> int | None:
  """pid of `python -m trainer.train ... --process_id=N ... --workdir=DIR` (Linux /proc)."""
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if "trainer.train" in args and f"--process_id={process_id}" in args and f"--workdir={workdir}" in args:
      return int(pid)
  return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the process through /proc")
def test_launcher_reports_a_dead_process(tmp_path):
  """The launcher names the failed process and its log, stops the rest, exits with its status."""
  workdir = str(tmp_path / "run")
  env = _env() | {"SEQMIX_LOCAL_DEVICES": "2", "SEQMIX_KILL_GRACE": "5", "SEQMIX_HEARTBEAT_TIMEOUT": "60"}
  launcher = subprocess.Popen(["bash", LAUNCH, "2", f"--workdir={workdir}", *COMMON, *LONG_RUN], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    os.makedirs(workdir, exist_ok=True)
    _wait_for_step(workdir, 3, [launcher], RUN_TIMEOUT)
    victim = _find_process(workdir, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    # The survivor would notice only after the 60 s heartbeat timeout: the launcher kills it
    # after its 5 s grace period.
    out, err = launcher.communicate(timeout=40)
    elapsed = time.time() - t0
    print(f"launcher exited with {launcher.returncode} after {elapsed:.1f} s")
    # Usually the launcher sees the killed process first; sometimes the survivor notices the
    # dead peer (a closed gloo connection) and exits 1 before the launcher's next poll.
    # Either way the launcher must name the process that failed first and pass on its status.
    log0, log1 = (os.path.join(workdir, "logs", f"process_{i}.log") for i in range(2))
    named_victim = f"launch_local: process 1 failed with status 137 (signal KILL); see {log1}" in err
    named_survivor = f"launch_local: process 0 failed with status 1; see {log0}" in err
    assert named_victim or named_survivor, err[-2000:]
    assert launcher.returncode == (128 + signal.SIGKILL if named_victim else 1), out[-2000:] + err[-2000:]
    assert _find_process(workdir, 0) is None  # nothing left behind
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.communicate(timeout=30)
    for i in range(2):
      pid = _find_process(workdir, i)
      if pid is not None:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sequence_axis_spanning_both_processes(tmp_path):
  """mesh sequence=4 over 2 processes x 2 devices: ring attention's ppermutes cross the
  process boundary (gloo); losses equal 1 process x 4 devices. keep_best is on here:
  the latest and best managers save the same step with distinct Orbax barrier names."""
  ring = ["--config.total_steps=3", "--config.mesh.data=1", "--config.mesh.sequence=4",
          "--config.parallel.sequence_strategy=ring", "--config.keep_best=true", "--config.model.mixer=flash",
          "--config.model.flash.block_q=4", "--config.model.flash.block_k=4"]
  two = str(tmp_path / "two")
  _launch(two, *ring)
  one = str(tmp_path / "one")
  _single_process(one, *ring)
  worst = _assert_close(_train_losses(two), _train_losses(one), RTOL)
  print(f"ring over 2 processes vs 1 process: largest relative loss difference {worst:.2e}")


@pytest.mark.slow
def test_every_process_refuses_a_workdir_another_trainer_holds(tmp_path):
  """Process 0 holds the workdir's lock for the job; when another trainer has it, process 0
  is refused and tells the others, so every process leaves with the same sentence."""
  from trainer.workdir import WorkdirLock
  workdir = str(tmp_path / "held")
  os.makedirs(workdir)
  holder = WorkdirLock(workdir)
  assert holder.try_acquire() is None
  holder.announce()
  try:
    env = _env() | {"SEQMIX_LOCAL_DEVICES": "2"}
    r = subprocess.run(["bash", LAUNCH, "2", f"--workdir={workdir}", *COMMON], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
  finally:
    holder.release()
  assert r.returncode != 0
  logs = _logs(workdir)
  for i in range(2):
    with open(os.path.join(workdir, "logs", f"process_{i}.log")) as f:
      text = f.read()
    assert f"is in use by another trainer (pid {os.getpid()} on host" in text and "Traceback" not in text, logs
  assert not os.path.exists(os.path.join(workdir, "checkpoints")), "a refused job wrote checkpoints"
