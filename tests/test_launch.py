"""When `trainer.launch.initialize` starts `jax.distributed`, and how training stops on a signal.

Fast, in-process: cluster environments are simulated with environment variables, and
`jax.distributed.initialize` is replaced by a recorder (nothing connects anywhere). The real
multi-process runs are in tests/test_multihost.py.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import inspect
import os
import signal
import socket
import sys
import time
import types

import jax
import numpy as np
import pytest

from trainer import launch
from trainer import train as train_mod
from trainer.config import UserError

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "PRTE_", "TPU_", "MEGASCALE_", "KUBERNETES_",
                    "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")
SLURM_TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                   "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_STEP_NUM_NODES": "2",
                   "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4"}


def _args(*argv):
  parser = argparse.ArgumentParser()
  launch.add_flags(parser)
  return parser.parse_args(list(argv))


def _detector(name):
  env = next((e for e in launch._cluster_detectors() if launch._detector_name(e) == name), None)
  if env is None:
    pytest.skip(f"this jax has no {name!r} cluster detector")
  return env


def _refuse(what):
  def fail(*a, **k):
    raise AssertionError(f"{what} was consulted")
  return fail


@pytest.fixture
def calls(monkeypatch):
  """No cluster variables; `jax.distributed.initialize` records its keyword arguments."""
  for var in list(os.environ):
    if var.startswith(CLUSTER_PREFIXES) or var == "JOB_COMPLETION_INDEX":
      monkeypatch.delenv(var)
  monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")  # so jax.config is left alone
  got = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: got.append(kw))
  monkeypatch.setattr(launch, "_initialized", False)
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs its own
  return got


def test_no_cluster_starts_at_once_without_network(calls, monkeypatch):
  for name in ("gcetpu", "k8s"):  # the detectors that would wait on a server
    env = next((e for e in launch._cluster_detectors() if launch._detector_name(e) == name), None)
    if env is not None:
      monkeypatch.setattr(env, "is_env_present", classmethod(_refuse(f"the {name} detector")))
      monkeypatch.setattr(env, "get_process_count", classmethod(_refuse(f"the {name} detector")))
  for fn in ("getaddrinfo", "gethostbyname", "create_connection"):
    monkeypatch.setattr(socket, fn, _refuse(f"socket.{fn}"))
  monkeypatch.setattr(socket.socket, "connect", _refuse("socket.connect"))
  t = time.perf_counter()
  launch.initialize(_args())
  elapsed = time.perf_counter() - t
  assert calls == [] and not launch._initialized
  assert elapsed < 0.2, elapsed
  # A Kubernetes pod that is not an indexed Job, a one-task SLURM step, a one-rank MPI job:
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
  launch.initialize(_args())
  for var, value in SLURM_TWO_NODES.items():
    monkeypatch.setenv(var, value)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_PROCID", "0")
  launch.initialize(_args())
  monkeypatch.setenv("PMI_SIZE", "1")
  launch.initialize(_args())
  assert calls == []


def test_slurm_job_initializes_with_all_gpus_of_each_node(calls, monkeypatch):
  for var, value in SLURM_TWO_NODES.items():
    monkeypatch.setenv(var, value)
  assert _detector("slurm").is_env_present()  # what JAX itself sees
  launch.initialize(_args())
  assert calls == [{"cluster_detection_method": "slurm", "local_device_ids": [0, 1, 2, 3],
                    "initialization_timeout": 120}]
  assert launch._initialized


def test_real_initialize_takes_the_arguments_we_pass():
  from jax._src import distributed
  params = inspect.signature(distributed.initialize).parameters
  for name in ("cluster_detection_method", "local_device_ids", "initialization_timeout",
               "heartbeat_timeout_seconds", "coordinator_address", "num_processes", "process_id"):
    assert name in params, name


def test_flags_win_over_the_environment(calls, monkeypatch):
  for var, value in SLURM_TWO_NODES.items():
    monkeypatch.setenv(var, value)
  monkeypatch.setenv("SLURM_NTASKS", "8")
  launch.initialize(_args("--coordinator_address=10.1.2.3:4567", "--num_processes=2", "--process_id=1",
                          "--heartbeat_timeout=30"))
  assert calls == [{"coordinator_address": "10.1.2.3:4567", "num_processes": 2, "process_id": 1,
                    "cluster_detection_method": "deactivate", "initialization_timeout": 120,
                    "heartbeat_timeout_seconds": 30}]
  # The same three through the environment, with nothing else set.
  calls.clear()
  for var in SLURM_TWO_NODES:
    monkeypatch.delenv(var)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.9.9.9:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  launch.initialize(_args())
  assert calls[0]["num_processes"] == 3 and calls[0]["process_id"] == 2
  assert calls[0]["coordinator_address"] == "10.9.9.9:1" and calls[0]["cluster_detection_method"] == "deactivate"


def test_gke_tpu_pod_is_initialized_without_the_metadata_server(calls, monkeypatch):
  """Not in the old variable list: a multi-host TPU slice on GKE (JobSet / indexed Job)."""
  gke = _detector("gketpu")
  monkeypatch.setattr(sys.modules[gke.__module__], "running_in_cloud_tpu_vm", True)  # libtpu + TPU chips
  monkeypatch.setattr(launch, "_tpu_platform_allowed", lambda: True)  # the test process runs JAX_PLATFORMS=cpu
  gce = next((e for e in launch._cluster_detectors() if launch._detector_name(e) == "gcetpu"), None)
  if gce is not None:
    monkeypatch.setattr(gce, "is_env_present", classmethod(_refuse("the GCE TPU detector (metadata server)")))
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0.js,w-1.js,w-2.js,w-3.js")
  monkeypatch.setenv("TPU_WORKER_ID", "2")
  assert gke.is_env_present()
  launch.initialize(_args())
  assert calls == [{"cluster_detection_method": "gketpu", "initialization_timeout": 120}]
  calls.clear()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0.js")  # one host: no jax.distributed
  launch.initialize(_args())
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")  # ... unless it is one host of a multislice job
  launch.initialize(_args())
  assert calls == [{"cluster_detection_method": "gketpu", "initialization_timeout": 120}]


def test_tpu_detectors_are_not_asked_off_tpu(calls, monkeypatch):
  gce = _detector("gcetpu")
  monkeypatch.setattr(gce, "is_env_present", classmethod(_refuse("the GCE TPU detector")))
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  assert not launch._tpu_platform_allowed()  # JAX_PLATFORMS=cpu here
  launch.initialize(_args())
  monkeypatch.setattr(launch, "_tpu_platform_allowed", lambda: True)
  monkeypatch.setattr(sys.modules[gce.__module__], "running_in_cloud_tpu_vm", False)
  launch.initialize(_args())  # no libtpu / TPU chips: JAX's own check says no Cloud TPU VM
  assert calls == []


def test_kubernetes_indexed_job_is_initialized(calls, monkeypatch):
  k8s = _detector("k8s")
  fake = types.ModuleType("kubernetes")
  fake.__spec__ = importlib.machinery.ModuleSpec("kubernetes", None)
  monkeypatch.setitem(sys.modules, "kubernetes", fake)  # `pip install jax[k8s]`
  asked = []
  monkeypatch.setattr(k8s, "is_env_present", classmethod(lambda cls: asked.append("present") or True))
  monkeypatch.setattr(k8s, "get_process_count", classmethod(lambda cls: 3))  # the Job's parallelism (API)
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
  launch.initialize(_args())  # a plain pod: the API is not asked
  assert asked == [] and calls == []
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
  launch.initialize(_args())
  assert asked == ["present"]
  assert calls == [{"cluster_detection_method": getattr(k8s, "name", "") or None, "initialization_timeout": 120}]


def test_mpich_world_needs_a_coordinator(calls, monkeypatch):
  """MPICH / Intel MPI (PMI_SIZE): no JAX detector reads it; a coordinator address or mpi4py does."""
  monkeypatch.setenv("PMI_SIZE", "4")
  monkeypatch.setenv("PMI_RANK", "3")
  real_find_spec = launch.importlib.util.find_spec
  monkeypatch.setattr(launch.importlib.util, "find_spec",
                      lambda name, *a: None if name == "mpi4py" else real_find_spec(name, *a))
  with pytest.raises(UserError, match="PMI_SIZE=4: an MPI launcher started 4 processes"):
    launch.initialize(_args())
  assert calls == []
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node7:6000")
  launch.initialize(_args())
  assert calls == [{"coordinator_address": "node7:6000", "num_processes": 4, "process_id": 3,
                    "cluster_detection_method": "deactivate", "initialization_timeout": 120}]
  calls.clear()
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setattr(launch.importlib.util, "find_spec",
                      lambda name, *a: object() if name == "mpi4py" else real_find_spec(name, *a))
  launch.initialize(_args())
  assert calls == [{"cluster_detection_method": "mpi4py", "initialization_timeout": 120}]


# -- _Preemption ------------------------------------------------------------------------------


@pytest.fixture
def restore_signals():
  saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  yield
  for sig, handler in saved.items():
    signal.signal(sig, handler)


def test_one_process_flag_and_second_ctrl_c(restore_signals):
  before = signal.getsignal(signal.SIGTERM)
  with train_mod._Preemption(0) as p:
    assert p.mode == "local" and not p.requested(1)
    assert signal.getsignal(signal.SIGTERM) == p._handle and signal.getsignal(signal.SIGINT) == p._handle
    p._handle(signal.SIGINT, None)
    assert p.requested(2) and p.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
      p._handle(signal.SIGINT, None)
  assert signal.getsignal(signal.SIGTERM) == before


def _fake_processes(monkeypatch, sync_points, gathers, sync_available=True, peer_sync_available=None):
  """Two processes; the other one can use the sync point as this one can (or as told), and never
  saw a signal. Each all-gather is recorded as this process's value."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  peer_sync = sync_available if peer_sync_available is None else peer_sync_available

  def reached(step):
    if not sync_available:
      raise RuntimeError("Preemption sync manager has not been initialized")
    sync_points.append(step)
    return step == 7

  def allgather(x):
    peer = peer_sync if not gathers else False  # the first all-gather agrees on the mode
    gathers.append(np.asarray(x).item())
    return np.stack([np.asarray(x), np.asarray(peer)])

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


def test_several_processes_use_jax_sync_point_not_a_collective(monkeypatch, restore_signals):
  sync_points, gathers = [], []
  _fake_processes(monkeypatch, sync_points, gathers)
  raised = []
  monkeypatch.setattr(signal, "raise_signal", raised.append)
  term_before = signal.getsignal(signal.SIGTERM)
  with train_mod._Preemption(5) as p:
    assert p.mode == "sync"
    assert signal.getsignal(signal.SIGTERM) == term_before  # left to JAX's notifier
    # The step we start from registered; one all-gather to agree on the mode, one look for an early notice.
    assert sync_points == [5] and gathers == [True, False]
    assert [p.requested(s) for s in (6, 7)] == [False, True]
    assert sync_points == [5, 6, 7] and gathers == [True, False]  # no collective per step
    assert p.reason == "SIGTERM"
    p._handle(signal.SIGINT, None)  # Ctrl-C becomes a SIGTERM for JAX's notifier
    assert raised == [signal.SIGTERM] and p.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      p._handle(signal.SIGINT, None)


def test_fallback_all_gathers_every_few_steps(monkeypatch, restore_signals):
  sync_points, gathers = [], []
  _fake_processes(monkeypatch, sync_points, gathers, sync_available=False)
  with train_mod._Preemption(0) as p:
    assert p.mode == "allgather" and signal.getsignal(signal.SIGTERM) == p._handle
    every = p.FALLBACK_EVERY
    assert not any(p.requested(s) for s in range(1, 2 * every + 1))
    assert len(gathers) == 1 + 2  # the mode, then one every FALLBACK_EVERY steps
    p._handle(signal.SIGTERM, None)
    assert not p.requested(2 * every + 1)
    assert p.requested(3 * every) and gathers[-1] is True and p.reason == "SIGTERM"


def test_processes_that_disagree_on_the_sync_point_all_fall_back(monkeypatch, restore_signals):
  """One process could use JAX's sync point, the other not: both take the all-gather fallback
  (in different modes they would run different collectives and hang)."""
  sync_points, gathers = [], []
  _fake_processes(monkeypatch, sync_points, gathers, sync_available=True, peer_sync_available=False)
  with train_mod._Preemption(0) as p:
    assert p.mode == "allgather" and signal.getsignal(signal.SIGTERM) == p._handle
    assert gathers == [True]


def test_gke_template_parses():
  yaml = pytest.importorskip("yaml")
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gke",
                         "train_tpu.yaml")) as f:
    doc = yaml.safe_load(f)
  assert doc["kind"] == "JobSet"
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
  container = job["template"]["spec"]["containers"][0]
  assert container["command"][-2:] == ["-m", "trainer.train"]
  assert any(a.startswith("--workdir=/") for a in container["args"])
