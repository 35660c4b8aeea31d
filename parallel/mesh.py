"""The device mesh and the mapping from logical axes (named by layers) to mesh axes.

Mesh axes, slowest to fastest: data, fsdp, tensor, sequence. Devices are ordered by
(process, id) before reshaping, so one host's devices are contiguous along the fastest
axes and the collectives of tensor/sequence parallelism stay inside a host where the
sizes allow.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from layers import axes

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


class MeshError(ValueError):
  """A mesh that does not fit the devices or the data (a user mistake)."""


def resolve_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: the fixed axes "
                      f"multiply to {fixed}, which does not divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x sequence={sizes[3]} = "
                    f"{math.prod(sizes)} devices, but {num_devices} are available; make the product {num_devices} "
                    f"or set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(mesh_cfg, len(devices))
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.array(ordered, dtype=object).reshape(shape)
  # Auto axis types: classic sharding propagation (the default became Explicit in newer jax).
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=types)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      out[logical] = ()
    elif isinstance(mesh_axes, str):
      out[logical] = (mesh_axes,)
    else:
      out[logical] = tuple(mesh_axes)
  return out


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules) -> P:
  """PartitionSpec for an array with these logical axes.

  A mesh axis is used at most once per array (first logical axis wins), and a
  dimension not divisible by its mesh axes' total size is replicated instead.
  """
  if logical_axes is None:
    return P()
  table = rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    mesh_axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def tree_shardings(arrays: dict, logical: dict, mesh: Mesh, rules) -> dict:
  """NamedShardings for a flat dict of arrays (or ShapeDtypeStructs) with logical axes."""
  return {k: NamedSharding(mesh, logical_to_spec(logical.get(k), v.shape, mesh, rules)) for k, v in arrays.items()}


def batch_spec(ndim: int, mesh: Mesh, rules, seq_dim: bool = True) -> P:
  """Batch arrays: [B, T, ...] -> (batch axes, length axes); [B] -> batch axes."""
  logical = [axes.BATCH] + ([axes.LENGTH] if seq_dim and ndim > 1 else []) + [None] * (ndim - 1 - int(seq_dim and ndim > 1))
  table = rules_dict(rules)
  spec = []
  for name in logical:
    mesh_axes = tuple(a for a in table.get(name, ()) if mesh.shape[a] > 1) if name else ()
    spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
  return P(*spec)


def batch_parallel_size(mesh: Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in rules_dict(rules).get(axes.BATCH, ()))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Makes `layers.axes.constrain` emit sharding constraints for this mesh."""

  def constrain(x, logical_axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))

  with axes.constraint_hook(constrain):
    yield
