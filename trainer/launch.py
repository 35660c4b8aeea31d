"""Multi-host start-up: one program per host (JAX's multi-controller model).

`jax.distributed.initialize()` is called when flags say so (`--coordinator_address
--num_processes --process_id`) or when the environment announces several processes
(SLURM, Open MPI, Kubernetes/TPU pods through JAX's own cluster detection). On CPU the
cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax


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


def initialize(args) -> None:
  explicit = args.coordinator_address is not None or (args.num_processes or 1) > 1
  if not explicit and not _env_says_multiprocess():
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                  num_processes=args.num_processes, process_id=args.process_id)
  jax.distributed.initialize(initialization_timeout=args.initialization_timeout, **kwargs)


def _cpu_only() -> bool:
  try:
    import importlib.util
    return importlib.util.find_spec("jax_cuda13_plugin") is None and importlib.util.find_spec(
        "jax_cuda12_plugin") is None and importlib.util.find_spec("libtpu") is None
  except Exception:
    return True
