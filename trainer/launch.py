"""Multi-host start-up: one program per host (JAX's multi-controller model).

When `jax.distributed.initialize()` runs, in this order (the first that applies wins):

1. Flags `--coordinator_address --num_processes --process_id`, or their environment
   equivalents `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: with all
   three known, JAX's cluster detection is switched off (`cluster_detection_method=
   "deactivate"`), so nothing in the environment overrides them; a missing one is left to it.
2. JAX's own cluster detection (`jax._src.clusters`: one `ClusterEnv` subclass per
   environment; the first whose `is_env_present()` holds is used, see `detect_cluster`):
   Open MPI 4 (`mpirun`), SLURM (`srun`), PRRTE (Open MPI 5, newer jax), GKE TPU pods
   (JobSet / indexed Job with `TPU_WORKER_HOSTNAMES`), GCE TPU VMs (the metadata server),
   Kubernetes (an indexed Job, through the Kubernetes API). `initialize` finds the
   environment and its process count itself, then names it to JAX
   (`cluster_detection_method`), so both use the same one (the Kubernetes detector has no
   name: there JAX runs its own detection again, in its own order); a one-process cluster
   (SLURM with one task, a single-host TPU VM) is not initialised.
3. MPI launchers JAX does not detect by itself (MPICH / Intel MPI: `PMI_SIZE`, MVAPICH:
   `MV2_COMM_WORLD_SIZE`, Open MPI 5 on jax versions without PRRTE detection:
   `OMPI_COMM_WORLD_SIZE`), when they say several processes: with `JAX_COORDINATOR_ADDRESS`
   set, that address and the launcher's size and rank; otherwise JAX's opt-in mpi4py
   detection when mpi4py is installed; otherwise an error (N copies of a one-process run
   would write the same workdir).

Only cheap, offline detectors are consulted unconditionally: those that read environment
variables (Open MPI, SLURM, PRRTE, GKE TPU). The others are guarded, because asking them
can wait on the network: the GCE TPU detector queries the VM's metadata server (with
retries, a 60 s timeout each), so it is asked only where JAX itself found a Cloud TPU VM
at import (libtpu installed and TPU chips on the PCI bus: `running_in_cloud_tpu_vm`; on
such a VM the metadata server is local) and `JAX_PLATFORMS`, if set, names `tpu`; the
Kubernetes detector calls the cluster's API server, so it is asked only inside an indexed
Job (`KUBERNETES_SERVICE_HOST` and `JOB_COMPLETION_INDEX` set, which its bootstrap needs
anyway) with the `kubernetes` package installed. Detectors this module does not know
(added by a later jax) are not asked: pass the flags there. A one-process run with none of
these variables set reads a few environment variables and starts at once.

On CPU the cross-process collectives use gloo. A SLURM job with one task per node gives
each task all its node's GPUs (JAX alone would give each task one).

Failure handling. JAX's coordination service (run inside process 0) watches every
process's heartbeat; when one stops, the service tells all the others, and each
survivor terminates itself (SIGABRT, exit status 134) with "Terminating process because
the JAX distributed service detected fatal errors ... The following tasks are unhealthy
(stopped sending heartbeats): <ids>". A dead process 0 is noticed by the others at once
(their connection to the service breaks); any other dead process after at most
`--heartbeat_timeout` seconds. A process that fails with a Python exception exits at
once (see `_exit_on_uncaught_exception`) instead of waiting up to JAX's shutdown
timeout for peers that are themselves blocked waiting for it in a collective.

Preemption: `jax.distributed.initialize()` also starts JAX's preemption sync manager,
which catches SIGTERM itself; `trainer/train.py` (`_Preemption`) explains how training
stops on every process at the same step.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import sys

import jax

log = logging.getLogger("seqmix")

_initialized = False  # jax.distributed.initialize() was called by `initialize`

# JAX cluster detectors whose `is_env_present()` only reads environment variables.
_ENV_ONLY_DETECTORS = ("ompi", "slurm", "prrte", "gketpu")
_TPU_DETECTORS = ("gketpu", "gcetpu", "tpu")
# (size, rank) variables of MPI launchers, for those JAX does not detect by itself.
_MPI_WORLD = (("PMI_SIZE", "PMI_RANK"), ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
              ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


def _env_int(var: str) -> int | None:
  try:
    return int(os.environ[var])
  except (KeyError, ValueError):
    return None


def _cluster_detectors() -> list:
  """JAX's registered `ClusterEnv` subclasses, in the order JAX tries them."""
  try:
    from jax._src import clusters  # noqa: PLC0415
    return list(clusters.ClusterEnv._cluster_types)  # noqa: SLF001
  except (ImportError, AttributeError):
    return []


def _detector_name(env) -> str:
  name = getattr(env, "name", "") or ""
  return "k8s" if not name and env.__name__ == "K8sCluster" else name  # unnamed in jax 0.10


def _tpu_platform_allowed() -> bool:
  platforms = getattr(jax.config, "jax_platforms", None) or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "tpu" in [p.strip() for p in platforms.split(",")]


def _on_cloud_tpu_vm(env) -> bool:
  """What JAX decided at import: libtpu installed and TPU chips on the PCI bus (no network)."""
  module = sys.modules.get(env.__module__)
  if hasattr(module, "running_in_cloud_tpu_vm"):
    return bool(module.running_in_cloud_tpu_vm)
  try:
    from jax._src import cloud_tpu_init  # noqa: PLC0415
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def _may_ask(env) -> bool:
  """Whether asking `env.is_env_present()` is cheap and offline here (see the module docstring)."""
  name = _detector_name(env)
  if getattr(env, "opt_in_only_method", False):  # mpi4py: only asked for in `_plan` (step 3)
    return False
  if name in _TPU_DETECTORS and not _tpu_platform_allowed():
    return False
  if name in _ENV_ONLY_DETECTORS:
    return True
  if name == "gcetpu":
    return _on_cloud_tpu_vm(env) and "TPU_SKIP_MDS_QUERY" not in os.environ
  if name == "k8s":
    return ("KUBERNETES_SERVICE_HOST" in os.environ and "JOB_COMPLETION_INDEX" in os.environ
            and importlib.util.find_spec("kubernetes") is not None)
  return False


def _process_count(env) -> int:
  """The process count `env` reports; from environment variables where they hold it."""
  name = _detector_name(env)
  if name == "slurm":
    return int(os.environ["SLURM_NTASKS"])
  if name in ("ompi", "prrte") and _env_int("OMPI_COMM_WORLD_SIZE") is not None:
    return _env_int("OMPI_COMM_WORLD_SIZE")
  if name == "gketpu":  # JAX's own count may ask the metadata server for the slice count
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) * (_env_int("MEGASCALE_NUM_SLICES") or 1)
  return int(env.get_process_count())  # gcetpu: metadata server; k8s: API server


def detect_cluster():
  """`(detector, process count)` of the cluster found, or None.

  JAX's registration order, except that the environment-only detectors all go first: a GKE
  TPU pod (`TPU_WORKER_HOSTNAMES`) is recognised without asking the metadata server, which
  jax 0.10 asks first (its GCE detector is registered before the GKE one)."""
  envs = _cluster_detectors()
  cheap = [env for env in envs if _detector_name(env) in _ENV_ONLY_DETECTORS]
  for env in cheap + [env for env in envs if env not in cheap]:
    if _may_ask(env) and env.is_env_present():
      return env, _process_count(env)
  return None


def _mpi_world() -> tuple[str, int, int | None] | None:
  """(size variable, size, rank) of an MPI launcher's environment, or None."""
  for size_var, rank_var in _MPI_WORLD:
    size = _env_int(size_var)
    if size is not None:
      return size_var, size, _env_int(rank_var)
  return None


def add_flags(parser) -> None:
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
  parser.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-host)")
  parser.add_argument("--process_id", type=int, default=None, help="this process's index (multi-host)")
  parser.add_argument("--initialization_timeout", type=int, default=120,
                      help="seconds to wait for all processes to join")
  parser.add_argument("--heartbeat_timeout", type=int, default=None,
                      help="seconds without a heartbeat after which a process is declared dead and all the "
                           "others stop (multi-host; default: JAX's, 100)")


def _supported_kwargs(fn, kwargs: dict) -> dict:
  """Drops keyword arguments `fn` does not take (they differ between jax versions)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return kwargs
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return kwargs
  return {k: v for k, v in kwargs.items() if k in params}


def _slurm_one_task_per_node_device_ids() -> list[int] | None:
  """All of this node's GPUs when SLURM runs one task per node.

  JAX's SLURM detection restricts each process to the single device `SLURM_LOCALID`
  (it assumes one task per GPU), which with one task per node would use 1 GPU a node.
  """
  if "SLURM_JOB_ID" not in os.environ or os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
  if not per_node:
    return None
  counts = [int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", per_node)]
  if not counts or any(c != 1 for c in counts):
    return None
  gpus = os.environ.get("SLURM_GPUS_ON_NODE")
  if gpus and gpus.isdigit() and int(gpus) > 0:
    return list(range(int(gpus)))
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible and visible not in ("-1", "NoDevFiles"):
    return list(range(len(visible.split(","))))
  return None


def _exit_on_uncaught_exception(process) -> None:
  """After an uncaught exception, print it and leave at once.

  Python's normal exit would run `jax.distributed.shutdown()`, which waits (up to the
  shutdown timeout, 5 minutes) for every peer to reach the shutdown barrier, while the
  peers wait for this process inside their next collective. Leaving without it makes
  the coordination service declare this process dead and stop the others.
  """
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    if issubclass(exc_type, KeyboardInterrupt):
      return previous(exc_type, exc, tb)
    try:
      previous(exc_type, exc, tb)
      print(f"seqmix: process {process} failed ({exc_type.__name__}); exiting without waiting "
            f"for the other processes", file=sys.stderr, flush=True)
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)

  sys.excepthook = hook


def exit_on_error(code: int) -> int:
  """For entry points' error returns: in a multi-process run, leave now with `code`.

  A normal exit waits in `jax.distributed.shutdown()` for peers that may be blocked in
  a collective waiting for this process (an error only one process hits), so the job
  would hang until the shutdown timeout. Single-process: returns `code`.
  """
  if _initialized and code:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


def _plan(args) -> dict | None:
  """`jax.distributed.initialize`'s keyword arguments for this run, or None for one process."""
  coordinator = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID")
  if args.coordinator_address is not None or (num or 1) > 1:  # 1. flags (or their variables)
    kwargs = {"coordinator_address": coordinator, "num_processes": num, "process_id": process_id}
    if None not in kwargs.values():
      kwargs["cluster_detection_method"] = "deactivate"
    return kwargs
  found = detect_cluster()  # 2. JAX's cluster detection
  if found is not None:
    env, count = found
    log.info("cluster detected by JAX's %s detector: %d process(es)", _detector_name(env), count)
    if count <= 1:
      return None
    kwargs = {"cluster_detection_method": getattr(env, "name", "") or None}
    if _detector_name(env) == "slurm":
      device_ids = _slurm_one_task_per_node_device_ids()
      if device_ids is not None:
        kwargs["local_device_ids"] = device_ids
    return kwargs
  mpi = _mpi_world()  # 3. other MPI launchers
  if mpi is None or mpi[1] <= 1:
    return None
  size_var, size, rank = mpi
  if coordinator and rank is not None:
    return {"coordinator_address": coordinator, "num_processes": size, "process_id": rank,
            "cluster_detection_method": "deactivate"}
  if importlib.util.find_spec("mpi4py") is not None:
    return {"cluster_detection_method": "mpi4py"}
  from trainer.config import UserError  # noqa: PLC0415
  raise UserError(f"{size_var}={size}: an MPI launcher started {size} processes, but JAX cannot find their "
                  f"coordinator: install mpi4py, or set JAX_COORDINATOR_ADDRESS=HOST:PORT (a free port on the "
                  f"host of rank 0), or pass --coordinator_address, --num_processes and --process_id")


def initialize(args) -> None:
  kwargs = _plan(args)
  if kwargs is None:
    return
  # Cross-process collectives between CPU devices (the local launcher, CPU-only hosts).
  # Only the CPU client uses this; already the default in recent jax, set for older ones.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
      pass
  kwargs["initialization_timeout"] = args.initialization_timeout
  if getattr(args, "heartbeat_timeout", None):
    kwargs["heartbeat_timeout_seconds"] = args.heartbeat_timeout
  jax.distributed.initialize(**_supported_kwargs(jax.distributed.initialize, kwargs))
  global _initialized
  _initialized = True
  state = getattr(sys.modules.get("jax._src.distributed"), "global_state", None)
  process = kwargs.get("process_id")
  _exit_on_uncaught_exception(process if process is not None else getattr(state, "process_id", "?"))


def run_entry(body) -> int:
  """Runs an entry point's body: a user mistake (config, data, mesh, checkpoint) becomes one
  `error: ...` line on stderr and exit code 2, with no traceback; a disk that refused a write
  the same, with exit code 75 (`workdir.EXIT_IO`); anything else propagates."""
  import logging
  from parallel.mesh import MeshError
  from trainer.config import UserError
  from trainer.data.base import DataError
  from trainer.workdir import EXIT_IO, IOFault
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    return body()
  except (UserError, MeshError, DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return exit_on_error(EXIT_IO if isinstance(e, IOFault) else 2)
