"""Multi-host start-up: one program per host (JAX's multi-controller model).

`jax.distributed.initialize()` is called when flags say so (`--coordinator_address
--num_processes --process_id`) or when the environment announces several processes
(SLURM, Open MPI, Kubernetes/TPU pods through JAX's own cluster detection). On CPU the
cross-process collectives use gloo.

Failure handling. JAX's coordination service (run inside process 0) watches every
process's heartbeat; when one stops, the service tells all the others, and each
survivor terminates itself (SIGABRT, exit status 134) with "Terminating process because
the JAX distributed service detected fatal errors ... The following tasks are unhealthy
(stopped sending heartbeats): <ids>". A dead process 0 is noticed by the others at once
(their connection to the service breaks); any other dead process after at most
`--heartbeat_timeout` seconds. A process that fails with a Python exception exits at
once (see `_exit_on_uncaught_exception`) instead of waiting up to JAX's shutdown
timeout for peers that are themselves blocked waiting for it in a collective.
"""

from __future__ import annotations

import inspect
import os
import re
import sys

import jax

_initialized = False  # jax.distributed.initialize() was called by `initialize`


def _env_says_multiprocess() -> bool:
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES"):
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


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


def initialize(args) -> None:
  explicit = args.coordinator_address is not None or (args.num_processes or 1) > 1
  if not explicit and not _env_says_multiprocess():
    return
  # Cross-process collectives between CPU devices (the local launcher, CPU-only hosts).
  # Only the CPU client uses this; already the default in recent jax, set for older ones.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
      pass
  kwargs: dict = {"initialization_timeout": args.initialization_timeout}
  if getattr(args, "heartbeat_timeout", None):
    kwargs["heartbeat_timeout_seconds"] = args.heartbeat_timeout
  if explicit:
    kwargs.update(coordinator_address=args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                  num_processes=args.num_processes, process_id=args.process_id)
  else:
    device_ids = _slurm_one_task_per_node_device_ids()
    if device_ids is not None:
      kwargs["local_device_ids"] = device_ids
  jax.distributed.initialize(**_supported_kwargs(jax.distributed.initialize, kwargs))
  global _initialized
  _initialized = True
  process = args.process_id if explicit else next(
      (os.environ[v] for v in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if v in os.environ), "?")
  _exit_on_uncaught_exception(process)


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
